"""Review page of a finished (or interrupted) run: ``OUTPUT/review/index.html`` + ``OUTPUT/suggestions.jsonl``.

    python flows/review.py --output out/demo                 # then open out/demo/review/index.html
    python flows/review.py --output s3://bucket/run --page-size 200 --suggestions 5

Reads the run's index, shards, ground truth (when present) and report.json
through fsspec; no Ray. The page is static: it works from the folder and from a
synced copy of the bucket.
"""

from __future__ import annotations

import argparse
import json

from common import setup_logging  # also puts the repo on sys.path

from pointseg.review import ReviewOptions, write_review
from pointseg.uncertainty import NUM_SUGGESTIONS, SUGGESTION_RADIUS, UNCERTAIN_THRESHOLD


def main() -> None:
    setup_logging()
    defaults = ReviewOptions()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="the run's output root (fsspec URI)")
    p.add_argument("--threshold", type=float, default=UNCERTAIN_THRESHOLD,
                   help="a pixel is uncertain above this uncertainty (uncertain fraction)")
    p.add_argument("--suggestions", type=int, default=NUM_SUGGESTIONS, help="next clicks per image")
    p.add_argument("--radius", type=float, default=SUGGESTION_RADIUS,
                   help="suggestion window and suppression radius, fraction of the long side")
    p.add_argument("--page-size", type=int, default=defaults.page_size, help="cards per page")
    p.add_argument("--detail-size", type=int, default=defaults.detail_size, help="long side of detail pictures, px")
    args = p.parse_args()
    out = write_review(args.output, options=ReviewOptions(
        threshold=args.threshold, num_suggestions=args.suggestions, suggestion_radius=args.radius,
        page_size=args.page_size, detail_size=args.detail_size))
    print(json.dumps({k: out[k] for k in ("index", "suggestions", "images", "failed", "sort", "correlation")},
                     indent=2))


if __name__ == "__main__":
    main()
