"""Training-free baselines for extreme-point supervision, and the per-object parsing they share with EXITS.

Every thing ``segment`` among an image's points is one object, given by its
four extreme points (top, left, bottom, right; ExtremeNet protocol,
:func:`pointseg.data.points.extreme_points`). :func:`extreme_objects` turns
them into boxes and flags bad input per object, so that one bad object never
costs the others of its image their labels:

=================== ========================================================= ==========================
status / counter    when                                                      what the generators do
=================== ========================================================= ==========================
``points_clipped``  a point outside the image (or on its far edge)            clipped into the image
``points_invalid``  a non-finite coordinate                                   that point is dropped
``incomplete``      not exactly 4 (finite) points                             box from the points given
``degenerate``      the box is one pixel or one line (width or height 1 px)   the line itself is the mask
``small``           width or height below ``min_object_px`` (4)               the filled box is the mask
``no_points``       no finite point left                                      no mask (counted)
=================== ========================================================= ==========================

Baselines (:data:`BASELINES`; each a :class:`~pointseg.generators.base.PseudoLabelGenerator`):

* ``box`` -- the filled box spanned by the extreme points (the strongest
  trivial baseline for extreme points);
* ``extreme_polygon`` -- the filled quadrilateral top -> left -> bottom ->
  right (ExtremeNet's coarse "octagon" without its box edges);
* ``grabcut`` -- OpenCV GrabCut initialised with the box (``cv2.grabCut``,
  ``GC_INIT_WITH_RECT``; Rother et al. 2004), the classic training-free
  baseline of box supervision (Khoreva et al. 2017). ``seed_extreme_points``
  also marks the four extreme pixels as definite foreground.

Overlaps: objects are painted from the largest box to the smallest, so a pixel
claimed by several objects goes to the smallest (usually in front), the rule
of :func:`pointseg.data.coco.panoptic_order`. Pixels no object claims are
VOID, or, when the image also has stuff clicks (``dataset.background:
stuff``), the nearest stuff click's segment (:func:`fill_stuff`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import cv2
import numpy as np
from pydantic import Field
from scipy import ndimage

from pointseg.data.record import Category, Points
from pointseg.generators.base import GeneratorConfig, PseudoLabel, PseudoLabelGenerator, assemble, seed_groups

#: Per-object problems counted in every extreme-point generator's diagnostics.
OBJECT_COUNTERS = ("points_clipped", "points_invalid", "incomplete", "degenerate", "small", "no_points")


@dataclass
class ExtremeObject:
    """One object of an image, from its extreme points.

    ``group`` indexes :func:`~pointseg.generators.base.seed_groups`'s list.
    ``extremes`` is ``(4, 2) float`` ``(x, y)`` of top, left, bottom, right
    (the topmost / leftmost / ... of the points given, after clipping);
    ``box`` is ``(x_l, y_t, x_r, y_b)`` pixel indices, inclusive.
    ``status`` is ``"ok"``, ``"degenerate"``, ``"small"`` or ``"no_points"``;
    ``problems`` counts the fixes applied (``points_clipped`` ...).
    """

    group: int
    segment: int
    category_id: int
    extremes: np.ndarray
    box: tuple[int, int, int, int]
    status: str
    problems: Counter = field(default_factory=Counter)

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0] + 1

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1] + 1


def extreme_objects(points: Points, categories: dict[int, Category], height: int, width: int,
                    min_object_px: int = 4) -> tuple[list, list[ExtremeObject]]:
    """``(groups, objects)``: the thing objects of an image with their boxes and statuses (module table).

    Stuff groups get no object (extreme points are a thing annotation).
    """
    groups = seed_groups(points, categories)
    objects = []
    for gi, g in enumerate(groups):
        if not g.isthing:
            continue
        problems: Counter = Counter()
        xy = points.xy[g.point_index]
        finite = np.isfinite(xy).all(1)
        problems["points_invalid"] += int((~finite).sum())
        xy = xy[finite]
        if len(xy) != 4:
            problems["incomplete"] += 1
        if len(xy) == 0:
            problems["no_points"] += 1
            objects.append(ExtremeObject(gi, g.source_segment, g.category_id, np.zeros((4, 2)), (0, 0, 0, 0),
                                         "no_points", problems))
            continue
        rc = np.rint(xy[:, ::-1])
        outside = (rc[:, 0] < 0) | (rc[:, 0] > height - 1) | (rc[:, 1] < 0) | (rc[:, 1] > width - 1)
        problems["points_clipped"] += int(outside.sum())
        xy = np.stack([np.clip(xy[:, 0], 0, width - 1), np.clip(xy[:, 1], 0, height - 1)], 1)
        ext = xy[[np.argmin(xy[:, 1]), np.argmin(xy[:, 0]), np.argmax(xy[:, 1]), np.argmax(xy[:, 0])]]
        px = np.rint(ext).astype(int)
        box = (int(px[1, 0]), int(px[0, 1]), int(px[3, 0]), int(px[2, 1]))
        w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
        status = "degenerate" if min(w, h) <= 1 else "small" if min(w, h) < min_object_px else "ok"
        if status != "ok":
            problems[status] += 1
        objects.append(ExtremeObject(gi, g.source_segment, g.category_id, ext, box, status, problems))
    return groups, objects


def box_mask(obj: ExtremeObject, height: int, width: int) -> np.ndarray:
    """``(H, W) bool``: the filled box of ``obj`` (a line or a pixel for a degenerate one)."""
    m = np.zeros((height, width), bool)
    x0, y0, x1, y1 = obj.box
    m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


def extreme_polygon_mask(obj: ExtremeObject, height: int, width: int) -> np.ndarray:
    """``(H, W) bool``: the filled polygon top -> left -> bottom -> right (pixel centres, edges included)."""
    m = np.zeros((height, width), np.uint8)
    pts = np.rint(obj.extremes).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(m, [pts], 1)
    cv2.polylines(m, [pts], True, 1)
    return m.astype(bool)


def object_diagnostics(objects: list[ExtremeObject]) -> dict:
    """Per-image counts: ``objects``, ``labelled`` (status ok) and each :data:`OBJECT_COUNTERS` entry."""
    total: Counter = Counter()
    for o in objects:
        total.update(o.problems)
    out = {"objects": len(objects), "labelled": sum(o.status == "ok" for o in objects)}
    out.update({k: int(total[k]) for k in OBJECT_COUNTERS})
    return out


def summarize_objects(title: str, diagnostics: list[dict], extra: tuple[str, ...] = ()) -> dict | None:
    """Run-level sums of :func:`object_diagnostics` (plus ``extra`` counters) for the report."""
    keys = ("objects", "labelled", *OBJECT_COUNTERS, *extra)
    rows = [d for d in diagnostics if d and "objects" in d]
    if not rows:
        return None
    summary = {k: int(sum(d.get(k, 0) for d in rows)) for k in keys}
    table = [{"problem": k, "objects": summary[k]} for k in (*OBJECT_COUNTERS, *extra) if summary[k]]
    return {"title": title, "summary": summary, "table": table}


def paint_smallest_last(masks: list[np.ndarray], objects: list[ExtremeObject], height: int,
                        width: int) -> np.ndarray:
    """``(H, W) int`` group index per pixel (-1 none); larger boxes painted first, smaller win."""
    assignment = np.full((height, width), -1, np.int64)
    order = sorted(range(len(objects)), key=lambda i: -objects[i].width * objects[i].height)
    for i in order:
        if masks[i] is not None:
            assignment[masks[i]] = objects[i].group
    return assignment


def fill_stuff(assignment: np.ndarray, points: Points, groups: list) -> np.ndarray:
    """Pixels no object claims go to the stuff segment of the nearest stuff point (none: they stay -1).

    Extreme points annotate things; a stuff click (the VOC-panoptic protocol's
    ``background``, ``dataset.background: stuff``) takes the rest of the image.
    """
    stuff = [gi for gi, g in enumerate(groups) if not g.isthing]
    if not stuff:
        return assignment
    h, w = assignment.shape
    seeds = np.full((h, w), -1, np.int64)
    for gi in stuff:
        xy = points.xy[groups[gi].point_index]
        xy = xy[np.isfinite(xy).all(1)]
        rc = Points(xy, np.zeros(len(xy)), np.zeros(len(xy))).pixels(h, w)
        seeds[rc[:, 0], rc[:, 1]] = gi
    if (seeds < 0).all():
        return assignment
    _, (ri, ci) = ndimage.distance_transform_edt(seeds < 0, return_indices=True)
    return np.where(assignment < 0, seeds[ri, ci], assignment)


class ExtremeBaselineConfig(GeneratorConfig):
    min_object_px: int = Field(4, ge=1, description="objects narrower or lower than this get the filled box")


class GrabCutConfig(ExtremeBaselineConfig):
    iterations: int = Field(5, ge=1, description="cv2.grabCut iterCount")
    context: float = Field(0.5, ge=0, description="background context around the box, as a fraction of its size")
    seed_extreme_points: bool = Field(False, description="also mark the extreme pixels as definite foreground")


class _ExtremeBaseline(PseudoLabelGenerator):
    """Shared loop: parse objects, mask each ``ok`` object, fall back per object, paint."""

    Config = ExtremeBaselineConfig
    extra_counters: tuple[str, ...] = ()

    def object_mask(self, image: np.ndarray, obj: ExtremeObject, counts: Counter) -> np.ndarray:
        raise NotImplementedError

    def generate(self, image: np.ndarray, points: Points) -> PseudoLabel:
        h, w = image.shape[:2]
        groups, objects = extreme_objects(points, self.categories, h, w, self.config.min_object_px)
        if not groups:
            raise ValueError("image has no points")
        counts: Counter = Counter()
        masks = []
        for o in objects:
            if o.status == "no_points":
                masks.append(None)
            elif o.status == "ok":
                masks.append(self.object_mask(image, o, counts))
            else:
                masks.append(box_mask(o, h, w))
        diag = object_diagnostics(objects)
        diag.update({k: int(counts[k]) for k in self.extra_counters})
        return assemble(fill_stuff(paint_smallest_last(masks, objects, h, w), points, groups), groups, diag)

    @classmethod
    def summarize(cls, diagnostics: list[dict]) -> dict | None:
        return summarize_objects(f"{cls.name}: objects from extreme points", diagnostics, cls.extra_counters)


class BoxGenerator(_ExtremeBaseline):
    name = "box"

    def object_mask(self, image, obj, counts):
        return box_mask(obj, *image.shape[:2])


class ExtremePolygonGenerator(_ExtremeBaseline):
    name = "extreme_polygon"

    def object_mask(self, image, obj, counts):
        return extreme_polygon_mask(obj, *image.shape[:2])


class GrabCutGenerator(_ExtremeBaseline):
    """GrabCut in a window of the box plus ``context``; a failure or an empty result falls back to the box."""

    name = "grabcut"
    Config = GrabCutConfig
    extra_counters = ("grabcut_failed", "grabcut_empty")

    def object_mask(self, image, obj, counts):
        h, w = image.shape[:2]
        x0, y0, x1, y1 = obj.box
        cx, cy = int(np.ceil(self.config.context * obj.width)) + 2, int(np.ceil(self.config.context * obj.height)) + 2
        wx0, wy0, wx1, wy1 = max(0, x0 - cx), max(0, y0 - cy), min(w - 1, x1 + cx), min(h - 1, y1 + cy)
        window = np.ascontiguousarray(image[wy0 : wy1 + 1, wx0 : wx1 + 1, ::-1])  # OpenCV wants BGR
        gc = np.zeros(window.shape[:2], np.uint8)
        rect = (x0 - wx0, y0 - wy0, obj.width, obj.height)
        out = box_mask(obj, h, w)
        if rect[2] >= window.shape[1] and rect[3] >= window.shape[0]:
            counts["grabcut_failed"] += 1  # the box fills the image: no background to model
            return out
        try:
            if self.config.seed_extreme_points:
                gc[rect[1] : rect[1] + rect[3], rect[0] : rect[0] + rect[2]] = cv2.GC_PR_FGD
                for x, y in np.rint(obj.extremes).astype(int):
                    gc[y - wy0, x - wx0] = cv2.GC_FGD
                mode, r = cv2.GC_INIT_WITH_MASK, None
            else:
                mode, r = cv2.GC_INIT_WITH_RECT, rect
            bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
            cv2.grabCut(window, gc, r, bgd, fgd, self.config.iterations, mode)
        except cv2.error:
            counts["grabcut_failed"] += 1
            return out
        fg = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
        if not fg.any():
            counts["grabcut_empty"] += 1
            return out
        out[:] = False
        out[wy0 : wy1 + 1, wx0 : wx1 + 1] = fg
        return out


#: The extreme-point baselines, registered in :data:`pointseg.generators.GENERATORS`.
BASELINES = (BoxGenerator, ExtremePolygonGenerator, GrabCutGenerator)
