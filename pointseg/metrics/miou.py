"""Semantic mean IoU of panoptic (pseudo) labels, from a streaming confusion matrix.

Each panoptic id map becomes a semantic map through its ``segments_info``
(pixel -> ``category_id``). With ``K`` categories, the confusion matrix
``M`` is ``(K, K+1)``: row = ground-truth class, column = predicted class, the
last column counting ground-truth pixels the prediction left unlabeled. Then

    IoU_c = M[c, c] / (sum_j M[c, j] + sum_i M[i, c] - M[c, c])

so an unlabeled predicted pixel is a miss (a FN of its ground-truth class).
Ground-truth pixels that are VOID (id 0), crowd (``iscrowd=1``), not listed in
``segments_info`` or of a category outside the table are ignored, together with
whatever was predicted there. ``mIoU`` is the mean of ``IoU_c`` over classes
with a non-empty union (present in ground truth or prediction); ``miou_th`` and
``miou_st`` restrict the mean to things and to stuff. All values are fractions
in ``[0, 1]``; an empty mean is ``nan``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from pointseg.data.coco_panoptic_io import as_categories
from pointseg.data.panoptic_format import unique_ids
from pointseg.data.record import VOID, Category

IGNORE = -1


def panoptic_to_semantic(
    id_map: np.ndarray,
    segments_info: Iterable[Mapping],
    class_index: Mapping[int, int],
    ignore_crowd: bool,
    strict: bool,
    image_id: int | None = None,
) -> np.ndarray:
    """``(H, W)`` panoptic ids -> ``(H, W) int64`` class indices, ``IGNORE`` (-1)
    for VOID and (with ``ignore_crowd``) crowd pixels.

    class_index : {category_id: row of the confusion matrix}.
    strict : raise on map ids missing from ``segments_info`` and on unknown
        categories (used for predictions); otherwise those pixels are ``IGNORE``.
    """
    ids, inverse = unique_ids(id_map)
    by_id = {int(s["id"]): s for s in segments_info}
    lut = np.full(len(ids), IGNORE, np.int64)
    for k, sid in enumerate(ids.tolist()):
        if sid == VOID:
            continue
        seg = by_id.get(sid)
        if seg is None:
            if strict:
                raise ValueError(f"image {image_id}: segment id {sid} is in the id map but not in segments_info")
            continue
        cat = int(seg["category_id"])
        if cat not in class_index:
            if strict:
                raise ValueError(f"image {image_id}: segment {sid} has unknown category_id {cat}")
            continue
        if ignore_crowd and int(seg.get("iscrowd", 0)) == 1:
            continue
        lut[k] = class_index[cat]
    return lut[inverse.reshape(np.shape(id_map))]


def semantic_confusion(gt_sem: np.ndarray, pred_sem: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K+1) int64`` confusion of two class-index maps (``IGNORE`` = -1).

    Pixels with ``gt_sem == IGNORE`` are dropped; ``pred_sem == IGNORE`` goes to
    the last column (unlabeled).
    """
    gt = np.asarray(gt_sem).reshape(-1)
    pred = np.asarray(pred_sem).reshape(-1)
    if gt.shape != pred.shape:
        raise ValueError(f"gt_sem {np.shape(gt_sem)} and pred_sem {np.shape(pred_sem)} differ in shape")
    keep = gt != IGNORE
    gt, pred = gt[keep], pred[keep]
    pred = np.where(pred == IGNORE, num_classes, pred)
    return np.bincount(gt * (num_classes + 1) + pred, minlength=num_classes * (num_classes + 1)).reshape(
        num_classes, num_classes + 1
    )


def miou_from_confusion(confusion: np.ndarray, categories: Mapping[int, Category]) -> dict:
    """Summary of a ``(K, K+1)`` confusion whose rows follow ``categories`` order.

    Returns ``{miou, miou_th, miou_st, pixel_accuracy, n, per_class}`` with
    ``per_class[category_id] = {iou, tp, gt, pred}`` (``iou`` is ``nan`` for a
    class absent from both; ``gt``/``pred`` are pixel counts).
    """
    conf = np.asarray(confusion, np.int64)
    k = conf.shape[0]
    tp = np.diag(conf[:, :k])
    gt = conf.sum(axis=1)
    pred = conf[:, :k].sum(axis=0)
    union = gt + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    cats = list(categories.values())
    isthing = np.array([bool(c.isthing) for c in cats], bool)

    def mean(sel: np.ndarray) -> float:
        v = iou[sel]
        v = v[~np.isnan(v)]
        return float(v.mean()) if len(v) else math.nan

    total = int(gt.sum())
    return {
        "miou": mean(np.ones(k, bool)),
        "miou_th": mean(isthing),
        "miou_st": mean(~isthing),
        "pixel_accuracy": float(tp.sum() / total) if total else math.nan,
        "n": int((~np.isnan(iou)).sum()),
        "per_class": {
            int(c.id): {"iou": float(iou[i]), "tp": int(tp[i]), "gt": int(gt[i]), "pred": int(pred[i])}
            for i, c in enumerate(cats)
        },
    }


class MIoUEvaluator:
    """Streaming semantic mIoU in the detectron2 ``reset / process / evaluate``
    interface; holds only the ``(K, K+1)`` confusion matrix."""

    def __init__(self, categories: Mapping[int, Category]):
        self.categories = as_categories(categories)
        self.class_index = {cid: i for i, cid in enumerate(self.categories)}
        self.reset()

    def reset(self) -> None:
        k = len(self.categories)
        self.confusion = np.zeros((k, k + 1), np.int64)
        self.num_images = 0

    def process(
        self,
        gt_id_map: np.ndarray,
        gt_segments_info: Iterable[Mapping],
        pred_id_map: np.ndarray,
        pred_segments_info: Iterable[Mapping],
        image_id: int | None = None,
    ) -> None:
        """Add one image. Id maps are ``(H, W)`` int (0 = VOID)."""
        if np.shape(gt_id_map) != np.shape(pred_id_map):
            raise ValueError(
                f"image {image_id}: gt_id_map {np.shape(gt_id_map)} and pred_id_map {np.shape(pred_id_map)} differ"
            )
        gt_sem = panoptic_to_semantic(gt_id_map, gt_segments_info, self.class_index, True, False, image_id)
        pred_sem = panoptic_to_semantic(pred_id_map, pred_segments_info, self.class_index, False, True, image_id)
        self.confusion += semantic_confusion(gt_sem, pred_sem, len(self.categories))
        self.num_images += 1

    def add_confusion(self, confusion: np.ndarray, num_images: int = 1) -> None:
        """Merge a confusion computed elsewhere (same category order)."""
        self.confusion += np.asarray(confusion, np.int64)
        self.num_images += num_images

    def evaluate(self) -> dict:
        out = miou_from_confusion(self.confusion, self.categories)
        out["num_images"] = self.num_images
        return out
