"""COCO readers: instance annotations and panoptic annotations -> :class:`ImageRecord`.

Both readers load the JSON once, check it, and return ``(categories, records)``
where ``records`` is a one-pass :class:`RecordStream`: records are built one at
a time, and each record's full-resolution masks are decoded only when that
record is yielded, so memory holds one image's masks at a time.

Bad input never loses an image silently. Every problem is counted, described
in ``records.report`` (a :class:`ReadReport`) as an
:class:`~pointseg.data.record.InputProblem` ``(image_id, kind, reason)`` that
names the image whenever there is one, warned about (the first
``ReadReport.max_warnings`` of each kind), and, with ``strict=True``, the first
problem raises :class:`CocoFormatError` instead:

==================== ============================================================
kind                 what happens (non-strict)
==================== ============================================================
duplicate_image      a second ``images`` entry with the same id: first one kept
bad_image_entry      an ``images`` entry without a usable id/height/width/file_name,
                     or claiming more pixels than Pillow decodes (:func:`max_pixels`): skipped
                     (named by its id, or its index in ``images``)
duplicate_category   a second category with the same id: first one kept
image_path           an image ``file_name`` (or panoptic PNG name) that leaves the
                     dataset's folder (``..``, absolute, another URI scheme; see
                     :func:`~pointseg.data.images.resolve_under`) unless
                     ``allow_outside_paths``: the record is yielded with
                     ``file_name=""`` (nothing is read) and the reason is in
                     ``report.image_errors[image_id]``
unknown_image        an annotation whose ``image_id`` is not in ``images``: skipped
unknown_category     an annotation / segment with a category id not in the table:
                     skipped (its pixels are VOID)
bbox_only            an instance annotation with a ``bbox`` but no
                     ``segmentation``: skipped (pointseg needs masks)
empty_segmentation   an instance annotation with ``segmentation: []`` (or ``{}``):
                     skipped
empty_mask           an instance whose segmentation covers no pixel (a
                     degenerate polygon): skipped
bad_annotation       an annotation missing a field, or a segmentation that cannot
                     be decoded (bad polygon, RLE of the wrong size): skipped
duplicate_annotation a second panoptic annotation for one image: first one kept
missing_annotation   a panoptic image without annotation: yielded with no segments
panoptic_png         a panoptic PNG that is missing, unreadable or of the wrong
                     size: the record is yielded with no segments
image_decode         ``load_images=True`` and the image file is missing/corrupt or
                     its size disagrees with the JSON: the record is still
                     yielded, with ``image=None`` and ``file_name`` set, and the
                     reason is in ``report.image_errors[image_id]``
==================== ============================================================

Skipped instance annotations of a known image (unknown category, box only,
empty or undecodable segmentation) leave their pixels in the record's
``ignore_mask`` (their mask when it decodes, else their box): the VOC-panoptic
background never claims them.

Notes (counted and listed, never raised): ``segment_without_pixels`` (a
panoptic segment absent from its PNG; skipped), ``unlisted_png_ids`` (PNG ids
missing from ``segments_info``; their pixels are VOID) and, added by
:func:`pointseg.data.prepare.open_dataset`, ``covered_instance`` (an instance
hidden by smaller ones, so absent from the panoptic ground truth).

Segment ids. Instance records number their segments ``1..N`` in annotation
order in the file (COCO annotation ids do not fit the ``int32`` id map: crowd
ids reach ``9e11``); panoptic records keep the PNG ids.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from pointseg.data.images import (
    ImageDecodeError,
    OutsidePathError,
    read_image_as_annotated,
    resolve_under,
)
from pointseg.data.panoptic_format import rgb2id
from pointseg.data.record import VOID, Category, ImageRecord, InputProblem, Segment

__all__ = [
    "CocoFormatError",
    "CocoReadWarning",
    "ReadReport",
    "RecordStream",
    "read_coco_instances",
    "read_coco_panoptic",
    "instances_to_panoptic",
    "panoptic_order",
    "panoptic_id_map",
    "read_categories",
    "rle_counts_from_string",
    "rle_to_mask",
]


class CocoFormatError(ValueError):
    """A problem in COCO input, raised under ``strict=True`` (message names file and ids)."""


class CocoReadWarning(UserWarning):
    """A recoverable problem in COCO input (also recorded in the :class:`ReadReport`)."""


@dataclass
class ReadReport:
    """What a reader found wrong, for a flow's run report.

    ``counts[kind]`` counts problems and notes by kind (see module docstring);
    ``items`` keeps the first ``max_items`` of them as
    :class:`~pointseg.data.record.InputProblem` ``(image_id, kind, reason)``,
    every reason prefixed with ``source``; ``messages`` are the reasons of the
    first ``max_messages``; ``image_errors`` maps image id -> reason for images
    that cannot be read (rejected path, or ``load_images`` failed);
    ``gt_missing`` holds the images whose ground truth could not be read
    (``missing_annotation``, ``panoptic_png``), unlike an image that has no
    segment; ``images``/``annotations`` count JSON entries read and
    ``yielded`` the records produced so far.
    """

    source: str
    strict: bool = False
    images: int = 0
    annotations: int = 0
    yielded: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    items: list[InputProblem] = field(default_factory=list)
    image_errors: dict[int, str] = field(default_factory=dict)
    gt_missing: set[int] = field(default_factory=set)
    max_items: int = 100_000
    max_messages: int = 1000
    max_warnings: int = 20

    def problem(self, kind: str, message: str, image_id: int | None = None) -> None:
        """Record a problem: raise under ``strict``, else count, keep and warn."""
        if self.strict:
            raise CocoFormatError(f"{self.source}: {message}")
        self.note(kind, message, warn=True, image_id=image_id)

    def note(self, kind: str, message: str, warn: bool = False, image_id: int | None = None) -> None:
        """Count an event that is never an error (and keep it)."""
        message = f"{self.source}: {message}"
        n = self.counts.get(kind, 0) + 1
        self.counts[kind] = n
        if len(self.items) < self.max_items:
            self.items.append(InputProblem(None if image_id is None else int(image_id), kind, message))
        if warn and n <= self.max_warnings:
            suffix = f" (further '{kind}' warnings suppressed; see the read report)" if n == self.max_warnings else ""
            warnings.warn(message + suffix, CocoReadWarning, stacklevel=4)

    @property
    def messages(self) -> list[str]:
        return [p.reason for p in self.items[: self.max_messages]]

    @property
    def problems(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "source": self.source,
            "images": self.images,
            "annotations": self.annotations,
            "yielded": self.yielded,
            "counts": dict(self.counts),
            "messages": self.messages,
            "problems": [p.to_dict() for p in self.items],
            "image_errors": {str(k): v for k, v in self.image_errors.items()},
            "gt_missing": sorted(self.gt_missing),
        }


class RecordStream:
    """One-pass iterator of :class:`ImageRecord` with the reader's :class:`ReadReport`.

    ``len(stream)`` is the number of records it will yield; ``stream.report``
    fills in as records are decoded (JSON-level problems are already in it).
    """

    def __init__(self, records: Iterator[ImageRecord], length: int, report: ReadReport):
        self._it = records
        self._len = length
        self.report = report

    def __iter__(self) -> "RecordStream":
        return self

    def __next__(self) -> ImageRecord:
        rec = next(self._it)
        self.report.yielded += 1
        return rec

    def __len__(self) -> int:
        return self._len


# --------------------------------------------------------------------------- JSON helpers


def max_pixels() -> float:
    """Largest ``height * width`` an ``images`` entry may claim: what Pillow agrees to decode
    (``DecompressionBombError`` above ``2 * PIL.Image.MAX_IMAGE_PIXELS``; no limit when that is
    ``None``). A bigger claim would only allocate full-size masks for an image that cannot be read."""
    return math.inf if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


def _read_json(uri: str) -> Any:
    try:
        with fsspec.open(uri, "rt", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: file not found") from None
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"{uri}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _parse_categories(raw: Any, report: ReadReport, where: str, force_thing: bool | None) -> dict[int, Category]:
    if isinstance(raw, dict) and "categories" in raw:
        raw = raw["categories"]
    if not isinstance(raw, list):
        raise CocoFormatError(f"{where}: 'categories' must be a list of category objects, got {type(raw).__name__}")
    cats: dict[int, Category] = {}
    for i, c in enumerate(raw):
        if not isinstance(c, dict) or not _is_int(c.get("id")):
            raise CocoFormatError(f"{where}: categories[{i}] has no integer field 'id': {c!r}")
        if force_thing is None and "isthing" not in c:
            raise CocoFormatError(f"{where}: categories[{i}] (id {c['id']}) has no field 'isthing'")
        cid = int(c["id"])
        if cid in cats:
            report.problem("duplicate_category", f"category id {cid} listed twice (categories[{i}]); keeping the first")
            continue
        color = c.get("color") or (0, 0, 0)
        isthing = force_thing if force_thing is not None else bool(int(c["isthing"]))
        cats[cid] = Category(cid, str(c.get("name", cid)), isthing, tuple(int(v) for v in color))
    return cats


def read_categories(uri: str) -> dict[int, Category]:
    """Categories from a JSON file with ``isthing``: a list of category objects
    (COCO's ``panoptic_coco_categories.json``) or any object with a ``categories`` key."""
    return _parse_categories(_read_json(uri), ReadReport(uri, strict=True), uri, force_thing=None)


def _parse_images(data: dict, report: ReadReport, where: str, max_images: int | None) -> dict[int, dict]:
    raw = data.get("images")
    if not isinstance(raw, list):
        raise CocoFormatError(f"{where}: field 'images' must be a list")
    images: dict[int, dict] = {}
    limit = max_pixels()
    for i, im in enumerate(raw):
        report.images += 1
        if not isinstance(im, dict):
            report.problem("bad_image_entry", f"images[{i}] is not an object; skipped")
            continue
        bad = [k for k in ("id", "height", "width") if not _is_int(im.get(k))]
        if not isinstance(im.get("file_name"), str):
            bad.append("file_name")
        if bad or im["height"] <= 0 or im["width"] <= 0 or im["height"] * im["width"] > limit:
            what = f"field(s) {bad} missing or invalid" if bad else f"size {im['height']}x{im['width']}"
            if not bad and im["height"] > 0 and im["width"] > 0:
                what += f" exceeds {limit:.0f} pixels (Pillow's decoding limit)"
            known = int(im["id"]) if _is_int(im.get("id")) else None
            report.problem("bad_image_entry", f"images[{i}] (image {im.get('id')!r}): {what}; skipped", known)
            continue
        iid = int(im["id"])
        if iid in images:
            report.problem(
                "duplicate_image",
                f"image id {iid} listed twice (images[{i}], file_name {im['file_name']!r}); keeping the first",
                iid,
            )
            continue
        if max_images is not None and len(images) >= max_images:
            continue
        images[iid] = im
    return images


# --------------------------------------------------------------------------- instances


def read_coco_instances(
    ann_uri: str,
    image_dir_uri: str,
    load_images: bool = False,
    max_images: int | None = None,
    strict: bool = False,
    allow_outside_paths: bool = False,
) -> tuple[dict[int, Category], RecordStream]:
    """Read a COCO instances JSON (``instances_*.json``) as a stream of records.

    Parameters
    ----------
    ann_uri : fsspec URI of the JSON.
    image_dir_uri : folder of the images; ``record.file_name`` is
        ``image_dir_uri/<file_name>`` (:func:`~pointseg.data.images.resolve_under`;
        ``""`` for a rejected name, an ``image_path`` problem) and
        ``record.original_file_name`` the JSON's ``file_name``.
    load_images : decode each image into ``record.image`` ``(H, W, 3) uint8``
        in the annotated pixel grid
        (:func:`~pointseg.data.images.read_image_as_annotated`: EXIF orientation
        applied unless the JSON's ``height``/``width`` is the stored grid, as
        in COCO); a file that is missing, broken or of another size is an
        ``image_decode`` problem.
    max_images : read only the first ``max_images`` images of ``images``.
    strict : raise :class:`CocoFormatError` at the first problem.
    allow_outside_paths : accept ``file_name`` values that leave
        ``image_dir_uri`` (``dataset.allow_outside_paths``).

    Returns
    -------
    categories : ``{id: Category}``, ``isthing=True`` for every category.
    records : :class:`RecordStream` of :class:`ImageRecord`, in ``images``
        order, every image of the file (also those without annotations).
        Segments are in annotation order with ids ``1..N``, full annotated
        masks ``(H, W) bool`` (overlaps kept): polygons rasterised by
        pycocotools, RLE (compressed or not) expanded by :func:`rle_to_mask`
        (pycocotools' algorithm, tested against it); ``iscrowd`` annotations become
        ``Segment(iscrowd=True)``. Use :func:`instances_to_panoptic` for
        non-overlapping segments.
    """
    report = ReadReport(ann_uri, strict=strict)
    data = _read_json(ann_uri)
    if not isinstance(data, dict):
        raise CocoFormatError(f"{ann_uri}: expected a JSON object with 'images', 'annotations', 'categories'")
    if "categories" not in data:
        raise CocoFormatError(f"{ann_uri}: no field 'categories'")
    categories = _parse_categories(data["categories"], report, ann_uri, force_thing=True)
    images = _parse_images(data, report, ann_uri, max_images)
    all_ids = _all_image_ids(data)

    anns_by_image: dict[int, list[dict]] = {iid: [] for iid in images}
    skipped_by_image: dict[int, list[dict]] = {iid: [] for iid in images}  # their pixels go to ignore_mask
    for i, ann in enumerate(data.get("annotations") or []):
        report.annotations += 1
        aid = ann.get("id") if isinstance(ann, dict) else None
        label = f"annotation {aid}" if aid is not None else f"annotations[{i}]"
        if not isinstance(ann, dict):
            report.problem("bad_annotation", f"{label} is not an object; skipped")
            continue
        if "image_id" not in ann:
            report.problem("bad_annotation", f"{label}: missing field 'image_id'; skipped")
            continue
        iid = ann["image_id"]
        if not _is_int(iid) or iid not in all_ids:
            report.problem("unknown_image", f"{label}: image_id {iid!r} is not in 'images'; skipped",
                           iid if _is_int(iid) else None)
            continue
        if iid not in anns_by_image:  # image beyond max_images or a skipped entry
            continue
        label = f"{label} (image {iid})"
        if "category_id" not in ann:
            report.problem("bad_annotation", f"{label}: missing field 'category_id'; skipped", iid)
            skipped_by_image[iid].append(ann)
            continue
        if not _is_int(ann["category_id"]) or ann["category_id"] not in categories:
            report.problem(
                "unknown_category", f"{label}: category_id {ann['category_id']!r} unknown; skipped", iid
            )
            skipped_by_image[iid].append(ann)
            continue
        seg = ann.get("segmentation")
        if seg is None:
            if "bbox" in ann:
                report.problem("bbox_only", f"{label}: only a 'bbox', no 'segmentation' (pointseg needs masks); "
                               "skipped, its box stays unlabelled", iid)
            else:
                report.problem("bad_annotation", f"{label}: missing field 'segmentation'; skipped", iid)
            skipped_by_image[iid].append(ann)
            continue
        if isinstance(seg, (list, dict)) and len(seg) == 0:
            report.problem("empty_segmentation", f"{label}: field 'segmentation' is empty ({seg!r}); skipped", iid)
            skipped_by_image[iid].append(ann)
            continue
        anns_by_image[iid].append(ann)

    def gen() -> Iterator[ImageRecord]:
        for iid, im in images.items():
            h, w = int(im["height"]), int(im["width"])
            uri = _image_uri(image_dir_uri, im["file_name"], iid, allow_outside_paths, report)
            segments: list[Segment] = []
            skipped = list(skipped_by_image[iid])
            for ann in anns_by_image[iid]:
                mask = _decode_segmentation(ann, h, w, report)
                if mask is None:
                    skipped.append(ann)
                    continue
                segments.append(
                    Segment(len(segments) + 1, int(ann["category_id"]), True, mask, bool(ann.get("iscrowd", 0)))
                )
            rec = ImageRecord(iid, h, w, file_name=uri, segments=segments, original_file_name=im["file_name"],
                              ignore_mask=_skipped_pixels(skipped, h, w))
            if load_images and uri:
                rec.image = _load_image(uri, iid, h, w, report)
            yield rec

    return categories, RecordStream(gen(), len(images), report)


def _all_image_ids(data: dict) -> set:
    return {im["id"] for im in data.get("images") or [] if isinstance(im, dict) and _is_int(im.get("id"))}


def _image_uri(root: str | None, name: str, image_id: int, allow_outside: bool, report: ReadReport) -> str:
    """``resolve_under(root, name)``, or ``""`` after an ``image_path`` problem."""
    try:
        return resolve_under(root, name, allow_outside)
    except OutsidePathError as e:
        report.image_errors[image_id] = str(e)
        report.problem("image_path", f"image {image_id}: {e}", image_id)
        return ""


def _bbox_pixels(bbox: Any, h: int, w: int) -> np.ndarray | None:
    """COCO ``[x, y, width, height]`` -> ``(h, w) bool`` of the pixels it touches, or ``None``."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        x, y, bw, bh = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(np.isfinite([x, y, bw, bh])) or bw <= 0 or bh <= 0:
        return None
    c0, c1 = max(int(np.floor(x)), 0), min(int(np.ceil(x + bw)), w)
    r0, r1 = max(int(np.floor(y)), 0), min(int(np.ceil(y + bh)), h)
    if c0 >= c1 or r0 >= r1:
        return None
    m = np.zeros((h, w), bool)
    m[r0:r1, c0:c1] = True
    return m


def _skipped_pixels(anns: list[dict], h: int, w: int) -> np.ndarray | None:
    """Union of what skipped annotations cover: the mask when it decodes, else the box."""
    quiet = ReadReport("", max_warnings=0)  # their problems are already reported
    out = None
    for ann in anns:
        m = _decode_segmentation(ann, h, w, quiet) if ann.get("segmentation") else None
        if m is None:
            m = _bbox_pixels(ann.get("bbox"), h, w)
        if m is not None:
            out = m if out is None else out | m
    return out


def rle_counts_from_string(s: str | bytes) -> list[int]:
    """COCO compressed RLE string -> run lengths (``rleFrString`` of pycocotools' maskApi.c).

    Each run is a variable-length number in 5-bit groups stored as
    ``chr(48 + group)``: bit 0x20 continues the number, bit 0x10 of the last
    group is the sign; from the third run on the value is a delta to the run
    two places back.
    """
    data = s.encode("ascii") if isinstance(s, str) else bytes(s)
    counts: list[int] = []
    p = 0
    while p < len(data):
        x = k = 0
        more = True
        while more:
            if p >= len(data):
                raise ValueError("RLE string ends inside a number")
            c = data[p] - 48
            if c < 0 or c > 63:
                raise ValueError(f"invalid character {chr(data[p])!r} in RLE string")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_to_mask(counts: list[int], h: int, w: int) -> np.ndarray:
    """Uncompressed COCO RLE (alternating 0/1 runs, starting with 0, column-major) -> ``(h, w) bool``."""
    runs = np.asarray(counts, np.int64)
    if runs.size and runs.min() < 0:
        raise ValueError("negative run length")
    if int(runs.sum()) != h * w:
        raise ValueError(f"run lengths sum to {int(runs.sum())}, not {h}*{w}={h * w}")
    values = (np.arange(runs.size) % 2).astype(bool)
    return np.ascontiguousarray(np.repeat(values, runs).reshape(w, h).T)


def _decode_segmentation(ann: dict, h: int, w: int, report: ReadReport) -> np.ndarray | None:
    """COCO ``segmentation`` (polygons, uncompressed or compressed RLE) -> ``(h, w) bool``.

    Polygons are rasterised by pycocotools (``frPyObjects`` + ``merge``), as in
    the COCO API; RLE runs are expanded by :func:`rle_to_mask`.
    """
    iid = ann["image_id"]
    label = f"annotation {ann.get('id', '?')} (image {iid})"
    seg = ann["segmentation"]
    try:
        if isinstance(seg, list):
            from pycocotools import mask as mask_utils

            ok = [isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg]
            if not all(ok):
                report.problem(
                    "bad_annotation",
                    f"{label}: field 'segmentation' polygon(s) {[i for i, g in enumerate(ok) if not g]} have fewer "
                    "than 3 points or an odd number of coordinates; they are ignored",
                    iid,
                )
            polys = [[float(v) for v in p] for p, g in zip(seg, ok) if g]
            if not polys:
                return None
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
            mask = rle_to_mask(rle_counts_from_string(rle["counts"]), h, w)
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            if [int(v) for v in seg["size"]] != [h, w]:
                report.problem(
                    "bad_annotation",
                    f"{label}: field 'segmentation.size' {seg['size']} differs from the image size [{h}, {w}]; skipped",
                    iid,
                )
                return None
            counts = seg["counts"]
            if not isinstance(counts, list):  # compressed RLE string
                counts = rle_counts_from_string(counts)
            mask = rle_to_mask(counts, h, w)
        else:
            report.problem("bad_annotation", f"{label}: field 'segmentation' is neither polygons nor RLE; skipped", iid)
            return None
    except (ValueError, TypeError) as e:
        report.problem("bad_annotation", f"{label}: field 'segmentation' cannot be decoded ({e}); skipped", iid)
        return None
    if not mask.any():
        report.problem("empty_mask", f"{label}: field 'segmentation' covers no pixel (degenerate polygon?); skipped",
                       iid)
        return None
    return mask


def _load_image(uri: str, image_id: int, h: int, w: int, report: ReadReport) -> np.ndarray | None:
    try:
        return read_image_as_annotated(uri, h, w)
    except ImageDecodeError as e:
        report.image_errors[image_id] = str(e)
        report.problem("image_decode", f"image {image_id}: {e}", image_id)
        return None


# --------------------------------------------------------------------------- overlap rule


def panoptic_order(segments: list[Segment]) -> list[int]:
    """Painting order that turns overlapping instance masks into a panoptic map.

    Crowd segments first, then non-crowd segments by decreasing mask area
    (ties keep list order). Painted in this order with later-wins, a pixel
    claimed by several instances goes to the smallest one (the one usually in
    front), and a crowd region never takes a pixel from a non-crowd instance.
    """
    key = [(0 if s.iscrowd else 1, -s.area if not s.iscrowd else 0, i) for i, s in enumerate(segments)]
    return [k[2] for k in sorted(key)]


def panoptic_id_map(segments: list[Segment], height: int, width: int) -> np.ndarray:
    """``(H, W) int32`` id map painted in :func:`panoptic_order` (0 = VOID).

    For segments that do not overlap (panoptic records) this is just their union.
    """
    id_map = np.full((height, width), VOID, np.int32)
    for i in panoptic_order(segments):
        id_map[segments[i].mask] = segments[i].id
    return id_map


def instances_to_panoptic(record: ImageRecord) -> tuple[ImageRecord, list[int]]:
    """Resolve overlapping instance masks into non-overlapping panoptic segments.

    Rule: paint segments in :func:`panoptic_order` — crowd regions first, then
    instances by decreasing area — so each pixel belongs to the last segment
    painted over it: among overlapping instances the smallest wins, and crowd
    regions never overwrite a non-crowd instance (instances overwrite crowd).
    Each kept segment's mask becomes its visible pixels; segments left with no
    pixel are dropped.

    Returns ``(record, dropped_ids)``: a new record (image shared, not copied)
    whose segments are in painting order with disjoint masks, so
    ``record.panoptic()`` gives the same id map; and the ids of the dropped
    segments.
    """
    id_map = panoptic_id_map(record.segments, record.height, record.width)
    kept: list[Segment] = []
    dropped: list[int] = []
    for i in panoptic_order(record.segments):
        s = record.segments[i]
        visible = id_map == s.id
        if visible.any():
            kept.append(replace(s, mask=visible))
        else:
            dropped.append(int(s.id))
    return replace(record, segments=kept), dropped


#: Name of the one stuff class of the VOC-panoptic protocol (``dataset.background: stuff``).
BACKGROUND_NAME = "background"


def background_category(categories: dict[int, Category]) -> Category:
    """The ``background`` stuff category added by ``dataset.background: stuff``.

    Its id is 0 (VOC's background index; COCO never uses it), or one above the
    largest id when 0 is taken.
    """
    cid = 0 if 0 not in categories else max(categories) + 1
    return Category(cid, BACKGROUND_NAME, False, (80, 80, 80))


def add_background_segment(record: ImageRecord, category_id: int) -> ImageRecord:
    """The VOC-panoptic protocol: every pixel outside the instances becomes one stuff segment.

    ``record`` must hold non-overlapping segments (after
    :func:`instances_to_panoptic`). Crowd regions stay crowd (VOID for PQ), and
    so do the pixels of ``record.ignore_mask`` (annotations the reader had to
    skip: what they show is unknown). The new segment's id is one above the
    largest; an image with no pixel left gets none.
    """
    id_map = panoptic_id_map(record.segments, record.height, record.width)
    mask = id_map == VOID
    if record.ignore_mask is not None:
        mask &= ~record.ignore_mask
    if not mask.any():
        return record
    sid = max((s.id for s in record.segments), default=0) + 1
    return replace(record, segments=[*record.segments, Segment(sid, category_id, False, mask)])


# --------------------------------------------------------------------------- panoptic


def read_coco_panoptic(
    json_uri: str,
    png_dir_uri: str,
    image_dir_uri: str | None = None,
    categories_uri: str | None = None,
    load_images: bool = False,
    max_images: int | None = None,
    strict: bool = False,
    allow_outside_paths: bool = False,
) -> tuple[dict[int, Category], RecordStream]:
    """Read COCO panoptic ground truth (JSON + one PNG per image) as records.

    The PNG encodes ``id = R + 256*G + 256**2*B`` (0 = VOID); each
    ``segments_info`` entry ``{id, category_id, iscrowd}`` becomes a
    :class:`Segment` with ``mask = (id_map == id)``, ``isthing`` from its
    category. PNG pixels whose id is not listed stay unlabeled (an
    ``unlisted_png_ids`` note names them).

    Parameters
    ----------
    json_uri : the panoptic JSON (``images``, ``annotations``, optionally
        ``categories``).
    png_dir_uri : folder holding the annotations' ``file_name`` PNGs.
    image_dir_uri : folder of the images; ``record.file_name`` is
        ``image_dir_uri/<file_name>`` (the normalised ``file_name`` when
        ``None``; ``""`` for a rejected name, see
        :func:`~pointseg.data.images.resolve_under`).
    categories_uri : a categories file (COCO's ``panoptic_coco_categories.json``
        format, or any JSON with a ``categories`` key); it takes precedence
        over the JSON's own ``categories``. One of the two is required.
    load_images : decode images into ``record.image`` (needs ``image_dir_uri``).
    max_images, strict, allow_outside_paths : as in :func:`read_coco_instances`
        (the path rule also holds for the PNG names under ``png_dir_uri``).
    """
    report = ReadReport(json_uri, strict=strict)
    data = _read_json(json_uri)
    if not isinstance(data, dict):
        raise CocoFormatError(f"{json_uri}: expected a JSON object with 'images' and 'annotations'")
    if categories_uri is not None:
        categories = _parse_categories(_read_json(categories_uri), report, categories_uri, force_thing=None)
    elif "categories" in data:
        categories = _parse_categories(data["categories"], report, json_uri, force_thing=None)
    else:
        raise CocoFormatError(f"{json_uri}: no field 'categories' and no categories_uri given")
    if load_images and image_dir_uri is None:
        raise ValueError("read_coco_panoptic: load_images=True needs image_dir_uri")
    images = _parse_images(data, report, json_uri, max_images)
    all_ids = _all_image_ids(data)

    ann_by_image: dict[int, dict] = {}
    for i, ann in enumerate(data.get("annotations") or []):
        report.annotations += 1
        if not isinstance(ann, dict) or "image_id" not in ann:
            report.problem("bad_annotation", f"annotations[{i}]: missing field 'image_id'; skipped")
            continue
        iid = ann["image_id"]
        if not _is_int(iid) or iid not in all_ids:
            report.problem("unknown_image", f"annotations[{i}]: image_id {iid!r} is not in 'images'; skipped",
                           iid if _is_int(iid) else None)
            continue
        if iid not in images:
            continue
        if not isinstance(ann.get("file_name"), str) or not isinstance(ann.get("segments_info"), list):
            report.problem(
                "bad_annotation",
                f"annotations[{i}] (image {iid}): field 'file_name' or 'segments_info' missing; skipped",
                iid,
            )
            continue
        if iid in ann_by_image:
            report.problem(
                "duplicate_annotation", f"annotations[{i}]: second annotation for image {iid}; keeping the first", iid
            )
            continue
        ann_by_image[iid] = ann

    def gen() -> Iterator[ImageRecord]:
        for iid, im in images.items():
            h, w = int(im["height"]), int(im["width"])
            uri = _image_uri(image_dir_uri, im["file_name"], iid, allow_outside_paths, report)
            rec = ImageRecord(iid, h, w, file_name=uri, original_file_name=im["file_name"])
            ann = ann_by_image.get(iid)
            if ann is None:
                report.gt_missing.add(iid)
                report.problem("missing_annotation", f"image {iid}: no panoptic annotation; yielded without segments",
                               iid)
            else:
                try:
                    png_uri = resolve_under(png_dir_uri, ann["file_name"], allow_outside_paths)
                except OutsidePathError as e:
                    report.gt_missing.add(iid)
                    report.problem("panoptic_png", f"image {iid}: panoptic PNG {e}; yielded without segments", iid)
                else:
                    rec.segments = _panoptic_segments(ann, png_uri, h, w, categories, report)
            if load_images and uri:
                rec.image = _load_image(uri, iid, h, w, report)
            yield rec

    return categories, RecordStream(gen(), len(images), report)


def _panoptic_segments(
    ann: dict, png_uri: str, h: int, w: int, categories: dict[int, Category], report: ReadReport
) -> list[Segment]:
    iid = ann["image_id"]
    report.gt_missing.add(iid)  # until the PNG is read and fits
    try:
        with fsspec.open(png_uri, "rb") as f, Image.open(f) as im:
            id_map = rgb2id(np.asarray(im.convert("RGB")))
    except FileNotFoundError:
        report.problem("panoptic_png", f"image {iid}: panoptic PNG {png_uri} not found; yielded without segments", iid)
        return []
    except Exception as e:  # any decode failure of the PNG: this image only
        report.problem("panoptic_png", f"image {iid}: cannot read panoptic PNG {png_uri} ({e}); no segments", iid)
        return []
    if id_map.shape != (h, w):
        report.problem(
            "panoptic_png",
            f"image {iid}: PNG {png_uri} is {id_map.shape[0]}x{id_map.shape[1]}, JSON says {h}x{w}; no segments",
            iid,
        )
        return []
    report.gt_missing.discard(iid)
    segments: list[Segment] = []
    seen: set[int] = set()
    for j, s in enumerate(ann["segments_info"]):
        if not isinstance(s, dict) or not _is_int(s.get("id")) or "category_id" not in s:
            report.problem("bad_annotation", f"image {iid}: segments_info[{j}] lacks field 'id' or 'category_id'", iid)
            continue
        sid, cid = int(s["id"]), s["category_id"]
        if sid in seen or sid == VOID:
            report.problem("bad_annotation", f"image {iid}: segments_info[{j}] has invalid or repeated id {sid}", iid)
            continue
        seen.add(sid)
        if not _is_int(cid) or cid not in categories:
            report.problem(
                "unknown_category",
                f"image {iid}: segment {sid} has unknown category_id {cid!r}; its pixels are VOID",
                iid,
            )
            continue
        mask = id_map == sid
        if not mask.any():
            report.note("segment_without_pixels", f"image {iid}: segment {sid} has no pixel in {png_uri}", image_id=iid)
            continue
        segments.append(Segment(sid, int(cid), categories[cid].isthing, mask, bool(s.get("iscrowd", 0))))
    unlisted = sorted(set(np.unique(id_map).tolist()) - seen - {VOID})
    if unlisted:
        more = " ..." if len(unlisted) > 10 else ""
        report.note("unlisted_png_ids", f"image {iid}: PNG {png_uri} holds ids {unlisted[:10]}{more} missing from "
                    "segments_info; their pixels are VOID", image_id=iid)
    return segments
