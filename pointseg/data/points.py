"""Point labels: simulated from ground truth, validated, and stored as JSON Lines.

Simulation (:func:`sample_points`)
----------------------------------
``"p1"`` / ``"p10"`` — the protocol of PSPS, Point2Mask and EPLD: 1 or 10
points per non-crowd segment (things and stuff), drawn uniformly from the
segment's *visible* pixels, i.e. its pixels in the panoptic id map
(:func:`pointseg.data.coco.panoptic_id_map`: overlapping instance pixels belong
to the smallest instance, crowd regions never win), so every point lies on a
pixel its own segment owns. Pixels are distinct (drawn without replacement)
when the segment has at least ``n`` pixels; a smaller segment still gets ``n``
points, drawn with replacement, so P10 always means 10 points per segment.
Segments with no visible pixel get no point. Crowd segments never get points.

``"extreme"`` — the ExtremeNet protocol that EXITS follows, things only: the
topmost, leftmost, bottommost and rightmost pixel of each non-crowd thing's
mask, in that order. When several pixels tie on the extreme row (column), the
median one along it is taken: index ``(k - 1) // 2`` of the ``k`` tied pixels
sorted by column (row), the lower median, so it is always a mask pixel. The
mask is ``segment.mask`` as stored: for records straight from
:func:`~pointseg.data.coco.read_coco_instances` that is the annotated instance
mask (overlaps included, as in ExtremeNet); after
:func:`~pointseg.data.coco.instances_to_panoptic` it is the visible part.

Every point's ``segment`` is the ground-truth segment id and ``category_id`` its
category; coordinates are pixel centres, ``x`` = column, ``y`` = row. Points are
ordered by segment id. Randomness comes from
``np.random.default_rng([seed, image_id])``, so an image's points are
bit-for-bit reproducible whatever the order in which images are processed.

Point-label file (JSON Lines)
-----------------------------
One UTF-8 JSON object per line, one line per image (blank lines are ignored;
``.gz`` and other fsspec-known compressions are inferred from the name)::

    {"image_id": 42, "file_name": "000000000042.jpg",
     "points": [{"x": 10.5, "y": 3.0, "segment": 1, "category_id": 17}, ...]}

* ``image_id`` (int, required, unique in the file);
* ``file_name`` (string, optional, informational);
* ``points`` (list, required, may be empty), each with ``x``, ``y`` (finite
  numbers, pixel-centre coordinates), ``segment`` and ``category_id`` (ints).

No other key is allowed. Floats are written with Python's shortest
round-trip repr, so writing and reading back is exact. A UTF-8 byte-order mark
at the start of the file is ignored.

Reading (:func:`read_points_jsonl`) keeps the first well-formed line of each
image. A malformed line (invalid JSON, a missing or mistyped field, an unknown
key) or a second line for an image is a :class:`PointsFileError` naming the
file, the line, the field (or the 1-based character column of invalid JSON)
and, when it can be read, the image id. With ``strict=True`` the first one is
raised; otherwise they are collected in ``PointLabels.problems`` and the line
is skipped, so an image whose only line is malformed has no points (and is
named), while the rest of the file is used.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import fsspec
import numpy as np

from pointseg.data.coco import panoptic_id_map
from pointseg.data.record import VOID, Category, ImageRecord, Points

__all__ = [
    "SCHEMES",
    "PointsFileError",
    "PointLabels",
    "sample_points",
    "sample_uniform_points",
    "extreme_points",
    "validate_points",
    "write_points_jsonl",
    "read_points_jsonl",
]


def sample_uniform_points(record: ImageRecord, n: int, rng: np.random.Generator) -> Points:
    """``n`` uniform points per non-crowd segment on its visible pixels (P1/P10 rule above)."""
    h, w = record.height, record.width
    segs = sorted((s for s in record.segments if not s.iscrowd), key=lambda s: s.id)
    if not segs:
        return Points.empty()
    flat = panoptic_id_map(record.segments, h, w).ravel()
    order = np.argsort(flat, kind="stable")  # pixels grouped by id, raster order within an id
    sorted_ids = flat[order]
    xy, seg_ids, cat_ids = [], [], []
    for s in segs:
        lo, hi = np.searchsorted(sorted_ids, [s.id, s.id + 1], side="left")
        k = int(hi - lo)
        if k == 0 or s.id == VOID:
            continue
        pick = order[lo:hi][rng.choice(k, size=n, replace=k < n)]
        rows, cols = np.divmod(pick, w)
        xy.append(np.stack([cols, rows], axis=1).astype(np.float64))
        seg_ids.append(np.full(n, s.id, np.int64))
        cat_ids.append(np.full(n, s.category_id, np.int64))
    if not xy:
        return Points.empty()
    return Points(np.concatenate(xy), np.concatenate(seg_ids), np.concatenate(cat_ids))


def extreme_points(record: ImageRecord) -> Points:
    """Top, left, bottom, right mask pixel of each non-crowd thing (rule above)."""
    xy, seg_ids, cat_ids = [], [], []
    for s in sorted((s for s in record.segments if s.isthing and not s.iscrowd), key=lambda s: s.id):
        rows, cols = np.nonzero(s.mask)  # raster order: rows ascending, columns ascending within a row
        if len(rows) == 0:
            continue
        r_top, r_bot = rows.min(), rows.max()
        c_left, c_right = cols.min(), cols.max()
        top = np.sort(cols[rows == r_top])
        left = np.sort(rows[cols == c_left])
        bottom = np.sort(cols[rows == r_bot])
        right = np.sort(rows[cols == c_right])
        xy += [
            (top[(len(top) - 1) // 2], r_top),
            (c_left, left[(len(left) - 1) // 2]),
            (bottom[(len(bottom) - 1) // 2], r_bot),
            (c_right, right[(len(right) - 1) // 2]),
        ]
        seg_ids += [s.id] * 4
        cat_ids += [s.category_id] * 4
    if not xy:
        return Points.empty()
    return Points(np.asarray(xy, np.float64), seg_ids, cat_ids)


def _extreme_scheme(record: ImageRecord, rng: np.random.Generator) -> Points:
    return extreme_points(record)  # deterministic: no random draw


#: Point-simulation schemes: name -> ``f(record, rng) -> Points``.
SCHEMES: dict[str, Callable[[ImageRecord, np.random.Generator], Points]] = {
    "p1": partial(sample_uniform_points, n=1),
    "p10": partial(sample_uniform_points, n=10),
    "extreme": _extreme_scheme,
}


def sample_points(record: ImageRecord, scheme: str, seed: int) -> Points:
    """Simulate point labels for one record from its ground-truth segments.

    Parameters
    ----------
    record : an :class:`ImageRecord` with ``segments`` (raw instances, converted
        panoptic or read panoptic records all work; see the module docstring).
    scheme : ``"p1"``, ``"p10"`` or ``"extreme"``.
    seed : non-negative int; the generator is ``default_rng([seed, image_id])``.

    Returns
    -------
    Points with ``xy (P, 2) float64`` pixel centres ``(x=col, y=row)``,
    ``segment`` the gt segment id and ``category_id`` its category.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown point scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if record.image_id < 0:
        raise ValueError(f"image {record.image_id}: sampling needs a non-negative image_id (it seeds the generator)")
    return SCHEMES[scheme](record, rng=np.random.default_rng([int(seed), int(record.image_id)]))


def validate_points(
    points: Points, height: int, width: int, categories: Mapping[int, Category] | Iterable[int]
) -> tuple[Points, list[str]]:
    """Drop unusable points and say why.

    A point is kept when ``x`` and ``y`` are finite, its pixel
    ``(round(y), round(x))`` lies in the ``height x width`` image (the rule of
    :meth:`Points.pixels`) and its ``category_id`` is in ``categories``.
    Returns the kept points (order preserved) and one message per dropped
    point naming its index and the offending value.
    """
    known = set(categories.keys() if isinstance(categories, Mapping) else categories)
    problems: list[str] = []
    keep = np.ones(len(points), bool)
    for i, ((x, y), c) in enumerate(zip(points.xy.tolist(), points.category_id.tolist())):
        if not (math.isfinite(x) and math.isfinite(y)):
            problems.append(f"point {i}: coordinate x={x!r}, y={y!r} is not finite")
        elif not (0 <= round(x) < width and 0 <= round(y) < height):
            problems.append(f"point {i}: (x={x!r}, y={y!r}) lies outside the {width}x{height} (WxH) image")
        elif c not in known:
            problems.append(f"point {i}: category_id {c} is not a known category")
        else:
            continue
        keep[i] = False
    if keep.all():
        return points, problems
    return Points(points.xy[keep], points.segment[keep], points.category_id[keep]), problems


# --------------------------------------------------------------------------- JSON Lines


class PointsFileError(ValueError):
    """A malformed point-label line; ``uri``, ``line`` (1-based) and ``field`` say where,
    ``image_id`` which image it concerns (``None`` when the line does not say)."""

    def __init__(self, uri: str, line: int, field: str | None, reason: str, image_id: int | None = None):
        self.uri, self.line, self.field, self.reason = str(uri), int(line), field, reason
        self.image_id = image_id
        about = f" (image {image_id})" if image_id is not None else ""
        in_field = f", field {field!r}" if field else ""
        super().__init__(f"{self.uri}, line {self.line}{about}{in_field}: {reason}")

    def __reduce__(self):
        return (type(self), (self.uri, self.line, self.field, self.reason, self.image_id))


class PointLabels(dict):
    """``{image_id: Points}`` in file order, as read by :func:`read_points_jsonl`.

    ``problems`` lists the lines that were skipped (non-strict reading), each a
    :class:`PointsFileError` with ``image_id`` when the line names one.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.problems: list[PointsFileError] = []


_LINE_KEYS = {"image_id", "file_name", "points"}
_POINT_KEYS = ("x", "y", "segment", "category_id")


def write_points_jsonl(uri: str, items: Iterable[tuple]) -> int:
    """Write point labels as JSON Lines (format in the module docstring).

    ``items`` yields ``(image_id, Points)`` or ``(image_id, Points, file_name)``.
    Returns the number of lines written. Raises ``ValueError`` naming the image
    on a repeated image id. A non-finite coordinate is written as ``null``
    (strict JSON), which reads back as NaN.
    """
    seen: set[int] = set()
    n = 0
    with fsspec.open(uri, "wt", encoding="utf-8", compression="infer") as f:
        for item in items:
            image_id, pts = int(item[0]), item[1]
            if image_id in seen:
                raise ValueError(f"{uri}: image_id {image_id} given twice")
            seen.add(image_id)
            row: dict[str, Any] = {"image_id": image_id}
            if len(item) > 2 and item[2] is not None:
                row["file_name"] = str(item[2])
            row["points"] = [
                {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in p.items()}
                for p in pts.to_list()
            ]
            f.write(json.dumps(row, allow_nan=False, separators=(",", ":")) + "\n")
            n += 1
    return n


def _int_field(v: Any, uri: str, line: int, field: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise PointsFileError(uri, line, field, f"expected an integer, got {v!r}")
    return v


def _num_field(v: Any, uri: str, line: int, field: str) -> float:
    """A coordinate: a number, or ``NaN``/``null`` (kept as NaN so that the one
    point is dropped per image by :func:`validate_points`, not the whole file)."""
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PointsFileError(uri, line, field, f"expected a number, got {v!r}")
    return float(v)


def _parse_line(obj: Any, uri: str, line: int) -> tuple[int, Points]:
    if not isinstance(obj, dict):
        raise PointsFileError(uri, line, None, f"expected a JSON object, got {type(obj).__name__}")
    extra = sorted(set(obj) - _LINE_KEYS)
    if extra:
        raise PointsFileError(uri, line, extra[0], f"unknown key (allowed: {sorted(_LINE_KEYS)})")
    for key in ("image_id", "points"):
        if key not in obj:
            raise PointsFileError(uri, line, key, "missing")
    image_id = _int_field(obj["image_id"], uri, line, "image_id")
    if "file_name" in obj and not isinstance(obj["file_name"], str):
        raise PointsFileError(uri, line, "file_name", f"expected a string, got {obj['file_name']!r}")
    rows = obj["points"]
    if not isinstance(rows, list):
        raise PointsFileError(uri, line, "points", f"expected a list, got {type(rows).__name__}")
    xy = np.empty((len(rows), 2), np.float64)
    seg = np.empty(len(rows), np.int64)
    cat = np.empty(len(rows), np.int64)
    for j, p in enumerate(rows):
        if not isinstance(p, dict):
            raise PointsFileError(uri, line, f"points[{j}]", f"expected an object, got {p!r}")
        extra = sorted(set(p) - set(_POINT_KEYS))
        if extra:
            raise PointsFileError(uri, line, f"points[{j}].{extra[0]}", f"unknown key (allowed: {list(_POINT_KEYS)})")
        for key in _POINT_KEYS:
            if key not in p:
                raise PointsFileError(uri, line, f"points[{j}].{key}", "missing")
        xy[j, 0] = _num_field(p["x"], uri, line, f"points[{j}].x")
        xy[j, 1] = _num_field(p["y"], uri, line, f"points[{j}].y")
        seg[j] = _int_field(p["segment"], uri, line, f"points[{j}].segment")
        cat[j] = _int_field(p["category_id"], uri, line, f"points[{j}].category_id")
    return image_id, Points(xy, seg, cat)


_IMAGE_ID_IN_TEXT = re.compile(r'"image_id"\s*:\s*(-?\d+)\s*[,}]')


def _image_id_of(obj: Any, text: str) -> int | None:
    """The image a (possibly malformed) line is about, when it says so unambiguously."""
    if isinstance(obj, dict):
        v = obj.get("image_id")
        return v if isinstance(v, int) and not isinstance(v, bool) else None
    found = {int(m) for m in _IMAGE_ID_IN_TEXT.findall(text)}
    return found.pop() if len(found) == 1 else None


def read_points_jsonl(uri: str, strict: bool = False) -> PointLabels:
    """Read a point-label file -> :class:`PointLabels` ``{image_id: Points}`` in file order.

    A malformed line or a repeated ``image_id`` is a :class:`PointsFileError`
    naming the file, line and field (the 1-based character column for invalid
    JSON) and the image when the line names one: raised under ``strict``,
    otherwise appended to ``problems`` and the line skipped (the first
    well-formed line of an image is kept).
    """
    out = PointLabels()
    first_line: dict[int, int] = {}

    def skip(err: PointsFileError) -> None:
        if strict:
            raise err
        out.problems.append(err)

    with fsspec.open(uri, "rt", encoding="utf-8-sig", compression="infer") as f:
        for lineno, text in enumerate(f, start=1):
            text = text.rstrip("\r\n")  # the column of an error must count on this line only
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                where = e.msg if e.msg.endswith(" at") else f"{e.msg} at"  # "Unterminated string starting at"
                skip(PointsFileError(uri, lineno, None, f"invalid JSON: {where} column {e.pos + 1}",
                                     _image_id_of(None, text)))
                continue
            try:
                image_id, pts = _parse_line(obj, uri, lineno)
            except PointsFileError as e:
                skip(PointsFileError(e.uri, e.line, e.field, e.reason, _image_id_of(obj, text)))
                continue
            if image_id in out:
                skip(PointsFileError(uri, lineno, "image_id", f"image_id {image_id} already given on line "
                                     f"{first_line[image_id]}; this line is ignored", image_id))
                continue
            out[image_id] = pts
            first_line[image_id] = lineno
    return out
