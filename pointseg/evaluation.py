"""Label images in this process with any generator and score the labels: the one quality harness.

No Ray here: the pieces are plain functions over the files
:func:`pointseg.data.prepare.prepare_inputs` wrote under an output root
(``index/index.parquet``, ``gt/panoptic.json`` + ``gt/panoptic/``)::

    gt = GroundTruth(output)
    rows = split_rows(gt.rows(read_index(join(output, "index", "index.parquet"))), "report")
    result = score(label_rows(generator, rows, batch_size=8), gt)
    result["pq"], result["mask_ap"], result["mean_best_iou"], result["failed"]

or in one call, :func:`evaluate_generator`.

Labelling (:func:`label_rows`) follows the pipeline's input rules: each index
row's image is decoded with :func:`pointseg.data.images.read_image_as_annotated`
and its points are validated with :func:`pointseg.data.points.validate_points`
(both through :func:`pointseg.train.rows.index_record`, the stage-1 decoder), so
every stage sees the same pixels and the same points. A batched generator
receives ``batch_size`` images per call (its batching reaches the network); when
such a call fails, the chunk's images are labelled one at a time so that only
the failing image fails. A failing image (unreadable file, no valid point,
generator error, wrong-sized or inconsistent label) yields ``None`` with its
reason: it is scored as an empty prediction (all its segments false negatives)
and listed in ``failed``; it is never skipped.

Scores (:func:`score`), all fractions in ``[0, 1]``:

* PQ / SQ / RQ over all, thing and stuff categories
  (:class:`pointseg.metrics.PQEvaluator`, equal to ``panopticapi``) and
  semantic mIoU (:class:`pointseg.metrics.MIoUEvaluator`);
* COCO mask AP / AP50 / AP75 (pycocotools, score 1 per segment) and the mean
  best IoU per ground-truth thing
  (:class:`pointseg.metrics.instances.InstanceQualityEvaluator`);
* per image: PQ (the mean over the categories that occur in that image's
  ground truth or prediction, i.e. PQ of the image alone) and the mean best IoU
  of its things (``None`` without things);
* ``failed`` ``{image_id: reason}``, ``num_images`` and the seconds spent
  labelling (decode included) and scoring.

A mean over an empty set (PQ_st on a things-only dataset) is ``None``, so the
result is strict JSON.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Iterable, Iterator, Mapping

import numpy as np
from tqdm import tqdm

from pointseg.data.coco_panoptic_io import read_id_map, read_panoptic_annotations
from pointseg.data.prepare import join, read_index
from pointseg.data.record import Category, Points
from pointseg.generators.base import PseudoLabel, PseudoLabelGenerator
from pointseg.metrics import MIoUEvaluator, PQEvaluator
from pointseg.metrics.instances import InstanceQualityEvaluator
from pointseg.metrics.pq import pq_from_stat, pq_stat_image
from pointseg.train.rows import index_record
from pointseg.viz.overlay import side_by_side, stack

log = logging.getLogger("pointseg.evaluation")

#: Summary keys of :func:`score` copied from :func:`pointseg.metrics.pq.pq_from_stat`.
PQ_KEYS = ("pq", "sq", "rq", "pq_th", "sq_th", "rq_th", "pq_st", "sq_st", "rq_st", "n", "n_th", "n_st")
#: ``--split`` values of :func:`split_rows`.
SPLITS = ("choose", "report", "all")


def finite_or_none(v):
    """NaN (a mean over no category) becomes None: ``null`` in strict JSON."""
    return None if isinstance(v, float) and math.isnan(v) else v


class GroundTruth:
    """The ground truth an output root holds (``gt/panoptic.json`` + PNGs), read one image at a time."""

    def __init__(self, output: str):
        self.folder = join(output, "gt", "panoptic")
        self.categories, _, self.annotations = read_panoptic_annotations(join(output, "gt", "panoptic.json"))

    def __contains__(self, image_id) -> bool:
        return int(image_id) in self.annotations

    def load(self, image_id: int) -> tuple[np.ndarray, list[dict]]:
        """``(id_map (H, W) int, segments_info)`` of one image."""
        ann = self.annotations[int(image_id)]
        return read_id_map(self.folder, ann["file_name"]), ann["segments_info"]

    def rows(self, rows: Iterable[Mapping]) -> list[Mapping]:
        """The index rows that have ground truth (an image without any segment has none to score)."""
        return [r for r in rows if int(r["image_id"]) in self.annotations]


def split_rows(rows: Iterable[Mapping], split: str) -> list[Mapping]:
    """Rows sorted by image id, then ``choose`` = the first half, ``report`` = the second, ``all``.

    Settings are chosen on one half and reported on the other (80 images: ids
    ranked 1-40 and 41-80); with an odd count the extra image goes to ``report``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    ordered = sorted(rows, key=lambda r: int(r["image_id"]))
    half = len(ordered) // 2
    return {"choose": ordered[:half], "report": ordered[half:], "all": ordered}[split]


def _check_label(label, image: np.ndarray) -> None:
    if not isinstance(label, PseudoLabel):
        raise TypeError(f"the generator returned {type(label).__name__}, not a PseudoLabel")
    if np.shape(label.id_map) != image.shape[:2]:
        raise ValueError(f"label is {np.shape(label.id_map)} but the image is {image.shape[:2]} (H, W)")


def _label_chunk(generator: PseudoLabelGenerator, images: list[np.ndarray], points: list) -> list[tuple]:
    """``[(label | None, error)]`` for one chunk: one batched call, else one call per image."""
    name = getattr(generator, "name", type(generator).__name__)
    try:
        labels = generator(images, points)
        if len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        for lab, im in zip(labels, images):
            _check_label(lab, im)
        return [(lab, "") for lab in labels]
    except Exception as exc:  # noqa: BLE001 - isolate the failing image below
        if len(images) == 1:
            return [(None, f"generate[{name}]: {type(exc).__name__}: {exc}")]
        log.info("batched call of %s failed (%s: %s); labelling the %d images one by one",
                 name, type(exc).__name__, exc, len(images))
    return [_label_chunk(generator, [im], [pts])[0] for im, pts in zip(images, points)]


def label_rows(generator: PseudoLabelGenerator, rows: Iterable[Mapping], batch_size: int = 8,
               progress: bool = True) -> Iterator[tuple[Mapping, PseudoLabel | None, str]]:
    """Label index rows in order: ``(row, label, "")`` or ``(row, None, reason)`` per row.

    ``rows``: ``OUTPUT/index/index.parquet`` rows (``image_id, file_name,
    height, width, points``). Images are decoded and points validated by the
    pipeline's rules against ``generator.categories`` (module docstring); the
    generator is called on chunks of ``batch_size`` decoded images, and one
    image at a time to isolate a failure.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = list(rows)
    bar = tqdm(total=len(rows), desc=f"label {getattr(generator, 'name', '')}", unit="img", disable=not progress)
    try:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            out: list[tuple] = [(None, "")] * len(chunk)
            good, images, points = [], [], []
            for i, row in enumerate(chunk):
                if row.get("error"):
                    out[i] = (None, f"index: {row['error']}")
                    continue
                try:
                    rec = index_record(dict(row), generator.categories)
                except Exception as exc:  # noqa: BLE001 - one bad image never sinks the run
                    out[i] = (None, f"input: {type(exc).__name__}: {exc}")
                    continue
                good.append(i)
                images.append(rec.image)
                points.append(rec.points)
            if good:
                for i, res in zip(good, _label_chunk(generator, images, points)):
                    out[i] = res
            for row, (label, error) in zip(chunk, out):
                if error:
                    log.warning("image %s: %s", row["image_id"], error)
                yield row, label, error
            bar.update(len(chunk))
    finally:
        bar.close()


def score(labelled: Iterable[tuple[Mapping, PseudoLabel | None, str]], gt: GroundTruth,
          categories: Mapping[int, Category] | None = None) -> dict:
    """Score labelled rows (:func:`label_rows`) against ``gt`` (module docstring).

    ``categories`` default to the ground truth's. A label the metrics refuse
    (a segment id missing from its ``segments_info``, an unknown category) is
    a failed image too. Returns ``pq, sq, rq, pq_th, ..., rq_st, n, n_th, n_st,
    per_class, miou, mask_ap, mask_ap50, mask_ap75, mean_best_iou,
    num_objects, num_segments, per_image {id: {pq, mean_best_iou}}, failed
    {id: reason}, num_images, label_seconds, score_seconds``.
    """
    cats = dict(categories or gt.categories)
    pq_ev, miou_ev, inst_ev = PQEvaluator(cats), MIoUEvaluator(cats), InstanceQualityEvaluator(cats)
    per_image: dict[int, dict] = {}
    failed: dict[int, str] = {}
    label_s = score_s = 0.0
    it = iter(labelled)
    while True:
        t0 = time.perf_counter()
        item = next(it, None)
        t1 = time.perf_counter()
        label_s += t1 - t0
        if item is None:
            break
        row, label, error = item
        image_id = int(row["image_id"])
        gt_map, gt_info = gt.load(image_id)
        pred = None
        if label is not None:
            pred = (np.asarray(label.id_map), label.segments_info)
            try:
                stat = pq_stat_image(gt_map, gt_info, *pred, cats, image_id)
            except Exception as exc:  # noqa: BLE001 - an inconsistent label is a failed image, not a crash
                error, pred = f"label: {type(exc).__name__}: {exc}", None
                log.warning("image %s: %s", image_id, error)
        if pred is None:
            failed[image_id] = error or "no label"
            pred = (np.zeros_like(gt_map), [])
            stat = pq_stat_image(gt_map, gt_info, *pred, cats, image_id)
        pq_ev.add_stat(stat)
        miou_ev.process(gt_map, gt_info, *pred, image_id=image_id)
        mbi = inst_ev.process(gt_map, gt_info, *pred, image_id=image_id)
        per_image[image_id] = {"pq": finite_or_none(pq_from_stat(stat, cats)["pq"]), "mean_best_iou": mbi}
        score_s += time.perf_counter() - t1
    t2 = time.perf_counter()
    pq = pq_ev.evaluate()
    out = {k: finite_or_none(pq[k]) for k in PQ_KEYS}
    out["per_class"] = pq["per_class"]
    out["miou"] = finite_or_none(miou_ev.evaluate()["miou"])
    out.update(inst_ev.evaluate())
    out.update(per_image=per_image, failed=failed, num_images=len(per_image), label_seconds=label_s,
               score_seconds=score_s + time.perf_counter() - t2)
    return out


def evaluate_generator(generator: PseudoLabelGenerator, output: str, split: str = "all", batch_size: int = 8,
                       max_images: int | None = None, progress: bool = True) -> dict:
    """Label the prepared images of ``output`` that have ground truth (``split`` of them, at most
    ``max_images``) with ``generator`` and :func:`score` them; nothing is written."""
    gt = GroundTruth(output)
    rows = split_rows(gt.rows(read_index(join(output, "index", "index.parquet"))), split)
    rows = rows[:max_images] if max_images else rows
    return score(label_rows(generator, rows, batch_size, progress), gt, generator.categories)


def reference_baseline(names: Iterable[str]) -> str | None:
    """The baseline a method is contrasted with (:func:`contrasting_images`): ``psps`` when listed, else the
    first name, None for none."""
    names = list(names)
    return "psps" if "psps" in names else (names[0] if names else None)


def contrasting_images(per_image: Mapping[int, dict], reference: Mapping[int, dict], k: int,
                       key: str = "mean_best_iou") -> list[int]:
    """The ``k`` image ids where ``per_image[id][key] - reference[id][key]`` is furthest from zero both ways.

    ``per_image`` / ``reference``: :func:`score`'s ``per_image`` of a method and
    of a baseline on the same images. Images where either value is ``None``
    (no thing to score) are left out. Returned by decreasing difference: the
    ``ceil(k / 2)`` largest differences, then the ``floor(k / 2)`` smallest (its
    worst images against the baseline), so a gallery shows where the method
    loses as well as where it wins; ties keep image-id order.
    """
    diffs = sorted(((per_image[i][key] - reference[i][key], i) for i in sorted(per_image)
                    if i in reference and per_image[i].get(key) is not None
                    and reference[i].get(key) is not None), key=lambda t: -t[0])
    if k <= 0:
        return []
    if len(diffs) <= k:
        return [i for _, i in diffs]
    top = (k + 1) // 2
    return [i for _, i in diffs[:top] + diffs[len(diffs) - (k - top):]]


def labels_by_id(generator: PseudoLabelGenerator, rows: Iterable[Mapping],
                 batch_size: int = 8) -> dict[int, PseudoLabel | None]:
    """``{image_id: label}`` of :func:`label_rows` (``None`` where the image failed), quietly."""
    return {int(r["image_id"]): lab for r, lab, _ in label_rows(generator, rows, batch_size, progress=False)}


def comparison_sheet(rows: Iterable[Mapping],
                     methods: list[tuple[str, Mapping[int, PseudoLabel | None], Mapping[int, dict]]],
                     gt: GroundTruth, categories: Mapping[int, Category],
                     max_side: int | None = 320) -> np.ndarray:
    """One RGB picture, a row per index row: ``image + clicks | ground truth | method 1 | method 2 | ...``.

    ``methods``: ``(name, {image_id: label}, per_image)``, the labels of the
    rows (e.g. :func:`labels_by_id`) and :func:`score`'s ``per_image`` of the
    same labels, whose PQ and mean best IoU of the image go in the tile's
    title. A missing or ``None`` label (a failed image) is a grey tile titled
    "failed"; an image that cannot be read is a grey tile titled with the
    error's type. Tiles are shrunk to ``max_side``
    (:func:`pointseg.viz.overlay.side_by_side`).
    """
    rows = list(rows)
    if not rows or not methods:
        raise ValueError("comparison_sheet needs rows and methods")

    def pct(v) -> str:
        return "-" if v is None else f"{100 * v:.0f}"

    out = []
    for row in rows:
        image_id = int(row["image_id"])
        truth = gt.load(image_id)
        try:
            rec = index_record(dict(row), categories)
            image, points, head = rec.image, rec.points, f"image {image_id} + clicks"
        except Exception as exc:  # noqa: BLE001 - an unreadable image is a grey tile that says why
            image, points = np.full(truth[0].shape + (3,), 128, np.uint8), Points.empty()
            head = f"image {image_id}: {type(exc).__name__}"
        tiles = [("ground truth", truth)]
        for name, labels, per_image in methods:
            lab = labels.get(image_id)
            s = per_image.get(image_id, {})
            title = (f"{name} failed" if lab is None else
                     f"{name}: PQ {pct(s.get('pq'))}, best IoU {pct(s.get('mean_best_iou'))}")
            tiles.append((title, None if lab is None else (np.asarray(lab.id_map), lab.segments_info)))
        out.append(side_by_side(image, points, tiles, categories, head, max_side))
    return stack(out)


__all__ = [
    "GroundTruth",
    "SPLITS",
    "comparison_sheet",
    "contrasting_images",
    "evaluate_generator",
    "finite_or_none",
    "label_rows",
    "labels_by_id",
    "reference_baseline",
    "score",
    "split_rows",
]
