"""Review page of a finished (or interrupted) run: ``OUTPUT/review/index.html`` + ``OUTPUT/suggestions.jsonl``.

    python flows/review.py --output out/demo                 # then open out/demo/review/index.html
    python flows/review.py --output s3://bucket/run --page-size 200 --num-suggestions 5

Reads the run's index, shards, ground truth (when present) and report.json
through fsspec; no Ray. The page is static: it works from the folder and from a
synced copy of the bucket.
"""

from __future__ import annotations

import argparse
import json

from common import setup_logging  # also puts the repo on sys.path

from pointseg.review.options import ReviewOptions
from pointseg.review.page import write_review
from pointseg.storage import OutputLock


def main() -> None:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="the run's output root (fsspec URI)")
    for name, f in ReviewOptions.model_fields.items():  # every page option, e.g. --page-size 200
        if name != "enabled":
            p.add_argument("--" + name.replace("_", "-"), type=type(f.default) if f.default is not None else str,
                           default=f.default, help=f.description)
    args = vars(p.parse_args())
    output = args.pop("output")
    with OutputLock(output, "flows/review.py"):  # the page is not rewritten under a run that is still writing it
        out = write_review(output, options=ReviewOptions.model_validate(args))
    print(json.dumps({k: out[k] for k in ("index", "suggestions", "images", "failed", "sort", "correlation")},
                     indent=2))


if __name__ == "__main__":
    main()
