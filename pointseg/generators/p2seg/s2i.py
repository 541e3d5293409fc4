"""S2I, semantic to instance: instance labels from a semantic map and the points (P2Seg Sec. 3.1).

Wang et al., "P2Seg: Pointly-supervised Segmentation via Mutual Distillation",
ICLR 2024, Sec. 3.1, Eq. 1-2, Table 6. Everything here is a plain function on
arrays; the network side lives in :mod:`.network` and :mod:`.stage1`.

Conventions shared by the functions of this module:

* ``semantic`` (h, w) int64: 0 = background, ``c >= 1`` a thing class (any
  label space; :mod:`.generator` uses ``1 + index`` of the sorted thing ids).
* ``point_yx`` (K, 2) float: ``(row, col)`` of every thing point on the grid
  of ``semantic``; its pixel is ``round(point_yx)``.
* ``point_group`` (K,) int in ``[0, G)``: the instance each point belongs to
  (one point per instance with P1; several with P10), ``group_class`` (G,)
  int >= 1 each instance's class, from its points.
* an instance map is (h, w) int64: ``g`` in ``[0, G)`` or -1 = no instance.

**Matching** (:func:`s2i_instances`). The connected components (8-connected)
of every class region of ``semantic`` are matched to the points lying in them.
Two priorities decide the conflicts (Table 6):

* ``"points"`` ("Points First", the paper's choice): the points decide identity
  *and* class. A component is shared by the instances that have a point in it,
  whatever their class, pixel by pixel by distance separation (Eq. 1,
  :func:`nearest_point_split`); each part takes its point's class. A point on
  background gets a default box (``default_box``, 16 x 16 in the paper), as
  does an instance whose region has fewer than ``min_area`` pixels (e.g. a point
  on a 1-pixel component); a box only takes background pixels. Every point
  pixel ends in its own instance ("seed pixel restored" when it did not).
* ``"semantic"`` ("Semantic Results First", BESTIE's semantic knowledge
  transfer): the semantic map decides. A component becomes at most one
  instance, of its own class: of the instances with a point of that class in
  it, the one whose point is nearest the component's centroid; the other points
  in it are lost (adjacent same-class objects merge), as are points of another
  class and points on background. No boxes.

``split`` replaces Eq. 1 for the shared components of Points First:
:class:`GeodesicSplit` (``grouping: geodesic``, our extension) gives each
pixel to the member point nearest in PSPS's geodesic cost, so the cut between
two touching objects follows colour edges instead of the bisector.

Components without a point stay background: a semantic region no point names
is not an instance (``orphans: nearest``, our extension: Points First gives
their pixels to the nearest point instead).

**Offsets** (Eq. 2, :func:`offset_targets`): ``O(m) = e_k - m`` for every pixel
``m`` of the instance of point ``e_k`` (the instance's nearest point with P10),
as a 2-D ``(dy, dx)`` vector in grid pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import cv2
import numpy as np

from pointseg.generators.psps import geodesic_cost, scaled_cells
from pointseg.geodesic import nearest_source, split_within

__all__ = [
    "GeodesicSplit",
    "S2IResult",
    "class_components",
    "default_box_mask",
    "nearest_point_split",
    "offset_targets",
    "s2i_instances",
]

Priority = Literal["points", "semantic"]

#: Pixel-point pairs per block of :func:`nearest_point_split`.
_CHUNK = 1 << 20


@dataclass
class S2IResult:
    """Output of :func:`s2i_instances`.

    instance : (h, w) int64, instance index ``g`` or -1.
    instance_class : (G,) int64, the class each instance is labelled with.
    counters : per-image counts of the conflicts and fallbacks (module docstring):
        ``components`` (components with a point), ``split_components`` (shared by
        two or more instances), ``class_conflicts`` (points inside a component of
        another class), ``default_boxes``, ``lost_points``, ``seed_pixels_restored``.
    """

    instance: np.ndarray
    instance_class: np.ndarray
    counters: dict[str, int] = field(default_factory=dict)


def class_components(semantic: np.ndarray) -> np.ndarray:
    """Connected components of every class region of ``semantic``.

    semantic : (h, w) int, 0 = background.
    Returns (h, w) int64: component index ``0..n-1`` (8-connectivity, one
    class per component), -1 on background.
    """
    semantic = np.asarray(semantic)
    comp = np.full(semantic.shape, -1, np.int64)
    n = 0
    for c in np.unique(semantic):
        if c == 0:
            continue
        k, lab = cv2.connectedComponents((semantic == c).astype(np.uint8), connectivity=8)
        inside = lab > 0
        comp[inside] = lab[inside].astype(np.int64) - 1 + n
        n += k - 1
    return comp


def nearest_point_split(pixels_yx: np.ndarray, point_yx: np.ndarray, offsets: np.ndarray | None = None) -> np.ndarray:
    """Distance separation (Eq. 1): each pixel goes to its nearest point.

    ``k* = argmin_k ||e_k - p||`` for every pixel ``p``; with ``offsets`` the
    pixel votes from where its predicted offset sends it,
    ``k* = argmin_k ||e_k - (p + O(p))||`` (the class-agnostic grouping of the
    S2I branch, Sec. 3.1).

    pixels_yx : (n, 2) float, the pixels ``p``; point_yx : (K, 2) float, the
    points ``e_k``; offsets : (n, 2) float ``(dy, dx)`` per pixel, or None.
    Returns (n,) int64 index into ``point_yx`` (ties: the lowest index).
    """
    p = np.asarray(pixels_yx, np.float64)
    if offsets is not None:
        p = p + np.asarray(offsets, np.float64)
    e = np.asarray(point_yx, np.float64)
    out = np.empty(len(p), np.int64)
    step = max(1, _CHUNK // max(len(e), 1))  # bounds the (n, K) distance block in memory
    for s in range(0, len(p), step):
        d2 = ((p[s:s + step, None, :] - e[None, :, :]) ** 2).sum(-1)
        out[s:s + step] = d2.argmin(1)
    return out


class GeodesicSplit:
    """Split of a component among its points by PSPS's geodesic cost (``grouping: geodesic``).

    The cost is PSPS's (:func:`pointseg.geodesic.edge_costs`: LAB colour plus
    ``beta`` times the Sobel boundary) at ``downscale`` of the image, computed
    once per image. ``split(pixels_yx, members)`` runs one multi-source
    Dijkstra from the members' points (:func:`pointseg.geodesic.nearest_source`)
    and returns, for each pixel, the index into ``members`` of the nearest
    point. Paths may leave the component, as PSPS's do; with ``within``
    (``split_within: component``) they stay inside it and the members' cells
    (:func:`pointseg.geodesic.split_within`), and a pixel they cannot reach from
    inside (an orphan component, a part cut off on the working grid) takes the
    open split. Pixels and points map to the working grid as PSPS maps them
    (``floor((y + 0.5) h / H)``). ``cost``: that ``(edge lengths, (h, w))``
    when the caller already has it for the same image, ``downscale``,
    ``blur_sigma`` and ``beta`` (it is not recomputed).
    """

    def __init__(self, image: np.ndarray, point_yx: np.ndarray, beta: float = 0.1, downscale: float = 0.5,
                 blur_sigma: float = 0.5, within: bool = False, cost=None) -> None:
        self.image_size = np.asarray(image).shape[:2]
        self.cost, self.size = cost if cost is not None else geodesic_cost(image, downscale, blur_sigma, beta)
        self.cells = self._cells(point_yx)
        self.within = within

    def _cells(self, yx: np.ndarray) -> np.ndarray:
        return scaled_cells(yx, *self.image_size, *self.size)

    def __call__(self, pixels_yx: np.ndarray, members: np.ndarray) -> np.ndarray:
        rc = self._cells(pixels_yx)
        sources = self.cells[members]

        def split(edges: np.ndarray) -> np.ndarray:
            return nearest_source(edges, sources, labels=np.arange(len(members)))[1]

        if self.within:
            inside = np.zeros(self.size, bool)
            inside[rc[:, 0], rc[:, 1]] = True
            inside[sources[:, 0], sources[:, 1]] = True
            label = split_within(split, self.cost, inside)
        else:
            label = split(self.cost)
        return label[rc[:, 0], rc[:, 1]].astype(np.int64)


def offset_targets(instance: np.ndarray, point_yx: np.ndarray, point_group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offset map of an instance map (Eq. 2): ``O(m) = e_k - m`` on every instance pixel.

    instance : (h, w) int, instance index or -1; point_yx : (K, 2) float;
    point_group : (K,) int, the instance of each point. With several points per
    instance, ``e_k`` is the instance's point nearest to ``m`` (Eq. 1).
    Returns ``offsets`` (2, h, w) float32 ``(dy, dx)`` (0 off the instances)
    and ``valid`` (h, w) bool, the pixels where ``O`` is defined
    (``P_pseudo`` of Eq. 3).
    """
    instance = np.asarray(instance)
    point_yx = np.asarray(point_yx, np.float64).reshape(-1, 2)
    point_group = np.asarray(point_group, np.int64).reshape(-1)
    offsets = np.zeros((2,) + instance.shape, np.float32)
    valid = np.zeros(instance.shape, bool)
    for g in np.unique(point_group):
        ys, xs = np.nonzero(instance == g)
        if len(ys) == 0:
            continue
        pts = point_yx[point_group == g]
        pix = np.stack([ys, xs], 1).astype(np.float64)
        e = pts[nearest_point_split(pix, pts)] if len(pts) > 1 else np.broadcast_to(pts[0], pix.shape)
        offsets[0, ys, xs] = e[:, 0] - ys
        offsets[1, ys, xs] = e[:, 1] - xs
        valid[ys, xs] = True
    return offsets, valid


def default_box_mask(shape: tuple[int, int], yx: np.ndarray, box: tuple[int, int]) -> np.ndarray:
    """(h, w) bool: a ``box = (bh, bw)`` pixel box centred on each point of ``yx`` (K, 2), clipped."""
    h, w = shape
    bh, bw = max(1, int(box[0])), max(1, int(box[1]))
    m = np.zeros(shape, bool)
    for y, x in np.rint(np.asarray(yx, np.float64).reshape(-1, 2)).astype(np.int64):
        y0, x0 = y - bh // 2, x - bw // 2
        m[max(y0, 0):min(y0 + bh, h), max(x0, 0):min(x0 + bw, w)] = True
    return m


def _point_pixels(point_yx: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rc = np.rint(point_yx).astype(np.int64)
    rc[:, 0] = np.clip(rc[:, 0], 0, shape[0] - 1)
    rc[:, 1] = np.clip(rc[:, 1], 0, shape[1] - 1)
    return rc


def s2i_instances(semantic: np.ndarray, point_yx: np.ndarray, point_group: np.ndarray, group_class: np.ndarray,
                  priority: Priority = "points", offsets: np.ndarray | None = None,
                  default_box: tuple[int, int] = (16, 16), min_area: int = 4,
                  components: Literal["class", "foreground"] = "class",
                  split: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                  orphans: Literal["background", "nearest"] = "background") -> S2IResult:
    """Instance labels from ``semantic`` and the points (S2I, module docstring).

    semantic : (h, w) int, 0 = background; point_yx : (K, 2) float ``(row, col)``;
    point_group : (K,) int in ``[0, G)``; group_class : (G,) int >= 1.
    priority : ``"points"`` (Points First) or ``"semantic"`` (Semantic Results First).
    offsets : optional (2, h, w) float ``(dy, dx)``: predicted offsets; components
        shared by several instances are then split by where each pixel's offset
        points (Eq. 1 on ``p + O(p)``) instead of by the pixel itself.
    default_box : ``(bh, bw)`` of the box a point without a region gets (Points First).
    min_area : a Points-First instance with fewer pixels also gets its box.
    components : ``"class"`` (the paper: components of every class region) or
        ``"foreground"`` (components of the foreground, all thing classes
        together: the semantic map then only decides foreground from
        background and where a component ends; a component's class, for
        Semantic Results First and the conflict count, is its majority class).
    split : optional ``split(pixels_yx (n, 2), members (m,) point indices) -> (n,)``
        index into ``members``: how Points First splits a shared component
        (e.g. :class:`GeodesicSplit`); replaces Eq. 1 and ``offsets`` there.
    orphans : Points First: ``"background"`` (the paper) leaves a component no
        point lies in as background; ``"nearest"`` gives each of its pixels to
        the nearest point of the image (by ``split``, else Eq. 1), counted in
        ``orphan_pixels``.
    Returns an :class:`S2IResult`.
    """
    semantic = np.asarray(semantic)
    h, w = semantic.shape
    point_yx = np.asarray(point_yx, np.float64).reshape(-1, 2)
    point_group = np.asarray(point_group, np.int64).reshape(-1)
    group_class = np.asarray(group_class, np.int64).reshape(-1)
    if len(point_yx) != len(point_group):
        raise ValueError(f"point_yx has {len(point_yx)} points but point_group {len(point_group)}")
    if len(point_group) and (point_group.min() < 0 or point_group.max() >= len(group_class)):
        raise ValueError(f"point_group must index group_class (0..{len(group_class) - 1}), got {point_group.tolist()}")
    if (group_class < 1).any():
        raise ValueError(f"group_class must be thing classes >= 1 (0 is background), got {group_class.tolist()}")
    if priority not in ("points", "semantic"):
        raise ValueError(f"priority must be 'points' or 'semantic', got {priority!r}")
    counters = dict(components=0, split_components=0, class_conflicts=0, default_boxes=0, lost_points=0,
                    seed_pixels_restored=0, orphan_pixels=0)
    instance = np.full((h, w), -1, np.int64)
    G = len(group_class)
    if len(point_yx) == 0:
        return S2IResult(instance, group_class.copy(), counters)
    rc = _point_pixels(point_yx, (h, w))
    if components not in ("class", "foreground"):
        raise ValueError(f"components must be 'class' or 'foreground', got {components!r}")
    comp = class_components(semantic if components == "class" else (semantic > 0).astype(np.int64))
    point_comp = comp[rc[:, 0], rc[:, 1]]
    point_class = group_class[point_group]
    for c in np.unique(point_comp[point_comp >= 0]):
        members = np.flatnonzero(point_comp == c)
        ys, xs = np.nonzero(comp == c)
        comp_class = int(np.bincount(semantic[ys, xs]).argmax())
        counters["components"] += 1
        same = members[point_class[members] == comp_class]
        counters["class_conflicts"] += int(len(members) - len(same))
        if priority == "semantic":
            counters["lost_points"] += int(len(members) - len(same))
            if len(same) == 0:
                continue
            groups = np.unique(point_group[same])
            if len(groups) > 1:
                counters["split_components"] += 1
                centroid = np.array([[ys.mean(), xs.mean()]])
                keep = point_group[same[nearest_point_split(centroid, point_yx[same])[0]]]
                counters["lost_points"] += int((point_group[same] != keep).sum())
                groups = np.array([keep])
            instance[ys, xs] = groups[0]
            continue
        groups = np.unique(point_group[members])
        if len(groups) == 1:
            instance[ys, xs] = groups[0]
            continue
        counters["split_components"] += 1
        pix = np.stack([ys, xs], 1).astype(np.float64)
        if split is not None:
            instance[ys, xs] = point_group[members[split(pix, members)]]
            continue
        off = offsets[:, ys, xs].T if offsets is not None else None
        instance[ys, xs] = point_group[members[nearest_point_split(pix, point_yx[members], off)]]
    if priority == "semantic":
        counters["lost_points"] += int((point_comp < 0).sum())
        return S2IResult(instance, group_class.copy(), counters)
    if orphans == "nearest":
        ys, xs = np.nonzero((comp >= 0) & (instance < 0))
        counters["orphan_pixels"] = int(len(ys))
        if len(ys):
            pix = np.stack([ys, xs], 1).astype(np.float64)
            every = np.arange(len(point_yx))
            k = split(pix, every) if split is not None else nearest_point_split(pix, point_yx)
            instance[ys, xs] = point_group[k]
    # Points First: every point keeps a region of its own.
    areas = np.bincount(instance[instance >= 0], minlength=G)
    for g in range(G):
        if areas[g] >= min_area:
            continue
        box = default_box_mask((h, w), point_yx[point_group == g], default_box) & (instance < 0)
        instance[box] = g
        counters["default_boxes"] += 1
    wrong = instance[rc[:, 0], rc[:, 1]] != point_group
    counters["seed_pixels_restored"] = int(wrong.sum())
    instance[rc[wrong, 0], rc[wrong, 1]] = point_group[wrong]
    return S2IResult(instance, group_class.copy(), counters)
