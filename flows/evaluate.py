"""Evaluate COCO panoptic predictions (or pseudo labels): PQ/SQ/RQ and mIoU.

    python flows/evaluate.py --gt-json gt/panoptic.json --gt-dir gt/panoptic \
        --pred-json pred/panoptic.json --pred-dir pred/panoptic [--categories cats.json]

Prints one JSON object (fractions in [0, 1]; an empty mean is null). Any fsspec
URI works for the paths. The work is :func:`pointseg.metrics.evaluate_panoptic`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from pointseg.data.coco_panoptic_io import read_categories
from pointseg.metrics import evaluate_panoptic


def _nan_to_none(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gt-json", required=True)
    ap.add_argument("--gt-dir", required=True)
    ap.add_argument("--pred-json", required=True)
    ap.add_argument("--pred-dir", required=True)
    ap.add_argument("--categories", help="JSON list of categories (default: those of --gt-json)")
    ap.add_argument("--missing", choices=("fn", "raise"), default="fn",
                    help="image without prediction: count all its ground truth as FN (default) or fail")
    ap.add_argument("--per-class", action="store_true", help="include the per-class tables")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    categories = read_categories(args.categories) if args.categories else None
    result = evaluate_panoptic(
        args.gt_json, args.gt_dir, args.pred_json, args.pred_dir,
        categories=categories, missing=args.missing, progress=not args.no_progress,
    )
    if not args.per_class:
        result["pq"].pop("per_class")
        result["miou"].pop("per_class")
    json.dump(_nan_to_none(result), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    main()
