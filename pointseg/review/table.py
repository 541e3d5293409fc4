"""The per-image table of a run: scores without ground truth, scores with it, and the worst-first order.

One row per image of the run's index (``report.json["per_image"]``, in
worst-first order)::

    image_id, file_name, height, width, method
    error, stage          "" when labelled; else the reason and the stage that failed
                          (decode, points, generate[method], or "missing": no shard row)
    warnings              number of dropped points
    num_segments          segments in the pseudo label
    categories            category ids in the pseudo label and the ground truth
    uncertainty_mean, uncertain_fraction    pointseg.uncertainty.image_summary (None: no map)
    pq, mean_best_iou, tp, fp, fn           against ground truth (None: no ground truth)

``pq`` is the image's own panoptic quality: Kirillov et al. Eq. 1 over the
categories present in the image (ground truth or prediction), averaged;
``mean_best_iou`` the mean over its non-crowd ground-truth things of the best
IoU with any predicted thing (:func:`pointseg.metrics.instances.best_ious`):
the per-image figures of :func:`pointseg.evaluation.score`, which a pipeline
run stores in ``report.json["per_image"]``.

Worst first (:func:`worst_first`): failed images, then by the sort key:
``pq`` ascending (ties: more uncertain first), ``uncertainty`` descending,
``best_iou`` (``mean_best_iou``) ascending; a missing value sorts after every present one; last
tie-break: ``image_id``. The review page's JavaScript sorts by the same keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from scipy.stats import spearmanr

from pointseg.data.record import VOID, Category
from pointseg.metrics import pq_from_stat, pq_stat_image
from pointseg.metrics.instances import best_ious

#: Sort keys of the worst-first order and of the page's sort menu.
SORTS = ("pq", "uncertainty", "best_iou", "image_id")


def image_quality(gt_map: np.ndarray, gt_info: list[Mapping], pred_map: np.ndarray, pred_info: list[Mapping],
                  categories: Mapping[int, Category], image_id: int | None = None) -> dict:
    """``{"pq", "mean_best_iou", "tp", "fp", "fn"}`` of one image (definitions in the module docstring).

    ``pq`` is None when the image has no ground-truth segment and no
    prediction; ``mean_best_iou`` None when it has no non-crowd ground-truth thing.
    """
    stat = pq_stat_image(gt_map, gt_info, pred_map, pred_info, categories, image_id)
    pq = pq_from_stat(stat, categories)["pq"]
    things = [int(s["id"]) for s in gt_info
              if categories[int(s["category_id"])].isthing and not int(s.get("iscrowd", 0))]
    things = [g for g in things if (gt_map == g).any()]
    pred_things = [int(s["id"]) for s in pred_info
                   if categories[int(s["category_id"])].isthing and int(s["id"]) != VOID]
    ious = best_ious(gt_map, things, pred_map, pred_things)
    return {
        "pq": None if math.isnan(pq) else float(pq),
        "mean_best_iou": float(ious.mean()) if len(ious) else None,
        "tp": sum(c.tp for c in stat.per_cat.values()),
        "fp": sum(c.fp for c in stat.per_cat.values()),
        "fn": sum(c.fn for c in stat.per_cat.values()),
    }


def error_stage(error: str) -> str:
    """The stage named before the first ``:`` of a pipeline error (``decode: ValueError: ...``)."""
    return error.split(":", 1)[0].strip() if error else ""


def _missing_last(v, descending: bool = False) -> tuple:
    if v is None:
        return (1, 0.0)
    return (0, -v if descending else v)


def sort_key(row: Mapping, by: str) -> tuple:
    """The worst-first key of one table row for sort ``by`` (one of :data:`SORTS`)."""
    if by == "image_id":
        return (row["image_id"],)
    failed = 0 if row.get("error") else 1
    if by == "pq":
        return (failed, *_missing_last(row.get("pq")), *_missing_last(row.get("uncertainty_mean"), True),
                row["image_id"])
    if by == "uncertainty":
        return (failed, *_missing_last(row.get("uncertainty_mean"), True), row["image_id"])
    if by == "best_iou":
        return (failed, *_missing_last(row.get("mean_best_iou")), row["image_id"])
    raise ValueError(f"unknown sort {by!r}; choose one of {SORTS}")


def default_sort(rows: list[Mapping]) -> str:
    """``pq`` when any image has ground truth, else ``uncertainty``."""
    return "pq" if any(r.get("pq") is not None for r in rows) else "uncertainty"


def worst_first(rows: list[Mapping], by: str | None = None) -> list[Mapping]:
    """``rows`` sorted worst first by ``by`` (default :func:`default_sort`)."""
    by = by or default_sort(rows)
    return sorted(rows, key=lambda r: sort_key(r, by))


def uncertainty_quality_correlation(rows: list[Mapping]) -> dict | None:
    """Spearman's rank correlation between per-image ``uncertainty_mean`` and ``pq``.

    Over the labelled images that have both; None with fewer than 3 such
    images or a constant column. Negative: the more uncertain, the worse.
    """
    pairs = [(r["uncertainty_mean"], r["pq"]) for r in rows
             if not r.get("error") and r.get("uncertainty_mean") is not None and r.get("pq") is not None]
    if len(pairs) < 3:
        return None
    u, q = np.asarray(pairs, np.float64).T
    if np.ptp(u) == 0 or np.ptp(q) == 0:
        return None
    res = spearmanr(u, q)
    return {"spearman": float(res.statistic), "p_value": float(res.pvalue), "images": len(pairs)}
