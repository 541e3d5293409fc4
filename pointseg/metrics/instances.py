"""Instance quality of panoptic labels: COCO mask AP and the mean best IoU per object.

PQ_th with the background VOID forgives a thing that floods the background
(VOID pixels leave the IoU's union); these two measures do not:

* **mask AP, AP50** -- pycocotools ``COCOeval(iouType="segm")`` of the predicted
  thing segments against the ground-truth thing segments (``iscrowd`` kept, so
  crowd regions are matched and ignored the COCO way). A pseudo label has no
  confidence, so every segment gets score 1.0 (ties keep segment order).
* **mean best IoU** -- for every non-crowd ground-truth thing ``g``,
  ``max_p |g ∩ p| / |g ∪ p|`` over the predicted thing segments ``p`` (any
  class; plain IoU, VOID pixels count), averaged over the objects. An object
  no prediction touches scores 0. A thing that floods the background of a real
  COCO image scores about 0.2 here.

:class:`InstanceQualityEvaluator` follows the ``reset / process / evaluate``
pattern of the other evaluators; :func:`coco_mask_ap` is the pycocotools call
shared with stage-2 model evaluation (scored detections).
"""

from __future__ import annotations

import contextlib
import io
from typing import Iterable, Mapping

import numpy as np

from pointseg.data.coco_panoptic_io import as_categories
from pointseg.data.panoptic_format import unique_ids
from pointseg.data.record import VOID, Category


def rle(mask: np.ndarray) -> dict:
    """COCO RLE of a boolean ``(H, W)`` mask, counts as a string (JSON-able)."""
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def mask_bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def coco_mask_ap(images: list[dict], gt_annotations: list[dict], detections: list[dict],
                 categories: Mapping[int, Category], use_cats: bool = True) -> dict:
    """COCO mask AP, AP50, AP75 with pycocotools.

    images : ``{id, height, width}``; gt_annotations : ``{image_id, category_id,
    iscrowd, segmentation (RLE), area, bbox}``; detections : ``{image_id,
    category_id, score, segmentation}``. Only thing categories are scored.
    ``use_cats=False`` is pycocotools' class-agnostic mode (``params.useCats = 0``):
    a detection may match an object of any class, so the score measures the
    masks alone, not the classifier.
    Returns ``ap, ap50, ap75`` in [0, 1] (0 when there is nothing to match:
    pycocotools' -1), ``num_detections`` and ``num_gt``.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {"images": list(images), "annotations": [dict(a, id=i + 1) for i, a in enumerate(gt_annotations)],
          "categories": [{"id": c.id, "name": c.name} for c in categories.values() if c.isthing]}
    if not detections or not gt["annotations"]:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0, "num_detections": len(detections), "num_gt": len(gt["annotations"])}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.params.useCats = int(use_cats)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50, ap75 = (max(float(v), 0.0) for v in ev.stats[:3])
    return {"ap": ap, "ap50": ap50, "ap75": ap75, "num_detections": len(detections), "num_gt": len(gt["annotations"])}


def best_ious(gt_map: np.ndarray, gt_ids: list[int], pred_map: np.ndarray, pred_ids: list[int]) -> np.ndarray:
    """``(len(gt_ids),)`` best IoU of each ground-truth segment with any of ``pred_ids`` (0 if none)."""
    if not gt_ids:
        return np.zeros(0)
    if not pred_ids:
        return np.zeros(len(gt_ids))
    g_index = {g: i for i, g in enumerate(gt_ids)}
    p_index = {p: i for i, p in enumerate(pred_ids)}
    g_lut = np.vectorize(lambda v: g_index.get(int(v), -1), otypes=[np.int64])
    p_lut = np.vectorize(lambda v: p_index.get(int(v), -1), otypes=[np.int64])
    gu, g_inv = unique_ids(gt_map)
    pu, p_inv = unique_ids(pred_map)
    gi = g_lut(gu)[g_inv.ravel()]
    pi = p_lut(pu)[p_inv.ravel()]
    G, P = len(gt_ids), len(pred_ids)
    g_area = np.bincount(gi[gi >= 0], minlength=G).astype(np.float64)
    p_area = np.bincount(pi[pi >= 0], minlength=P).astype(np.float64)
    both = (gi >= 0) & (pi >= 0)
    inter = np.bincount(gi[both] * P + pi[both], minlength=G * P).reshape(G, P).astype(np.float64)
    union = g_area[:, None] + p_area[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return iou.max(1)


class InstanceQualityEvaluator:
    """Mask AP (score 1.0 per segment) and mean best IoU of thing segments (module docstring)."""

    def __init__(self, categories: Mapping[int, Category] | Iterable):
        self.categories = as_categories(categories)
        self.reset()

    def reset(self) -> None:
        self.images: list[dict] = []
        self.gt: list[dict] = []
        self.dets: list[dict] = []
        self.ious: list[float] = []
        self.per_image: dict[int, float] = {}

    def _things(self, info: Iterable[Mapping], crowd: bool | None) -> list[Mapping]:
        out = []
        for s in info:
            cat = self.categories.get(int(s["category_id"]))
            if cat is None or not cat.isthing:
                continue
            if crowd is not None and bool(int(s.get("iscrowd", 0))) != crowd:
                continue
            out.append(s)
        return out

    def process(self, gt_map: np.ndarray, gt_info: list[Mapping], pred_map: np.ndarray, pred_info: list[Mapping],
                image_id: int) -> float | None:
        """Add one image; returns its mean best IoU (None when it has no ground-truth thing)."""
        gt_map, pred_map = np.asarray(gt_map), np.asarray(pred_map)
        if gt_map.shape != pred_map.shape:
            raise ValueError(f"image {image_id}: prediction {pred_map.shape} and ground truth {gt_map.shape} differ in size")
        h, w = gt_map.shape
        image_id = int(image_id)
        self.images.append({"id": image_id, "height": int(h), "width": int(w)})
        for s in self._things(gt_info, None):
            m = gt_map == int(s["id"])
            if not m.any():
                continue
            self.gt.append({"image_id": image_id, "category_id": int(s["category_id"]),
                            "iscrowd": int(s.get("iscrowd", 0)), "segmentation": rle(m), "area": int(m.sum()),
                            "bbox": mask_bbox(m)})
        pred_things = [s for s in self._things(pred_info, None) if int(s["id"]) != VOID]
        for s in pred_things:
            m = pred_map == int(s["id"])
            if m.any():
                self.dets.append({"image_id": image_id, "category_id": int(s["category_id"]), "score": 1.0,
                                  "segmentation": rle(m)})
        gt_ids = [int(s["id"]) for s in self._things(gt_info, False) if (gt_map == int(s["id"])).any()]
        ious = best_ious(gt_map, gt_ids, pred_map, [int(s["id"]) for s in pred_things])
        self.ious += ious.tolist()
        mean = float(ious.mean()) if len(ious) else None
        if mean is not None:
            self.per_image[image_id] = mean
        return mean

    def evaluate(self) -> dict:
        """``mask_ap``, ``mask_ap50``, ``mask_ap75``, ``mean_best_iou`` (None without objects), ``num_objects``."""
        ap = coco_mask_ap(self.images, self.gt, self.dets, self.categories)
        return {"mask_ap": ap["ap"], "mask_ap50": ap["ap50"], "mask_ap75": ap["ap75"],
                "mean_best_iou": float(np.mean(self.ious)) if self.ious else None, "num_objects": len(self.ious),
                "num_segments": ap["num_detections"]}
