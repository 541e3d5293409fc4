"""Evaluation of a trained stage-2 model on the held-out images: PQ/SQ/RQ and COCO mask AP.

    index rows of the validation images (in memory, one block per batch)
      -> map_batches(EvaluateModel, ActorPoolStrategy)   # checkpoint loaded once per actor (fsspec)
           per batch: predict (STAGE2_MODELS row), per image: pq_stat_image(...) and RLE instances
      -> driver, streaming: PQEvaluator.add_stat -> PQ, SQ, RQ;  pycocotools COCOeval(segm) -> AP,
         and again with useCats = 0 -> class-agnostic AP (the masks without the classifier)

A failing image (unreadable file, a prediction that raises) is an error row,
listed in the result, and counts as an empty prediction (all its segments
false negatives); the other images are scored. Ground truth:
``OUTPUT/gt/panoptic.json`` + ``OUTPUT/gt/panoptic/``; for mask AP its thing
segments are the instances (``iscrowd`` kept).
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import pyarrow as pa

from pointseg.data.coco_panoptic_io import read_id_map, read_panoptic_annotations
from pointseg.data.images import read_image_as_annotated
from pointseg.data.panoptic_format import encode_png
from pointseg.data.prepare import join, read_index
from pointseg.data.record import Category
from pointseg.metrics import PQEvaluator
from pointseg.metrics.instances import coco_mask_ap, mask_bbox, rle
from pointseg.metrics.pq import pq_stat_image
from pointseg.train.stage2 import load_stage2

from operators.actor_pool import actor_batches, set_timeouts
from operators.file_names import absolute_file_names

log = logging.getLogger("pointseg.operators.evaluation")

COLUMNS = ("image_id", "error", "pq_stat", "pred_png", "pred_segments_info", "gt_instances", "pred_instances",
           "height", "width", "seconds")


class EvaluateModel:
    """Ray Data actor: load the checkpoint once, then predict and score batches of index rows."""

    def __init__(self, checkpoint: str, gt_json: str, gt_dir: str):
        self.model, self.trainable, _ = load_stage2(checkpoint)
        self.categories = self.trainable.categories
        _, _, self.gt = read_panoptic_annotations(gt_json)
        self.gt_dir = gt_dir

    def _predict(self, images: list[np.ndarray]) -> list:
        """Predictions of the batch at once; on failure one image at a time (an exception per image)."""
        try:
            return self.trainable.predict(self.model, images)
        except Exception:  # noqa: BLE001 - isolate the failing image
            out = []
            for im in images:
                try:
                    out.append(self.trainable.predict(self.model, [im])[0])
                except Exception as exc:  # noqa: BLE001
                    out.append(exc)
            return out

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        n = len(batch["image_id"])
        out = {k: [] for k in COLUMNS}
        images, ok = [], []
        errors = [""] * n
        for i in range(n):
            try:
                images.append(read_image_as_annotated(str(batch["file_name"][i]), int(batch["height"][i]),
                                                      int(batch["width"][i])))
                ok.append(i)
            except Exception as exc:  # noqa: BLE001 - recorded per image
                errors[i] = f"decode: {type(exc).__name__}: {exc}"
        preds = dict(zip(ok, self._predict(images))) if ok else {}
        sizes = {i: im.shape[:2] for i, im in zip(ok, images)}
        for i in range(n):
            image_id = int(batch["image_id"][i])
            pred = preds.get(i)
            if isinstance(pred, Exception):
                errors[i], pred = f"predict: {type(pred).__name__}: {pred}", None
            try:
                ann = self.gt[image_id]
                gt_map = read_id_map(self.gt_dir, ann["file_name"])
                pred_map = pred.id_map if pred is not None else np.zeros_like(gt_map, np.int32)
                pred_info = pred.segments_info if pred is not None else []
                stat = pq_stat_image(gt_map, ann["segments_info"], pred_map, pred_info, self.categories, image_id)
                gt_inst = [{"image_id": image_id, "category_id": int(s["category_id"]),
                            "iscrowd": int(s.get("iscrowd", 0)), "segmentation": rle(gt_map == s["id"]),
                            "area": int((gt_map == s["id"]).sum()), "bbox": mask_bbox(gt_map == s["id"])}
                           for s in ann["segments_info"] if self.categories[int(s["category_id"])].isthing]
                pred_inst = [dict(d, image_id=image_id) for d in (pred.instances or [])] if pred is not None else []
            except Exception as exc:  # noqa: BLE001 - no ground truth for it, a size mismatch...
                errors[i] = errors[i] or f"score: {type(exc).__name__}: {exc}"
                stat, gt_inst, pred_inst, pred_map, pred_info = None, [], [], np.zeros((1, 1), np.int32), []
            h, w = sizes.get(i, pred_map.shape)
            out["image_id"].append(image_id)
            out["error"].append(errors[i])
            out["pq_stat"].append(json.dumps(stat.to_dict()) if stat is not None else "")
            out["pred_png"].append(encode_png(pred_map) if pred is not None else b"")
            out["pred_segments_info"].append(json.dumps(pred_info))
            out["gt_instances"].append(json.dumps(gt_inst))
            out["pred_instances"].append(json.dumps(pred_inst))
            out["height"].append(int(h))
            out["width"].append(int(w))
            out["seconds"].append((time.perf_counter() - t0) / n)
        return {k: np.asarray(v, dtype=object) if k in ("pred_png", "error") else np.asarray(v) for k, v in out.items()}


class EvaluationMerge:
    """Driver side: merge the actors' rows one batch at a time (nothing is collected but small RLEs)."""

    def __init__(self, categories: dict[int, Category], task: str, keep_pictures: int = 0):
        self.categories, self.task, self.keep = categories, task, keep_pictures
        self.pq = PQEvaluator(categories)
        self.images, self.gt, self.dets, self.pictures, self.failed, self.seconds = [], [], [], [], {}, []

    def add(self, batch: dict) -> None:
        for i in range(len(batch["image_id"])):
            image_id = int(batch["image_id"][i])
            if batch["error"][i]:
                self.failed[image_id] = str(batch["error"][i])
            if batch["pq_stat"][i]:
                self.pq.add_stat(json.loads(batch["pq_stat"][i]))
            self.images.append({"id": image_id, "height": int(batch["height"][i]), "width": int(batch["width"][i])})
            self.gt += json.loads(batch["gt_instances"][i])
            self.dets += json.loads(batch["pred_instances"][i])
            self.seconds.append(float(batch["seconds"][i]))
            if len(self.pictures) < self.keep and batch["pred_png"][i]:
                self.pictures.append({k: batch[k][i] for k in ("image_id", "pred_png", "pred_segments_info")})

    def metrics(self) -> dict:
        pq = self.pq.evaluate()
        m = {k: pq[k] for k in ("pq", "sq", "rq", "pq_th", "sq_th", "rq_th", "pq_st", "sq_st", "rq_st")}
        if self.task == "instance":
            m.update(coco_mask_ap(self.images, self.gt, self.dets, self.categories))
            agnostic = coco_mask_ap(self.images, self.gt, self.dets, self.categories, use_cats=False)
            m.update({f"agnostic_{k}": agnostic[k] for k in ("ap", "ap50", "ap75")})
        m["num_images"] = len(self.images)
        m["failed_images"] = dict(self.failed)
        m["seconds_per_image"] = float(np.mean(self.seconds)) if self.seconds else 0.0
        return m


def validation_rows(output: str, image_ids: list[int]) -> list[dict]:
    ids = set(int(i) for i in image_ids)
    return [{k: r[k] for k in ("image_id", "file_name", "height", "width")}
            for r in read_index(join(output, "index", "index.parquet")) if int(r["image_id"]) in ids]


def evaluate_model(cfg, categories: dict[int, Category], output: str, checkpoint: str, image_ids: list[int]) -> dict:
    """Metrics of ``checkpoint`` on ``image_ids`` with an actor pool; ``pictures`` holds the first
    ``train.eval.num_pictures`` predictions for the report."""
    import ray

    ev = cfg.train.eval
    rows = validation_rows(output, image_ids)
    if not rows:
        raise ValueError(f"evaluation: no image of {output}/index matched the {len(image_ids)} validation ids")
    names = absolute_file_names({"file_name": [r["file_name"] for r in rows]}, os.getcwd())["file_name"]
    rows = [dict(r, file_name=f) for r, f in zip(rows, names)]
    set_timeouts(cfg.ray_data)
    blocks = [pa.Table.from_pylist(rows[i : i + ev.batch_size]) for i in range(0, len(rows), ev.batch_size)]
    ds = ray.data.from_arrow(blocks).map_batches(
        EvaluateModel,
        fn_constructor_kwargs={"checkpoint": checkpoint, "gt_json": join(output, "gt", "panoptic.json"),
                               "gt_dir": join(output, "gt", "panoptic")},
        compute=ray.data.ActorPoolStrategy(size=ev.num_actors),
        num_cpus=ev.cpus_per_actor,
        batch_size=ev.batch_size,
        batch_format="numpy",
    )
    merge = EvaluationMerge(categories, cfg.train.task, ev.num_pictures)
    for batch in actor_batches(ds, cfg.ray_data, "evaluation"):
        merge.add(batch)
    return {"metrics": merge.metrics(), "pictures": merge.pictures}


def evaluate_in_process(cfg, categories: dict[int, Category], output: str, checkpoint: str, image_ids: list[int]) -> dict:
    """The same evaluation in this process (a Tune trial scores a handful of images; an actor pool
    would cost more than the predictions)."""
    ev = cfg.train.eval
    model = EvaluateModel(checkpoint, join(output, "gt", "panoptic.json"), join(output, "gt", "panoptic"))
    rows = validation_rows(output, image_ids)
    merge = EvaluationMerge(categories, cfg.train.task)
    for i in range(0, len(rows), ev.batch_size):
        chunk = rows[i : i + ev.batch_size]
        merge.add(model({k: np.array([r[k] for r in chunk], dtype=object) for k in chunk[0]}))
    return merge.metrics()
