"""Panoptic Quality (Kirillov et al., "Panoptic Segmentation", CVPR 2019).

For one category ``c``, summed over all images, a predicted segment ``p`` and a
ground-truth segment ``g`` of category ``c`` match (true positive) when
``IoU(p, g) > 0.5``; matching is then unique (Kirillov et al. Theorem 1). With
TP, FP, FN the matched pairs, unmatched predictions and unmatched ground truth,

    PQ_c = sum_{(p,g) in TP} IoU(p, g) / (|TP| + |FP|/2 + |FN|/2)      (Eq. 1)
         = SQ_c * RQ_c,
    SQ_c = sum_{TP} IoU / |TP|,   RQ_c = |TP| / (|TP| + |FP|/2 + |FN|/2)  (Eq. 2)

and PQ, SQ, RQ are the plain means over categories, over things only and over
stuff only. Every number here is a fraction in ``[0, 1]`` (as panopticapi
returns; its printed table multiplies by 100).

Exactly as ``panopticapi.evaluation.pq_compute`` (the COCO reference):

* VOID (id 0) pixels of the ground truth are removed from the union:
  ``IoU = |p∩g| / (|p| + |g| - |p∩g| - |p∩VOID|)``.
* ``|g|`` is the ``area`` of ``segments_info`` when present (panopticapi
  always uses the JSON area), else counted in the map; ``|p|`` is always
  counted in the prediction map.
* Crowd ground truth (``iscrowd=1``) never matches and is never a FN. An
  unmatched prediction is not a FP when more than half of its pixels lie on
  VOID plus the crowd region of its own category (the crowd segment listed last
  in ``segments_info`` when a category has several).
* Categories with no ground truth and no prediction anywhere (TP+FP+FN = 0)
  are left out of the means and reported with PQ = SQ = RQ = 0; a mean over an
  empty set (e.g. stuff on a things-only dataset) is ``nan`` (panopticapi
  raises ZeroDivisionError there).
* ``isthing`` comes from the category table, never from ``segments_info``.
* A predicted segment whose ``category_id`` is not in the table, a prediction
  map id missing from ``segments_info`` or a ``segments_info`` id missing from
  the map raises ``ValueError`` naming the image and segment. Ground-truth ids
  absent from ``segments_info`` are ignored (neither VOID nor a segment).

Streaming: :func:`pq_stat_image` turns one image into a :class:`PQStat`
(per-category TP, FP, FN, IoU sum: a few numbers, not masks); stats add up
with ``+=`` and ship through Ray as :meth:`PQStat.to_dict`. :class:`PQEvaluator`
wraps this in the detectron2 ``reset / process / evaluate`` interface.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from pointseg.data.coco_panoptic_io import as_categories, iter_panoptic_pairs
from pointseg.data.panoptic_format import unique_ids
from pointseg.data.record import VOID, Category

#: Keys of the summary dict returned by :func:`pq_from_stat`.
SUMMARY_KEYS = ("pq", "sq", "rq", "pq_th", "sq_th", "rq_th", "pq_st", "sq_st", "rq_st", "n", "n_th", "n_st")


@dataclass
class PQStatCat:
    """Counts of one category: ``tp, fp, fn`` and ``iou`` = sum of IoU over TP."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou: float = 0.0

    def __iadd__(self, other: "PQStatCat") -> "PQStatCat":
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou += other.iou
        return self


class PQStat:
    """Per-category :class:`PQStatCat`, summed over any number of images."""

    def __init__(self) -> None:
        self.per_cat: dict[int, PQStatCat] = {}

    def __getitem__(self, category_id: int) -> PQStatCat:
        return self.per_cat.setdefault(int(category_id), PQStatCat())

    def __iadd__(self, other: "PQStat") -> "PQStat":
        for cid, s in other.per_cat.items():
            acc = self[cid]
            acc += s
        return self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PQStat) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict[str, list]:
        """Columnar, JSON- and Arrow-friendly form (fixed keys, equal-length lists):
        ``{category_id, tp, fp, fn, iou}``, sorted by category id."""
        cids = sorted(self.per_cat)
        return {
            "category_id": cids,
            "tp": [int(self.per_cat[c].tp) for c in cids],
            "fp": [int(self.per_cat[c].fp) for c in cids],
            "fn": [int(self.per_cat[c].fn) for c in cids],
            "iou": [float(self.per_cat[c].iou) for c in cids],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "PQStat":
        """Inverse of :meth:`to_dict` (accepts lists or numpy arrays)."""
        out = cls()
        for c, tp, fp, fn, iou in zip(d["category_id"], d["tp"], d["fp"], d["fn"], d["iou"]):
            acc = out[int(c)]
            acc += PQStatCat(int(tp), int(fp), int(fn), float(iou))
        return out


def _segments_by_id(segments_info: Iterable[Mapping], image_id, which: str) -> dict[int, Mapping]:
    out: dict[int, Mapping] = {}
    for seg in segments_info:
        for key in ("id", "category_id"):
            if key not in seg:
                raise ValueError(f"image {image_id}: {which} segment {dict(seg)} has no field {key!r}")
        sid = int(seg["id"])
        if sid == VOID:
            raise ValueError(f"image {image_id}: {which} segment id 0 is reserved for VOID")
        if sid in out:
            raise ValueError(f"image {image_id}: {which} segment id {sid} appears twice in segments_info")
        out[sid] = seg
    return out


def pq_stat_image(
    gt_id_map: np.ndarray,
    gt_segments_info: Iterable[Mapping],
    pred_id_map: np.ndarray,
    pred_segments_info: Iterable[Mapping],
    categories: Mapping[int, object],
    image_id: int | None = None,
) -> PQStat:
    """Per-category TP/FP/FN/IoU-sum of one image (rules in the module docstring).

    Parameters
    ----------
    gt_id_map, pred_id_map : (H, W) int
        Panoptic id maps, 0 = VOID.
    gt_segments_info, pred_segments_info : list of dict
        COCO ``segments_info`` (``id, category_id``, optional ``iscrowd``,
        ``area``).
    categories : {category_id: Category}
        Only its keys are used here (unknown predicted categories raise).
    image_id : used in error messages only.
    """
    gt_id_map = np.asarray(gt_id_map)
    pred_id_map = np.asarray(pred_id_map)
    if gt_id_map.shape != pred_id_map.shape or gt_id_map.ndim != 2:
        raise ValueError(
            f"image {image_id}: gt_id_map {gt_id_map.shape} and pred_id_map {pred_id_map.shape} must be the same (H, W)"
        )
    gt_segms = _segments_by_id(gt_segments_info, image_id, "gt")
    pred_segms = _segments_by_id(pred_segments_info, image_id, "predicted")

    # Joint histogram of (gt id, pred id): the confusion of segments.
    gt_ids, gt_inv = unique_ids(gt_id_map)
    pred_ids, pred_inv = unique_ids(pred_id_map)
    n_pred = len(pred_ids)
    joint = np.bincount(
        gt_inv.reshape(-1).astype(np.int64) * n_pred + pred_inv.reshape(-1), minlength=len(gt_ids) * n_pred
    ).reshape(len(gt_ids), n_pred)
    gt_ids = gt_ids.tolist()
    pred_ids = pred_ids.tolist()
    pred_area = dict(zip(pred_ids, joint.sum(axis=0).tolist()))
    gt_count = dict(zip(gt_ids, joint.sum(axis=1).tolist()))

    # Prediction sanity checks (panopticapi raises on each of these).
    missing = [p for p in pred_ids if p != VOID and p not in pred_segms]
    if missing:
        raise ValueError(f"image {image_id}: predicted segment ids {missing} are in the id map but not in segments_info")
    absent = [p for p in pred_segms if p not in pred_area]
    if absent:
        raise ValueError(f"image {image_id}: predicted segment ids {absent} are in segments_info but not in the id map")
    for p, seg in pred_segms.items():
        if int(seg["category_id"]) not in categories:
            raise ValueError(f"image {image_id}: predicted segment {p} has unknown category_id {seg['category_id']}")

    def gt_area(g: int) -> int:
        a = gt_segms[g].get("area")
        return int(a) if a is not None else gt_count.get(g, 0)

    void_row = joint[gt_ids.index(VOID)] if VOID in gt_ids else np.zeros(n_pred, np.int64)
    void_of = dict(zip(pred_ids, void_row.tolist()))

    stat = PQStat()
    gt_matched: set[int] = set()
    pred_matched: set[int] = set()
    # Kirillov et al. Sec. 4.1: a match is IoU > 0.5, unique by Theorem 1.
    rows, cols = np.nonzero(joint)
    for r, c in zip(rows.tolist(), cols.tolist()):
        g, p = gt_ids[r], pred_ids[c]
        if g not in gt_segms or p not in pred_segms:
            continue
        if int(gt_segms[g].get("iscrowd", 0)) == 1:
            continue
        cat = int(gt_segms[g]["category_id"])
        if cat != int(pred_segms[p]["category_id"]):
            continue
        inter = int(joint[r, c])
        union = pred_area[p] + gt_area(g) - inter - void_of[p]
        iou = inter / union
        if iou > 0.5:
            stat[cat].tp += 1
            stat[cat].iou += iou
            gt_matched.add(g)
            pred_matched.add(p)

    crowd_of_cat: dict[int, int] = {}
    for g, seg in gt_segms.items():
        if g in gt_matched:
            continue
        if int(seg.get("iscrowd", 0)) == 1:
            crowd_of_cat[int(seg["category_id"])] = g
            continue
        stat[int(seg["category_id"])].fn += 1

    for p, seg in pred_segms.items():
        if p in pred_matched:
            continue
        cat = int(seg["category_id"])
        ignored = void_of[p]
        crowd = crowd_of_cat.get(cat)
        if crowd is not None and crowd in gt_ids:
            ignored += int(joint[gt_ids.index(crowd), pred_ids.index(p)])
        if ignored / pred_area[p] > 0.5:
            continue
        stat[cat].fp += 1
    return stat


def _isthing(category) -> bool:
    if isinstance(category, Category):
        return bool(category.isthing)
    return int(category["isthing"]) == 1


def pq_from_stat(stat: PQStat, categories: Mapping[int, object]) -> dict:
    """Summary of accumulated counts (Eq. 1-2), means in category-table order.

    Returns ``{pq, sq, rq, pq_th, sq_th, rq_th, pq_st, sq_st, rq_st, n, n_th,
    n_st, per_class}`` with ``per_class[category_id] = {pq, sq, rq, tp, fp,
    fn}`` for every category of the table; ``n*`` count the categories that
    entered each mean.
    """
    per_class: dict[int, dict] = {}
    sums = {None: [0.0, 0.0, 0.0, 0], True: [0.0, 0.0, 0.0, 0], False: [0.0, 0.0, 0.0, 0]}
    for cid, category in categories.items():
        s = stat.per_cat.get(int(cid), PQStatCat())
        row = {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": s.tp, "fp": s.fp, "fn": s.fn}
        per_class[int(cid)] = row
        if s.tp + s.fp + s.fn == 0:
            continue
        denom = s.tp + 0.5 * s.fp + 0.5 * s.fn
        row["pq"] = s.iou / denom
        row["sq"] = s.iou / s.tp if s.tp else 0.0
        row["rq"] = s.tp / denom
        for key in (None, _isthing(category)):
            acc = sums[key]
            acc[0] += row["pq"]
            acc[1] += row["sq"]
            acc[2] += row["rq"]
            acc[3] += 1
    out: dict = {}
    for key, suffix in ((None, ""), (True, "_th"), (False, "_st")):
        pq, sq, rq, n = sums[key]
        for name, v in (("pq", pq), ("sq", sq), ("rq", rq)):
            out[name + suffix] = v / n if n else math.nan
        out["n" + suffix] = n
    out["per_class"] = per_class
    return out


class PQEvaluator:
    """Streaming PQ in the detectron2 evaluator interface.

    ``process`` takes ONE image and keeps only its per-category counts, never
    its masks. ``evaluate`` returns :func:`pq_from_stat`'s dict plus
    ``num_images``.

    Example
    -------
    >>> ev = PQEvaluator(categories)
    >>> for gt_map, gt_info, pred_map, pred_info in pairs:
    ...     ev.process(gt_map, gt_info, pred_map, pred_info)
    >>> ev.evaluate()["pq"]
    """

    def __init__(self, categories: Mapping[int, Category]):
        self.categories = as_categories(categories)
        self.reset()

    def reset(self) -> None:
        self.stat = PQStat()
        self.num_images = 0

    def process(
        self,
        gt_id_map: np.ndarray,
        gt_segments_info: Iterable[Mapping],
        pred_id_map: np.ndarray,
        pred_segments_info: Iterable[Mapping],
        image_id: int | None = None,
    ) -> None:
        self.stat += pq_stat_image(
            gt_id_map, gt_segments_info, pred_id_map, pred_segments_info, self.categories, image_id
        )
        self.num_images += 1

    def add_stat(self, stat: PQStat | Mapping, num_images: int = 1) -> None:
        """Merge counts computed elsewhere (e.g. a Ray actor's ``PQStat.to_dict()``)."""
        self.stat += stat if isinstance(stat, PQStat) else PQStat.from_dict(stat)
        self.num_images += num_images

    def evaluate(self) -> dict:
        out = pq_from_stat(self.stat, self.categories)
        out["num_images"] = self.num_images
        return out


def process_pair(evaluators, pair) -> None:
    """Feed one :class:`~pointseg.data.coco_panoptic_io.PanopticPair` to evaluators.

    A missing prediction is an empty one: every non-crowd ground-truth segment
    is a FN (and, for mIoU, every labelled pixel a miss).
    """
    pred_map = pair.pred_id_map
    pred_info = pair.pred_segments_info
    if pred_map is None:
        pred_map = np.zeros_like(pair.gt_id_map)
        pred_info = []
    for ev in evaluators:
        ev.process(pair.gt_id_map, pair.gt_segments_info, pred_map, pred_info, image_id=pair.image_id)


def run_on_files(
    evaluators_from_categories,
    gt_json: str,
    gt_folder: str,
    pred_json: str,
    pred_folder: str,
    categories: Mapping | None = None,
    missing: str = "fn",
    progress: bool = True,
) -> tuple[list, dict]:
    """Stream COCO panoptic files through evaluators built by
    ``evaluators_from_categories(categories) -> list``.

    Returns ``(evaluators, info)`` with ``info = {num_images,
    missing_predictions: [image ids]}``. ``missing`` is ``"fn"`` (count the
    image as an empty prediction, warn and report the ids) or ``"raise"``
    (panopticapi's behaviour).
    """
    from tqdm.auto import tqdm

    if missing not in ("fn", "raise"):
        raise ValueError(f"missing must be 'fn' or 'raise', got {missing!r}")
    gt_categories, n_images, pairs = iter_panoptic_pairs(gt_json, gt_folder, pred_json, pred_folder)
    categories = as_categories(categories) if categories is not None else gt_categories
    evaluators = evaluators_from_categories(categories)
    missing_ids: list[int] = []
    for pair in tqdm(pairs, total=n_images, desc="evaluate", unit="img", disable=not progress):
        if pair.pred_id_map is None:
            if missing == "raise":
                raise ValueError(f"{pred_json}: no prediction for image {pair.image_id}")
            missing_ids.append(pair.image_id)
        process_pair(evaluators, pair)
    if missing_ids:
        warnings.warn(
            f"{pred_json}: {len(missing_ids)} of {n_images} images have no prediction and count as empty "
            f"predictions (all ground truth FN): {missing_ids[:10]}",
            stacklevel=2,
        )
    return evaluators, {"num_images": n_images, "missing_predictions": missing_ids}


def pq_compute_files(
    gt_json: str,
    gt_folder: str,
    pred_json: str,
    pred_folder: str,
    categories: Mapping | None = None,
    missing: str = "fn",
    progress: bool = True,
) -> dict:
    """PQ of COCO panoptic prediction files against ground-truth files.

    Parameters
    ----------
    gt_json, pred_json : URI of a COCO panoptic JSON (any fsspec URI).
    gt_folder, pred_folder : URI of the folder with the PNGs named by each
        annotation's ``file_name``.
    categories : category table; default the ground-truth JSON's
        ``categories`` (as panopticapi).
    missing : what to do with a ground-truth image that has no predicted
        annotation. panopticapi raises ``Exception('no prediction for the image
        with id: ...')``; here the default ``"fn"`` counts it as an empty
        prediction (all its non-crowd ground truth are FN), warns, and lists the
        ids under ``missing_predictions`` in the result; ``"raise"`` raises.
        Predictions of images absent from the ground truth are ignored.

    Returns the dict of :func:`pq_from_stat` plus ``num_images`` and
    ``missing_predictions``. Streams one image at a time.
    """
    (ev,), info = run_on_files(
        lambda cats: [PQEvaluator(cats)], gt_json, gt_folder, pred_json, pred_folder, categories, missing, progress
    )
    out = ev.evaluate()
    out.update(info)
    return out
