"""The review page of a run: every pseudo label, worst first, its uncertainty and the next clicks.

* :func:`pointseg.review.page.write_review` turns a run's output folder into
  ``OUTPUT/review/index.html`` (a static page: no server, no network) and
  ``OUTPUT/suggestions.jsonl``;
* :mod:`pointseg.review.table` defines the per-image table and its worst-first order;
* :class:`ReviewOptions` (``pointseg.review.options``) is its config, light
  enough for ``pointseg.config`` to import;
* :mod:`pointseg.review.browser` opens a page in headless Chromium (tests, benchmarks).
"""

from pointseg.review.options import ReviewOptions

__all__ = ["ReviewOptions"]
