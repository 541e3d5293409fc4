"""From points, stage-1 labels and network outputs to P2Seg's maps: shared by training and labelling.

* :func:`thing_layout` -- the thing points of an image as S2I wants them
  (``point_yx``, ``point_group``, ``group_class``), from the shared grouping
  rule (:func:`~pointseg.generators.base.seed_groups`);
* :func:`semantic_from_label` -- a pseudo label as a class-channel semantic map;
* :func:`s2i_targets` -- S2I (:func:`~.s2i.s2i_instances`) and the stage-1
  targets of Eq. 2-5 it yields: class map, offset map, its weight ``W``, and
  the grid labels of the affinity;
* :func:`network_maps` -- one image's network outputs as a semantic
  distribution (I2S or the plain class map, restricted to the image's classes),
  its argmax and the offsets, at any output size.

Class channels: 0 = background, ``1 + i`` = the ``i``-th thing category id in
sorted order (:func:`thing_channels`), or a single foreground channel 1 for a
class-agnostic map. Stuff categories are background for the instance task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from pointseg.argmax import first_argmax
from pointseg.data.record import Category, Points
from pointseg.generators.base import PseudoLabel, SeedGroup, seed_groups
from pointseg.generators.p2seg.i2s import (grid_labels, i2s_semantic, i2s_window_semantic, pixel_cell_affinity,
                                          pool_to_grid)
from pointseg.generators.p2seg.s2i import S2IResult, offset_targets, s2i_instances

if TYPE_CHECKING:
    from pointseg.generators.p2seg.config import P2SegConfig

__all__ = [
    "ThingLayout",
    "network_maps",
    "s2i_targets",
    "scale_points",
    "semantic_from_label",
    "thing_channels",
    "thing_layout",
]


def thing_channels(categories: dict[int, Category], class_map: str = "classes") -> dict[int, int]:
    """Thing category id -> class-map channel: ``1 + rank`` among the sorted thing ids, or 1 for
    every thing with ``class_map="agnostic"`` (one foreground channel)."""
    things = sorted(c for c, cat in categories.items() if cat.isthing)
    if class_map == "agnostic":
        return {c: 1 for c in things}
    if class_map != "classes":
        raise ValueError(f"class_map must be 'classes' or 'agnostic', got {class_map!r}")
    return {c: i + 1 for i, c in enumerate(things)}


@dataclass
class ThingLayout:
    """An image's points grouped for S2I.

    groups : all seed groups of the image (things and stuff), output order.
    things : (G,) indices into ``groups`` of the thing groups; S2I instance ``g``
        is ``groups[things[g]]``.
    point_yx : (K, 2) float ``(row, col)`` of the thing points on the working grid.
    point_group : (K,) int, instance of each thing point; group_class : (G,) int channel.
    stuff_yx / stuff_group : the stuff points and their index into ``groups``.
    """

    groups: list[SeedGroup]
    things: np.ndarray
    point_yx: np.ndarray
    point_group: np.ndarray
    group_class: np.ndarray
    stuff_yx: np.ndarray
    stuff_group: np.ndarray


def scale_points(points: Points, height: int, width: int, out_h: int, out_w: int) -> Points:
    """Points of a ``height x width`` image on the same image resized to ``out_h x out_w`` (pixel centres kept)."""
    xy = (points.xy + 0.5) * np.array([out_w / width, out_h / height]) - 0.5
    return Points(xy, points.segment, points.category_id)


def thing_layout(points: Points, categories: dict[int, Category], channel_of: dict[int, int]) -> ThingLayout:
    """Group ``points`` (:func:`seed_groups`) and lay the thing groups out for S2I (coordinates as given)."""
    groups = seed_groups(points, categories)
    things = [i for i, g in enumerate(groups) if g.isthing]
    missing = sorted({groups[i].category_id for i in things} - set(channel_of))
    if missing:
        raise ValueError(f"points.category_id {missing}: no class-map channel (not among the network's thing classes)")
    yx = points.xy[:, ::-1]
    point_idx = [groups[i].point_index for i in things]
    stuff = [i for i, g in enumerate(groups) if not g.isthing]
    stuff_idx = [groups[i].point_index for i in stuff]
    return ThingLayout(
        groups=groups,
        things=np.asarray(things, np.int64),
        point_yx=np.concatenate([yx[p] for p in point_idx]) if things else np.zeros((0, 2)),
        point_group=np.concatenate([np.full(len(p), g, np.int64) for g, p in enumerate(point_idx)])
        if things else np.zeros(0, np.int64),
        group_class=np.asarray([channel_of[groups[i].category_id] for i in things], np.int64),
        stuff_yx=np.concatenate([yx[p] for p in stuff_idx]) if stuff else np.zeros((0, 2)),
        stuff_group=np.concatenate([np.full(len(p), i, np.int64) for i, p in zip(stuff, stuff_idx)])
        if stuff else np.zeros(0, np.int64),
    )


def semantic_from_label(label: PseudoLabel, channel_of: dict[int, int]) -> np.ndarray:
    """(h, w) int64 class-channel map of a pseudo label: its thing segments' channels, 0 elsewhere."""
    lut = np.zeros(int(label.id_map.max()) + 1, np.int64)
    for s in label.segments_info:
        if s["isthing"] and int(s["category_id"]) in channel_of:
            lut[int(s["id"])] = channel_of[int(s["category_id"])]
    return lut[label.id_map]


def on_grid(semantic: np.ndarray, grid: int) -> np.ndarray:
    """``semantic`` (h, w) seen on a ``grid`` x ``grid`` square grid, back at (h, w).

    Cell ``(i, j)`` takes the pixel at its centre, row ``floor((i + 0.5) h / grid)``
    (columns alike), and pixel ``(y, x)`` takes cell ``(floor(y grid / h),
    floor(x grid / w))``: what a map of that grid can express of ``semantic``.
    """
    h, w = semantic.shape
    rows = ((np.arange(grid) + 0.5) * h / grid).astype(np.int64)
    cols = ((np.arange(grid) + 0.5) * w / grid).astype(np.int64)
    cells = semantic[np.ix_(rows, cols)]
    return cells[np.ix_(np.arange(h) * grid // h, np.arange(w) * grid // w)]


def s2i_targets(semantic: np.ndarray, layout: ThingLayout, priority: str, grid: int,
                default_box: tuple[int, int], min_area: int, offsets: np.ndarray | None = None,
                class_prob: np.ndarray | None = None, present: list[int] | None = None,
                components: str = "class") -> tuple[dict, S2IResult]:
    """S2I on ``semantic`` and the stage-1 targets it gives (Eq. 2-5).

    semantic : (h, w) int64 channel map; offsets : optional (2, h, w) predicted
    offsets for the split (``grouping="offsets"``); class_prob / present: the
    (K, h, w) distribution over the channels ``present`` that made ``semantic``,
    for the confidence weight ``W`` of Eq. 3 (None: ``W = 1``).

    Returns ``targets`` -- ``cls`` (h, w) int64 (Eq. 4: instance pixels take
    their instance's class, the rest background), ``offsets`` (2, h, w) float32
    (Eq. 2), ``weight`` (h, w) float32 (``W``, 0 off the instances), ``grid``
    (grid²,) int64 instance label per affinity cell (-1 background) -- and the
    :class:`~.s2i.S2IResult`.
    """
    res = s2i_instances(semantic, layout.point_yx, layout.point_group, layout.group_class, priority, offsets,
                        default_box, min_area, components)
    inst = res.instance
    cls = np.where(inst >= 0, layout.group_class[np.maximum(inst, 0)] if len(layout.group_class) else 0, 0)
    off, valid = offset_targets(inst, layout.point_yx, layout.point_group)
    weight = valid.astype(np.float32)
    if class_prob is not None and present is not None and len(layout.group_class):
        row = {c: i for i, c in enumerate(present)}
        for g, c in enumerate(layout.group_class):
            m = inst == g
            if m.any():
                weight[m] = float(class_prob[row[int(c)]][m].mean())
    targets = {"cls": cls.astype(np.int64), "offsets": off, "weight": weight, "grid": grid_labels(inst, grid).ravel()}
    return targets, res


@torch.no_grad()
def network_maps(out: dict[str, torch.Tensor], present: list[int], params: "P2SegConfig",
                 size: tuple[int, int], input_size: int,
                 window: tuple[int, int] | None = None) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """One image's semantic distribution, semantic map and offsets at ``size = (h, w)``.

    out : the network outputs of one image (no batch dimension): ``class_logits``
    (c+1, s, s), ``offsets`` (2, s, s) in input pixels, ``embedding`` (D, s, s),
    ``affinity_logits`` (N, N); present : the channels allowed (background 0 and
    the classes of the image's points: the image-level cleaning of the authors'
    code); params : the labelling keys read here (``beta``, ``i2s``,
    ``i2s_rows``, ``foreground``); input_size : side of the square input the
    network saw (offsets are in its pixels); window : ``(k, dilation)`` when
    the network's affinity is the window one (``affinity_logits`` (k², s s);
    ``S`` is then :func:`~.i2s.i2s_window_semantic` at the class map's resolution).

    ``C`` = softmax of the class logits over ``present``; with ``i2s`` the
    distribution is ``S = Â^{∘β} * C`` (:func:`~.i2s.i2s_semantic`) with ``C``
    pooled to the affinity grid, its rows the grid cells (``i2s_rows: grid``:
    ``S`` on the grid) or every pixel of the class map
    (``i2s_rows: pixels``: ``Â`` of each pixel's embedding against the cells'
    pooled ones, :func:`~.i2s.pixel_cell_affinity`; ``S`` at the class map's
    resolution); else ``C``. It is upsampled (bilinear) to ``size``. Returns
    ``prob`` (K, h, w) float32 tensor over ``present``,
    ``semantic`` (h, w) int64 channel map and ``offsets`` (2, h, w) float32 in
    pixels of ``size`` (scaled from the input's). ``foreground="argmax"``: the
    semantic map is the argmax of ``prob``; ``"mass"``: a pixel is foreground
    when the thing classes together outweigh background (``1 - S_0 > S_0``),
    and then takes the most probable thing class (with one class per image the
    two agree; with several, background no longer wins by splitting the
    foreground's mass).
    """
    beta, foreground = params.beta, params.foreground
    logits = out["class_logits"][present].float()
    prob = logits.softmax(0)
    if params.i2s and window is not None:
        prob = i2s_window_semantic(out["affinity_logits"][None].float(), prob[None], beta, *window)[0]
    elif params.i2s:
        grid = int(round(out["affinity_logits"].shape[-1] ** 0.5))
        cells = pool_to_grid(prob[None], grid)[0]
        if params.i2s_rows == "pixels":
            h, w = prob.shape[-2:]
            prob = i2s_semantic(pixel_cell_affinity(out["embedding"].float(), grid), cells, beta).view(-1, h, w)
        else:
            prob = i2s_semantic(out["affinity_logits"].float(), cells, beta).view(len(present), grid, grid)
    prob = F.interpolate(prob[None], size=size, mode="bilinear", align_corners=False)[0]
    if foreground == "mass" and len(present) > 1:
        best = first_argmax(prob[1:], 0) + 1
        best[prob[0] >= 0.5] = 0
        semantic = np.asarray(present, np.int64)[best.cpu().numpy()]
    elif foreground in ("argmax", "mass"):
        semantic = np.asarray(present, np.int64)[first_argmax(prob, 0).cpu().numpy()]
    else:
        raise ValueError(f"foreground must be 'argmax' or 'mass', got {foreground!r}")
    scale = (torch.tensor(size, dtype=torch.float32) / float(input_size)).view(2, 1, 1)
    off = F.interpolate(out["offsets"][None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return prob, semantic, (off.cpu() * scale).numpy()
