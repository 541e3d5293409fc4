"""Evaluate a trained stage-2 model on the validation images: PQ/SQ/RQ or COCO mask AP.

    python flows/evaluate_model.py --config configs/train.yaml --output out/run --checkpoint PATH

    read_parquet(OUTPUT/index, image_id in validation)
      -> map_batches(EvaluateModel, ActorPoolStrategy)   # checkpoint loaded once per actor
           per image: predict, pq_stat_image(...).to_dict() / RLE instances
      -> driver: PQEvaluator.add_stat -> PQ, SQ, RQ (all/things/stuff);  pycocotools COCOeval(segm) -> AP

Ground truth: ``OUTPUT/gt/panoptic.json`` + ``OUTPUT/gt/panoptic/``; for mask AP
its thing segments are the instances (``iscrowd`` kept).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from common import base_parser, init_ray, setup_logging

from pointseg.config import PipelineConfig, load_config
from pointseg.data.prepare import join, load_categories, read_index
from pointseg.data.record import Category

log = logging.getLogger("pointseg.flows.evaluate_model")


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def instances_to_panoptic(pred: dict) -> tuple[np.ndarray, list[dict]]:
    """Paint instance masks (lowest score first, so the best wins overlaps) into an id map, for pictures."""
    masks, labels, scores = pred["masks"], pred["labels"], pred["scores"]
    id_map = np.zeros(masks.shape[1:] if len(masks) else (0, 0), np.int32)
    for k in np.argsort(scores, kind="stable"):
        id_map[masks[k]] = k + 1
    info = [{"id": int(k + 1), "category_id": int(labels[k]), "isthing": 1, "iscrowd": 0}
            for k in range(len(masks)) if (id_map == k + 1).any()]
    return id_map, info


class EvaluateModel:
    """Ray Data actor: load the checkpoint once, then predict and score batches of index rows."""

    def __init__(self, checkpoint: str, gt_json: str, gt_dir: str, threshold: float = 0.5, score_threshold: float = 0.05):
        from pointseg.data.coco_panoptic_io import read_panoptic_annotations
        from pointseg.train.stage2 import checkpoint_categories, load_model

        self.model, self.processor, meta = load_model(checkpoint)
        self.task = meta["task"]
        self.categories = checkpoint_categories(meta)
        _, _, self.gt = read_panoptic_annotations(gt_json)
        self.gt_dir = gt_dir
        self.threshold, self.score_threshold = threshold, score_threshold

    def __call__(self, batch: dict) -> dict:
        from pointseg.data.coco_panoptic_io import read_id_map
        from pointseg.data.images import read_image
        from pointseg.data.panoptic_format import encode_png
        from pointseg.metrics.pq import pq_stat_image
        from pointseg.models.instance import predict_instances
        from pointseg.models.panoptic import predict_panoptic

        t0 = time.perf_counter()
        ids = [int(i) for i in batch["image_id"]]
        images = [read_image(str(f)) for f in batch["file_name"]]
        if self.task == "panoptic":
            preds = predict_panoptic(self.model, self.processor, images, threshold=self.threshold)
        else:
            raw = predict_instances(self.model, images, score_threshold=self.score_threshold)
            preds = [instances_to_panoptic(p) if len(p["masks"]) else (np.zeros(im.shape[:2], np.int32), [])
                     for p, im in zip(raw, images)]
        out = {k: [] for k in ("image_id", "pq_stat", "pred_png", "pred_segments_info", "gt_instances",
                               "pred_instances", "height", "width", "seconds")}
        for n, (image_id, image, (pred_map, pred_info)) in enumerate(zip(ids, images, preds)):
            ann = self.gt[image_id]
            gt_map = read_id_map(self.gt_dir, ann["file_name"])
            stat = pq_stat_image(gt_map, ann["segments_info"], pred_map, pred_info, self.categories, image_id)
            gt_inst = [
                {"image_id": image_id, "category_id": int(s["category_id"]), "iscrowd": int(s.get("iscrowd", 0)),
                 "segmentation": _rle(gt_map == s["id"]), "area": int((gt_map == s["id"]).sum()),
                 "bbox": _bbox(gt_map == s["id"])}
                for s in ann["segments_info"] if self.categories[int(s["category_id"])].isthing
            ]
            pred_inst = []
            if self.task == "instance":
                p = raw[n]
                pred_inst = [{"image_id": image_id, "category_id": int(c), "score": float(sc), "segmentation": _rle(m)}
                             for m, c, sc in zip(p["masks"], p["labels"], p["scores"])]
            out["image_id"].append(image_id)
            out["pq_stat"].append(json.dumps(stat.to_dict()))
            out["pred_png"].append(encode_png(pred_map))
            out["pred_segments_info"].append(json.dumps(pred_info))
            out["gt_instances"].append(json.dumps(gt_inst))
            out["pred_instances"].append(json.dumps(pred_inst))
            out["height"].append(image.shape[0])
            out["width"].append(image.shape[1])
            out["seconds"].append((time.perf_counter() - t0) / len(ids))
        return {k: np.asarray(v, dtype=object) if k in ("pred_png",) else np.asarray(v) for k, v in out.items()}


def mask_ap(rows: list[dict], categories: dict[int, Category]) -> dict:
    """COCO mask AP, AP50, AP75 (pycocotools ``COCOeval(iouType="segm")``) of the actors' RLE rows."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {"images": [], "annotations": [], "categories": [{"id": c.id, "name": c.name} for c in categories.values() if c.isthing]}
    dets = []
    for r in rows:
        gt["images"].append({"id": int(r["image_id"]), "height": int(r["height"]), "width": int(r["width"])})
        for a in json.loads(r["gt_instances"]):
            gt["annotations"].append({**a, "id": len(gt["annotations"]) + 1})
        dets += json.loads(r["pred_instances"])
    if not dets or not gt["annotations"]:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0, "num_detections": len(dets), "num_gt": len(gt["annotations"])}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50, ap75 = (max(float(v), 0.0) for v in ev.stats[:3])  # -1 means "no gt": report 0
    return {"ap": ap, "ap50": ap50, "ap75": ap75, "num_detections": len(dets), "num_gt": len(gt["annotations"])}


def evaluate_model(cfg: PipelineConfig, categories: dict[int, Category], output: str, checkpoint: str,
                   image_ids: list[int]) -> dict:
    """Metrics of ``checkpoint`` on ``image_ids``; ``rows`` holds per-image predictions for pictures."""
    import ray
    from ray.data.expressions import col

    from pointseg.metrics import PQEvaluator

    from train import absolute_file_names, is_local

    output = str(Path(output).resolve()) if is_local(output) else output
    ev = cfg.train.eval
    ctx = ray.data.DataContext.get_current()
    ctx.execution_no_progress_timeout_s = cfg.ray_data.no_progress_timeout_s
    ctx.wait_for_min_actors_s = int(cfg.ray_data.wait_for_min_actors_s)
    ds = ray.data.read_parquet(join(output, "index", "index.parquet")).select_columns(["image_id", "file_name"])
    ds = ds.filter(expr=col("image_id").is_in(sorted(image_ids)))
    ds = ds.map_batches(absolute_file_names, fn_kwargs={"cwd": os.getcwd()}, batch_format="pandas")
    ds = ds.map_batches(
        EvaluateModel,
        fn_constructor_kwargs={
            "checkpoint": checkpoint, "gt_json": join(output, "gt", "panoptic.json"),
            "gt_dir": join(output, "gt", "panoptic"), "threshold": ev.threshold, "score_threshold": ev.score_threshold,
        },
        compute=ray.data.ActorPoolStrategy(size=ev.num_actors),
        num_cpus=ev.cpus_per_actor,
        batch_size=ev.batch_size,
        batch_format="numpy",
    )
    rows = sorted(ds.take_all(), key=lambda r: r["image_id"])
    if not rows:
        raise ValueError(f"evaluation: no validation image of {output}/index matched {len(image_ids)} ids")
    pq_ev = PQEvaluator(categories)
    for r in rows:
        pq_ev.add_stat(json.loads(r["pq_stat"]))
    pq = pq_ev.evaluate()
    metrics = {k: pq[k] for k in ("pq", "sq", "rq", "pq_th", "sq_th", "rq_th", "pq_st", "sq_st", "rq_st")}
    if cfg.train.task == "instance":
        metrics.update(mask_ap(rows, categories))
    metrics["num_images"] = len(rows)
    metrics["seconds_per_image"] = float(np.mean([r["seconds"] for r in rows]))
    return {"metrics": metrics, "rows": rows}


def main() -> None:
    setup_logging()
    p = base_parser(__doc__.splitlines()[0], "configs/train.yaml")
    p.add_argument("--checkpoint", required=True, help="stage-2 checkpoint folder (holds state.pt)")
    args = p.parse_args()
    cfg = load_config(PipelineConfig, args.config, args.overrides)
    output = args.output or cfg.output
    categories = load_categories(join(output, "categories.json"))
    from pointseg.train.stage2 import validation_ids

    val = validation_ids([r["image_id"] for r in read_index(join(output, "index", "index.parquet"))], cfg.train.val_every)
    init_ray(cfg.ray)
    res = evaluate_model(cfg, categories, output, args.checkpoint, sorted(val))
    print(json.dumps(res["metrics"], indent=2))


if __name__ == "__main__":
    main()
