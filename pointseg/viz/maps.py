"""Pictures of Point2Mask's task-oriented maps and transport cost (Sec. 3.3.1, Eq. 2-3).

For one image: ``P^s`` as its max class probability and its argmax class,
``P^b`` (the boundary map the edge costs use) and the geodesic cost map
``min_i c_ij`` over the image's segments (Eq. 3), all at the generator's
working resolution, enlarged like :func:`pointseg.viz.overlay.panel`. The
generator computes the :class:`PointMaps` (``Point2MaskGenerator.inner_maps``);
this module only draws them.
With training-free maps (``maps: lowlevel``) ``P^s`` is the LAB image, drawn
as colour instead of max / argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pointseg.data.record import Category, Points
from pointseg.viz.overlay import _title, draw_points

__all__ = ["PointMaps", "heatmap", "maps_panel"]


@dataclass
class PointMaps:
    """The maps of one image at the working size ``(h, w)``.

    semantic : (S, h, w) float -- ``P^s`` probabilities (S classes) or LAB (S = 3).
    channel_ids : category id of each channel of ``semantic``; ``None`` for LAB.
    boundary : (h, w) float or None -- ``P^b`` (``P^b_high`` with learned maps).
    boundary_extra : (h, w) float or None -- a second ``P^b`` whose ``d^b`` adds (``P^b_low``).
    cost : (h, w) float -- ``min`` over segments of the geodesic cost ``c_ij`` (Eq. 3).
    points : the points scaled onto ``(h, w)`` (for drawing).
    boundary_names : titles of ``boundary`` and ``boundary_extra``.
    """

    semantic: np.ndarray
    channel_ids: list[int] | None
    boundary: np.ndarray | None
    boundary_extra: np.ndarray | None
    cost: np.ndarray
    points: Points
    boundary_names: tuple[str, str] = ("P^b", "P^b low")


def heatmap(a: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """``(h, w)`` float -> ``(h, w, 3) uint8`` viridis, ``lo..hi`` (default: finite min..max)."""
    a = np.asarray(a, np.float64)
    finite = np.isfinite(a)
    lo = float(a[finite].min()) if lo is None and finite.any() else (lo or 0.0)
    hi = float(a[finite].max()) if hi is None and finite.any() else (hi if hi is not None else 1.0)
    u = np.clip((np.where(finite, a, hi) - lo) / max(hi - lo, 1e-12), 0, 1)
    bgr = cv2.applyColorMap((255 * u).astype(np.uint8), cv2.COLORMAP_VIRIDIS)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _class_colors(channel_ids: list[int], categories: dict[int, Category]) -> np.ndarray:
    rng = np.random.default_rng(0)
    out = []
    for c in channel_ids:
        cat = categories.get(c)
        out.append(cat.color if cat and any(cat.color) else tuple(int(v) for v in rng.integers(40, 255, 3)))
    return np.array(out, np.uint8)


def maps_panel(image: np.ndarray, maps: PointMaps, categories: dict[int, Category], min_side: int = 192) -> np.ndarray:
    """``image + points | P^s max | P^s argmax | P^b (| P^b_low) | cost`` as one RGB array.

    Every tile is the working size enlarged (nearest neighbour, integer factor)
    to at least ``min_side`` pixels on the long side.
    """
    h, w = maps.cost.shape
    f = max(1, int(np.ceil(min_side / max(h, w))))
    big = lambda a: np.repeat(np.repeat(a, f, 0), f, 1)  # noqa: E731
    small = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA) if image.shape[:2] != (h, w) else image
    pts = Points(maps.points.xy * f + (f - 1) / 2, maps.points.segment, maps.points.category_id)
    tiles = [(draw_points(big(small), pts), "image + points")]
    if maps.channel_ids is not None:
        tiles.append((big(heatmap(maps.semantic.max(0), 0.0, 1.0)), "P^s max prob"))
        argmax = _class_colors(maps.channel_ids, categories)[maps.semantic.argmax(0)]
        tiles.append((big(argmax), "P^s argmax class"))
    else:
        lab = maps.semantic
        lo, hi = lab.min(axis=(1, 2), keepdims=True), lab.max(axis=(1, 2), keepdims=True)
        tiles.append((big((255 * (lab - lo) / np.maximum(hi - lo, 1e-12)).transpose(1, 2, 0).astype(np.uint8)),
                      "P^s stand-in: LAB"))
    if maps.boundary is not None:
        tiles.append((big(heatmap(maps.boundary, 0.0, max(float(np.nanmax(maps.boundary)), 1e-6))), maps.boundary_names[0]))
    if maps.boundary_extra is not None:
        tiles.append((big(heatmap(maps.boundary_extra, 0.0, max(float(np.nanmax(maps.boundary_extra)), 1e-6))),
                      maps.boundary_names[1]))
    tiles.append((draw_points(big(heatmap(maps.cost)), pts), "cost min_i c_ij"))
    return np.concatenate([_title(t, s) for t, s in tiles], axis=1)
