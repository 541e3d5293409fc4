"""Evaluation metrics: panoptic quality (:mod:`.pq`) and semantic mIoU (:mod:`.miou`).

Every evaluator has the detectron2 interface ``reset / process(gt_id_map,
gt_segments_info, pred_id_map, pred_segments_info, image_id) / evaluate()``
and keeps no masks between images.
"""

from __future__ import annotations

from collections.abc import Mapping

from pointseg.metrics.miou import MIoUEvaluator, miou_from_confusion, panoptic_to_semantic, semantic_confusion
from pointseg.metrics.pq import (
    PQEvaluator,
    PQStat,
    PQStatCat,
    pq_compute_files,
    pq_from_stat,
    pq_stat_image,
    run_on_files,
)

__all__ = [
    "MIoUEvaluator",
    "PQEvaluator",
    "PQStat",
    "PQStatCat",
    "evaluate_panoptic",
    "miou_from_confusion",
    "panoptic_to_semantic",
    "pq_compute_files",
    "pq_from_stat",
    "pq_stat_image",
    "semantic_confusion",
]


def evaluate_panoptic(
    gt_json: str,
    gt_dir: str,
    pred_json: str,
    pred_dir: str,
    categories: Mapping | None = None,
    missing: str = "fn",
    progress: bool = True,
) -> dict:
    """PQ and semantic mIoU of COCO panoptic predictions, one pass over the images.

    Arguments as :func:`~pointseg.metrics.pq.pq_compute_files` (any fsspec URI;
    ``missing="fn"`` counts an image without prediction as empty and lists it).

    Returns ``{"pq": {...}, "miou": {...}, "num_images", "missing_predictions"}``
    where ``"pq"`` is :func:`~pointseg.metrics.pq.pq_from_stat`'s dict and
    ``"miou"`` :func:`~pointseg.metrics.miou.miou_from_confusion`'s, all values
    fractions in ``[0, 1]``.
    """
    (pq_ev, miou_ev), info = run_on_files(
        lambda cats: [PQEvaluator(cats), MIoUEvaluator(cats)],
        gt_json,
        gt_dir,
        pred_json,
        pred_dir,
        categories,
        missing,
        progress,
    )
    return {"pq": pq_ev.evaluate(), "miou": miou_ev.evaluate(), **info}
