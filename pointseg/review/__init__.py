"""The review page of a run: every pseudo label, worst first, its uncertainty and the next clicks.

:func:`write_review` turns a run's output folder into ``OUTPUT/review/index.html``
(a static page: no server, no network) and ``OUTPUT/suggestions.jsonl``;
:mod:`pointseg.review.table` defines the per-image table and its worst-first order.
"""

from pointseg.review.page import ReviewOptions, render_page, write_review
from pointseg.review.table import (
    SORTS,
    default_sort,
    image_quality,
    sort_key,
    uncertainty_quality_correlation,
    worst_first,
)

__all__ = [
    "SORTS",
    "ReviewOptions",
    "default_sort",
    "image_quality",
    "render_page",
    "sort_key",
    "uncertainty_quality_correlation",
    "worst_first",
    "write_review",
]
