"""Evaluate a trained stage-2 model on the held-out images: PQ/SQ/RQ, and COCO mask AP for instance models.

    python flows/evaluate_model.py --config configs/train.yaml --output out/run --checkpoint OUT/models/stage2

    index rows of the validation images (every train.val_every-th image id)
      -> map_batches(EvaluateModel, ActorPoolStrategy)   # operators/evaluation.py; checkpoint loaded once per actor
      -> driver, streaming: PQ, SQ, RQ; pycocotools mask AP
"""

from __future__ import annotations

import json

from common import base_parser, init_ray, setup_logging

from operators.evaluation import evaluate_model
from pointseg.config import PipelineConfig, load_config
from pointseg.data.prepare import join, load_categories, read_index
from pointseg.train.stage2 import validation_ids


def main() -> None:
    setup_logging()
    p = base_parser(__doc__.splitlines()[0], "configs/train.yaml")
    p.add_argument("--checkpoint", required=True, help="stage-2 checkpoint folder (any fsspec URI)")
    args = p.parse_args()
    cfg = load_config(PipelineConfig, args.config, args.overrides)
    output = args.output or cfg.output
    categories = load_categories(join(output, "categories.json"))
    val = validation_ids([r["image_id"] for r in read_index(join(output, "index", "index.parquet"))], cfg.train.val_every)
    init_ray(cfg.ray)
    res = evaluate_model(cfg, categories, output, args.checkpoint, sorted(val))
    print(json.dumps(res["metrics"], indent=2, default=str))


if __name__ == "__main__":
    main()
