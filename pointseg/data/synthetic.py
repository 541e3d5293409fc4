"""Seeded synthetic panoptic scenes with exact ground truth: the default dataset.

The default run downloads nothing: it draws scenes here. A scene is a pure
function of ``(seed, index)`` and the knobs, so any image can be regenerated
alone, and the bytes of the image and masks are identical across runs.

What a scene contains, and why (each item is a case a point-supervised
pseudo-labeller must handle, so that better methods score better):

* **Stuff** covering the background in irregular regions: ``sky`` above a wavy
  horizon (vertical blue gradient with faint waves), ``grass`` below it (green,
  blotchy and noisy), and sometimes a ``road`` (gray with speckle, a winding
  band narrowing towards the horizon) and a ``water`` blob (teal with
  horizontal waves). One segment per stuff class per image, as in COCO.
* **Things** of four shapes and textures, with varied sizes: ``disc`` (red,
  radial shading), ``box`` (axis-aligned or rotated rectangle with stripes),
  ``triangle`` (irregular, checkerboard) and ``star`` (five arms, linear
  gradient). Every instance jitters its class colour.
* **Touching same-class instances** (the case Point2Mask's optimal transport
  exists for). A "weak border" pair shares one texture, anchored in the same
  world coordinates, and has no outline, so a colour geodesic (PSPS) sees
  almost no edge between the two; a "strong" pair has independent colours and a
  thin darker outline.
* **Things split into parts by an occluder** (the case EXITS's extreme points
  exist for): a thin ``pole`` (stuff, dark brown) crosses a large thing, so its
  visible mask has two or more connected components.
* Illumination gradient, Gaussian blur and pixel noise, so colour alone is
  imperfect.

Ground truth: each :class:`~pointseg.data.record.Segment` mask is the
*visible* region; the masks partition the image (no VOID pixels). Outlines are
drawn into the image only, inside the thing's own mask. Label maps are
rasterised without anti-aliasing (numpy distance tests for discs, integer
fixed-point ``cv2.fillPoly`` for polygons); only the image is smoothed.

Segment ids: a stuff segment has its category id (101..); the ``k``-th thing
(k = 1, 2, ...) of category ``c`` has id ``1000 * c + k``.

Determinism: all randomness comes from ``numpy.random.default_rng(
SeedSequence([seed, index]))``; arithmetic is float64 numpy with a fixed
order. Bit-identity across machines holds for the same numpy major version
(whose ``Generator`` streams are stable); transcendental functions (sin, cos)
may differ in the last ulp between CPUs, which can flip a rounded pixel only
when a value falls within ~1e-13 of a rounding boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import cv2
import numpy as np
from scipy import ndimage

from pointseg.data.record import Category, ImageRecord, Segment

DISC, BOX, TRIANGLE, STAR = 1, 2, 3, 4
SKY, GRASS, ROAD, WATER, POLE = 101, 102, 103, 104, 105

#: The synthetic label space: things 1..4, stuff 101..105. ``color`` is the
#: base colour of the class texture (instances jitter it).
SYNTHETIC_CATEGORIES: list[Category] = [
    Category(DISC, "disc", True, (210, 45, 40)),
    Category(BOX, "box", True, (235, 160, 40)),
    Category(TRIANGLE, "triangle", True, (140, 70, 190)),
    Category(STAR, "star", True, (225, 90, 190)),
    Category(SKY, "sky", False, (120, 170, 230)),
    Category(GRASS, "grass", False, (75, 145, 60)),
    Category(ROAD, "road", False, (120, 120, 115)),
    Category(WATER, "water", False, (40, 105, 140)),
    Category(POLE, "pole", False, (85, 60, 45)),
]

THING_IDS = (DISC, BOX, TRIANGLE, STAR)
_COLOR = {c.id: np.array(c.color, np.float64) for c in SYNTHETIC_CATEGORIES}
_TWO_PI = 2.0 * np.pi


def synthetic_categories() -> dict[int, Category]:
    """The synthetic label space keyed by category id."""
    return {c.id: c for c in SYNTHETIC_CATEGORIES}


@dataclass(frozen=True)
class SceneKnobs:
    """Knobs of :func:`make_scene`; a wrong name is a ``TypeError`` naming it.

    Probabilities are per scene. Sizes scale with ``min(height, width)``.
    """

    min_things: int = 3  # things per scene, the touching pair included
    max_things: int = 6
    touching_prob: float = 0.8  # a same-class touching pair is drawn
    weak_border_prob: float = 0.6  # ... and it shares one texture, no outline
    split_prob: float = 0.7  # a pole crosses the largest thing
    road_prob: float = 0.6
    water_prob: float = 0.5
    outline_prob: float = 0.4  # a lone thing gets a darker outline
    noise_std: float = 5.0  # pixel noise, in uint8 units
    blur_sigma: float = 0.7  # Gaussian blur of the image, pixels
    illumination: float = 0.2  # relative brightness change across the image

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("_prob") and not 0.0 <= v <= 1.0:
                raise ValueError(f"SceneKnobs.{f.name} must lie in [0, 1], got {v}")
            if v < 0:
                raise ValueError(f"SceneKnobs.{f.name} must be >= 0, got {v}")
        if not 1 <= self.min_things <= self.max_things:
            raise ValueError(
                f"SceneKnobs needs 1 <= min_things <= max_things, got {self.min_things}, {self.max_things}"
            )
        if self.illumination >= 1.0:
            raise ValueError(f"SceneKnobs.illumination must be < 1, got {self.illumination}")


@dataclass(frozen=True)
class SceneLayout:
    """What was built into a scene, checked on the final masks.

    touching_pairs : ``(id_a, id_b, weak_border)`` of same-class thing pairs
        drawn to touch that are still 4-adjacent after all occlusion.
    multi_part_things : ids of things whose visible mask has >= 2
        8-connected components (split by the pole or by another thing).
    """

    touching_pairs: list[tuple[int, int, bool]] = field(default_factory=list)
    multi_part_things: list[int] = field(default_factory=list)


@dataclass
class _Thing:
    category_id: int
    cx: float
    cy: float
    r: float  # circumradius, pixels
    angle: float  # shape rotation, radians
    shape: np.ndarray  # per-kind shape parameters
    color: np.ndarray  # (3,) float64 base colour
    color2: np.ndarray  # (3,) second colour of stripes / checkers
    period: float  # pattern period, pixels
    pattern_angle: float
    origin: tuple[float, float]  # texture anchor (x, y)
    outline: bool
    shading: float = 0.45  # disc: brightness drop from centre to rim
    id: int = 0


# ----------------------------------------------------------------------------- geometry


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows (H, 1)`` and ``cols (1, W)`` float64 pixel-centre coordinates."""
    return (np.arange(height, dtype=np.float64)[:, None], np.arange(width, dtype=np.float64)[None, :])


def _polygon_mask(xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fill a polygon given as ``(V, 2)`` float ``(x, y)``; no anti-aliasing.

    Vertices are rounded to 1/16 pixel and filled by cv2's integer scanline
    (``shift=4``), which is exact and platform independent.
    """
    canvas = np.zeros((height, width), np.uint8)
    pts = np.rint(np.asarray(xy) * 16.0).astype(np.int32)
    cv2.fillPoly(canvas, [pts], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _thing_vertices(t: _Thing) -> np.ndarray:
    """``(V, 2)`` polygon ``(x, y)`` of a box, triangle or star."""
    if t.category_id == BOX:
        a, b = t.r * np.cos(t.shape[0]), t.r * np.sin(t.shape[0])  # half sides
        local = np.array([[-a, -b], [a, -b], [a, b], [-a, b]])
    elif t.category_id == TRIANGLE:
        ang = np.array([0.0, _TWO_PI / 3, 2 * _TWO_PI / 3]) + t.shape[:3]
        rad = t.r * t.shape[3:6]
        local = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
    elif t.category_id == STAR:
        ang = np.arange(10) * (np.pi / 5)
        rad = np.where(np.arange(10) % 2 == 0, t.r, t.r * t.shape[0])
        local = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
    else:
        raise ValueError(f"category_id {t.category_id} has no polygon")
    c, s = np.cos(t.angle), np.sin(t.angle)
    x = t.cx + c * local[:, 0] - s * local[:, 1]
    y = t.cy + s * local[:, 0] + c * local[:, 1]
    return np.stack([x, y], 1)


def _thing_mask(t: _Thing, height: int, width: int) -> np.ndarray:
    """``(H, W) bool`` full (unoccluded) shape of a thing."""
    if t.category_id == DISC:
        rows, cols = _grid(height, width)
        return (cols - t.cx) ** 2 + (rows - t.cy) ** 2 <= t.r**2
    return _polygon_mask(_thing_vertices(t), height, width)


def _dilate4(mask: np.ndarray) -> np.ndarray:
    """Mask grown by one pixel in the 4-neighbourhood."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _touches4(a: np.ndarray, b: np.ndarray) -> bool:
    """True when some pixel of ``a`` is 4-adjacent to a pixel of ``b``."""
    return bool((_dilate4(a) & b).any())


def _smooth_noise(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, cells: int) -> np.ndarray:
    """Bilinear interpolation of a ``(cells+1)^2`` N(0,1) grid at ``y, x`` ``(N,)`` in [0, 1]."""
    grid = rng.standard_normal((cells + 1, cells + 1))
    gy, gx = y * cells, x * cells
    y0 = np.minimum(np.floor(gy).astype(np.int64), cells - 1)
    x0 = np.minimum(np.floor(gx).astype(np.int64), cells - 1)
    fy, fx = gy - y0, gx - x0
    top = grid[y0, x0] * (1 - fx) + grid[y0, x0 + 1] * fx
    bottom = grid[y0 + 1, x0] * (1 - fx) + grid[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


# ----------------------------------------------------------------------------- layout


def _stuff_map(rng: np.random.Generator, h: int, w: int, k: SceneKnobs) -> tuple[np.ndarray, np.ndarray]:
    """``(H, W) int32`` stuff category per pixel and the horizon row per column ``(W,)``."""
    rows, cols = _grid(h, w)
    base, a1, f1, p1, a2, f2, p2 = (
        rng.uniform(0.25, 0.5),
        rng.uniform(0.02, 0.07),
        rng.uniform(0.4, 1.4),
        rng.uniform(0, _TWO_PI),
        rng.uniform(0.0, 0.025),
        rng.uniform(2.0, 5.0),
        rng.uniform(0, _TWO_PI),
    )
    x = cols[0] / w
    horizon = h * (base + a1 * np.sin(_TWO_PI * f1 * x + p1) + a2 * np.sin(_TWO_PI * f2 * x + p2))
    below = rows >= horizon[None, :]
    stuff = np.where(below, GRASS, SKY).astype(np.int32)
    h0 = float(horizon.mean())

    if rng.random() < k.water_prob:  # a lake: a flattened blob with a wavy rim
        cx, cy = w * rng.uniform(0.15, 0.85), rng.uniform(h0 + 0.25 * (h - h0), h)
        r0 = min(h, w) * rng.uniform(0.15, 0.28)
        ph1, ph2 = rng.uniform(0, _TWO_PI, 2)
        dx, dy = cols - cx, (rows - cy) / 0.6
        theta = np.arctan2(dy, dx)
        radius = r0 * (1.0 + 0.25 * np.sin(3 * theta + ph1) + 0.12 * np.sin(5 * theta + ph2))
        stuff[below & (dx**2 + dy**2 <= radius**2)] = WATER

    if rng.random() < k.road_prob:  # a winding road, wide at the bottom, thin at the horizon
        x_bottom, x_top = rng.uniform(0.15, 0.85), rng.uniform(0.3, 0.7)
        bend, half = rng.uniform(-0.15, 0.15), rng.uniform(0.08, 0.15)
        t = np.clip((rows - h0) / max(h - h0, 1.0), 0.0, 1.0)
        centre = w * (x_top + (x_bottom - x_top) * t + bend * np.sin(np.pi * t))
        half_width = w * (0.015 + half * t)
        stuff[below & (np.abs(cols - centre) <= half_width)] = ROAD
    return stuff, horizon


def _random_thing(rng: np.random.Generator, category_id: int, cx: float, cy: float, r: float) -> _Thing:
    """A thing with random rotation, shape, colour jitter and pattern."""
    angle = rng.uniform(0, _TWO_PI)
    if category_id == BOX:
        shape = np.array([rng.uniform(0.4, 1.15)])  # half-side angle: aspect tan(shape)
        if rng.random() < 0.5:
            angle = 0.0  # axis-aligned
    elif category_id == TRIANGLE:
        shape = np.concatenate([rng.uniform(-0.35, 0.35, 3), rng.uniform(0.8, 1.0, 3)])
    elif category_id == STAR:
        shape = np.array([rng.uniform(0.4, 0.55)])  # inner / outer radius
    else:
        shape = np.zeros(0)
    color = np.clip(_COLOR[category_id] + rng.integers(-30, 31, 3), 0, 255).astype(np.float64)
    color2 = color * rng.uniform(0.45, 0.7)
    return _Thing(
        category_id=category_id,
        cx=cx,
        cy=cy,
        r=r,
        angle=angle,
        shape=shape,
        color=color,
        color2=color2,
        period=max(2.0, r * rng.uniform(0.25, 0.45)),
        pattern_angle=rng.uniform(0, np.pi),
        origin=(cx, cy),
        outline=False,
    )


def _touching_partner(
    rng: np.random.Generator, a: _Thing, a_mask: np.ndarray, weak: bool, h: int, w: int
) -> _Thing:
    """A same-class thing placed so that it touches ``a`` (4-adjacent or overlapping it).

    Starting at centre distance ``r_a + r_b`` (where the shapes can at most
    touch), the partner moves towards ``a`` one pixel at a time until its mask
    is 4-adjacent to ``a``'s; then it overlaps by 0-2 more pixels. A weak-border
    partner copies ``a``'s texture in world coordinates (same anchor), so the
    pattern continues across the border, and both get shallow disc shading
    (this sets ``a.shading``).
    """
    r_b = a.r * rng.uniform(0.75, 1.2)
    towards_centre = np.arctan2(h / 2 - a.cy, w / 2 - a.cx)
    phi = towards_centre + rng.uniform(-1.2, 1.2)
    b = _random_thing(rng, a.category_id, a.cx, a.cy, r_b)
    if a.category_id == BOX and rng.random() < 0.6:  # boxes side by side along an axis
        b.angle, b.shape = a.angle, a.shape.copy()
        phi = a.angle + (np.pi / 2) * np.round((phi - a.angle) / (np.pi / 2))
    if weak:  # shallow shading too, so no dark valley marks the border
        a.shading = b.shading = 0.12
        b.color = np.clip(a.color + rng.integers(-3, 4, 3), 0, 255).astype(np.float64)
        b.color2, b.period, b.pattern_angle, b.origin = a.color2.copy(), a.period, a.pattern_angle, a.origin
    grown = _dilate4(a_mask)
    d = a.r + r_b + 1.0
    extra = int(rng.integers(0, 3))
    while d > 0:
        b.cx, b.cy = a.cx + d * np.cos(phi), a.cy + d * np.sin(phi)
        if (_thing_mask(b, h, w) & grown).any():
            break
        d -= 1.0
    d = max(d - extra, 0.0)
    b.cx, b.cy = a.cx + d * np.cos(phi), a.cy + d * np.sin(phi)
    if not weak:
        b.origin = (b.cx, b.cy)
    return b


def _pole_vertices(rng: np.random.Generator, target: _Thing, h: int, w: int) -> np.ndarray:
    """Rotated rectangle ``(4, 2)`` through ``target``'s centre: a thin occluder."""
    width = max(3.0, min(h, w) * rng.uniform(0.025, 0.045))
    angle = np.pi / 2 + rng.uniform(-0.6, 0.6)
    offset = rng.uniform(-0.25, 0.25) * target.r  # not always dead centre
    if rng.random() < 0.6:  # runs across the whole image
        length = 2.0 * (h + w)
    else:
        length = target.r * rng.uniform(2.4, 3.4)
    c, s = np.cos(angle), np.sin(angle)
    cx, cy = target.cx - s * offset, target.cy + c * offset
    u = np.array([c, s]) * (length / 2)
    v = np.array([-s, c]) * (width / 2)
    centre = np.array([cx, cy])
    return np.stack([centre - u - v, centre + u - v, centre + u + v, centre - u + v])


def _compose(stuff: np.ndarray, things: list[_Thing], masks: list[np.ndarray], pole: np.ndarray | None) -> np.ndarray:
    """Painter's algorithm: stuff, then things in order, then the pole. ``(H, W) int32`` ids."""
    id_map = stuff.copy()
    for t, m in zip(things, masks):
        id_map[m] = t.id
    if pole is not None:
        id_map[pole] = POLE
    return id_map


# ----------------------------------------------------------------------------- rendering


def _render_stuff(
    seed: int, category_id: int, horizon: np.ndarray, rows: np.ndarray, cols: np.ndarray, h: int, w: int
) -> np.ndarray:
    """``(N, 3)`` float64 texture of a stuff class at pixels ``rows, cols`` ``(N,) int``.

    ``seed`` feeds the class's own generator, so the scene's main random
    stream does not depend on which pixels the class ends up covering.
    """
    rng = np.random.default_rng(seed)
    n = len(rows)
    y, x = rows.astype(np.float64), cols.astype(np.float64)
    base = _COLOR[category_id] + rng.integers(-15, 16, 3)
    if category_id == SKY:  # vertical gradient, lighter towards the horizon, faint waves
        t = np.clip(y / np.maximum(horizon[cols], 1.0), 0.0, 1.0)[:, None]
        period, swing = rng.uniform(9, 16), rng.uniform(1, 3)
        waves = 6.0 * np.sin(_TWO_PI * y / period + 1.5 * np.sin(_TWO_PI * x / w * swing))
        return base * (0.75 + 0.4 * t) + waves[:, None]
    if category_id == GRASS:  # blotches plus strong per-pixel noise
        blotch = _smooth_noise(rng, y / (h - 1), x / (w - 1), 6)[:, None] * np.array([10.0, 22.0, 8.0])
        grain = rng.normal(0.0, 14.0, (n, 1)) * np.array([0.7, 1.0, 0.5])
        return base + blotch + grain
    if category_id == ROAD:  # gray with sparse bright / dark speckle
        smooth = 6.0 * _smooth_noise(rng, y / (h - 1), x / (w - 1), 4)[:, None]
        speckle = (rng.random((n, 1)) < 0.08) * rng.choice([-55.0, 55.0], (n, 1))
        return base + speckle + smooth
    if category_id == WATER:  # horizontal waves
        period, swing = rng.uniform(5, 9), rng.uniform(2, 5)
        phase = _TWO_PI * y / period + 2.0 * np.sin(_TWO_PI * x / w * swing)
        return base + (18.0 * np.sin(phase))[:, None] * np.array([0.6, 1.0, 1.0])
    if category_id == POLE:  # uniform dark wood, slight noise
        return base + rng.normal(0.0, 6.0, (n, 1))
    raise ValueError(f"category_id {category_id} is not a synthetic stuff class")


def _render_thing(t: _Thing, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``(N, 3)`` float64 texture of one thing at pixels ``rows, cols`` ``(N,) int``."""
    y, x = rows.astype(np.float64), cols.astype(np.float64)
    ox, oy = t.origin
    c, s = np.cos(t.pattern_angle), np.sin(t.pattern_angle)
    u = (x - ox) * c + (y - oy) * s
    v = -(x - ox) * s + (y - oy) * c
    if t.category_id == DISC:  # radial shading: bright centre, dark rim
        rho2 = ((x - t.cx) ** 2 + (y - t.cy) ** 2) / t.r**2
        return t.color * (1.0 + t.shading * (0.33 - np.minimum(rho2, 1.0)))[:, None]
    if t.category_id == BOX:  # stripes
        stripe = (np.floor(u / t.period) % 2 == 1)[:, None]
        return np.where(stripe, t.color2, t.color)
    if t.category_id == TRIANGLE:  # checkerboard
        check = ((np.floor(u / t.period) + np.floor(v / t.period)) % 2 == 1)[:, None]
        return np.where(check, t.color2, t.color)
    if t.category_id == STAR:  # gentle linear gradient across the star
        return t.color * (1.0 + 0.15 * np.clip(u / (3 * t.r), -1.0, 1.0))[:, None]
    raise ValueError(f"category_id {t.category_id} is not a synthetic thing class")


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``(H, W, 3)`` float64 (scipy, mirror edges)."""
    if sigma <= 0:
        return image
    return ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0.0), mode="mirror", truncate=3.0)


# ----------------------------------------------------------------------------- public API


def make_scene_with_layout(
    seed: int, index: int, height: int = 128, width: int = 128, **knobs
) -> tuple[ImageRecord, SceneLayout]:
    """Scene ``index`` of the synthetic dataset ``seed``, with what was built into it.

    Parameters
    ----------
    seed, index : int >= 0
        The scene is a pure function of ``(seed, index, height, width, knobs)``.
    height, width : int >= 32
    **knobs
        Fields of :class:`SceneKnobs`.

    Returns
    -------
    record : ImageRecord
        ``image`` ``(H, W, 3) uint8`` RGB; ``segments`` with visible masks that
        partition the image; ``image_id = index``; no points.
    layout : SceneLayout
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"synthetic scene: seed must be an int >= 0, got {seed!r}")
    if not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"synthetic scene: index must be an int >= 0, got {index!r}")
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, (int, np.integer)) or v < 32:
            raise ValueError(f"synthetic scene: {name} must be an int >= 32, got {v!r}")
    k = SceneKnobs(**knobs)
    h, w = int(height), int(width)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    side = min(h, w)

    stuff, horizon = _stuff_map(rng, h, w, k)

    # Things, drawn back to front; the touching pair sits at a random depth.
    n_things = int(rng.integers(k.min_things, k.max_things + 1))
    has_pair = n_things >= 2 and rng.random() < k.touching_prob
    weak = bool(rng.random() < k.weak_border_prob)
    n_lone = n_things - 2 if has_pair else n_things
    pair_at = int(rng.integers(0, n_lone + 1))
    things: list[_Thing] = []
    pair: tuple[_Thing, _Thing] | None = None
    for slot in range(n_lone + 1):
        if has_pair and slot == pair_at:
            a = _random_thing(
                rng,
                int(rng.choice(THING_IDS)),
                w * rng.uniform(0.2, 0.8),
                h * rng.uniform(0.3, 0.8),
                side * rng.uniform(0.1, 0.16),
            )
            a.outline = not weak
            b = _touching_partner(rng, a, _thing_mask(a, h, w), weak, h, w)
            b.outline = not weak
            things += [a, b]
            pair = (a, b)
        if slot < n_lone:
            t = _random_thing(
                rng,
                int(rng.choice(THING_IDS)),
                w * rng.uniform(0.08, 0.92),
                h * rng.uniform(0.12, 0.92),
                side * rng.uniform(0.06, 0.19),
            )
            t.outline = bool(rng.random() < k.outline_prob)
            things.append(t)
    counts: dict[int, int] = {}
    for t in things:
        counts[t.category_id] = counts.get(t.category_id, 0) + 1
        t.id = 1000 * t.category_id + counts[t.category_id]
    masks = [_thing_mask(t, h, w) for t in things]

    # Drop things left too small to be labelled, then cross the largest one with a pole.
    min_area = max(12, int(0.0015 * h * w))
    while True:
        id_map = _compose(stuff, things, masks, None)
        small = [i for i, t in enumerate(things) if (id_map == t.id).sum() < min_area]
        if not small:
            break
        things = [t for i, t in enumerate(things) if i not in small]
        masks = [m for i, m in enumerate(masks) if i not in small]
    pole = None
    if things and rng.random() < k.split_prob:
        areas = [int((id_map == t.id).sum()) for t in things]
        target = things[int(np.argmax(areas))]
        pole = _polygon_mask(_pole_vertices(rng, target, h, w), h, w)
        id_map = _compose(stuff, things, masks, pole)
        keep = [(id_map == t.id).sum() >= min_area for t in things]
        if not all(keep):
            things = [t for t, kp in zip(things, keep) if kp]
            masks = [m for m, kp in zip(masks, keep) if kp]
            id_map = _compose(stuff, things, masks, pole)

    # Render: class textures on visible pixels, outlines on the full shape's rim.
    image = np.zeros((h, w, 3), np.float64)
    stuff_ids = [c.id for c in SYNTHETIC_CATEGORIES if not c.isthing]
    stuff_seeds = rng.integers(0, 2**63, len(stuff_ids))
    for cid, stuff_seed in zip(stuff_ids, stuff_seeds):
        rr, cc = np.nonzero(id_map == cid)
        if len(rr):
            image[rr, cc] = _render_stuff(int(stuff_seed), cid, horizon, rr, cc, h, w)
    for t, m in zip(things, masks):
        rr, cc = np.nonzero(id_map == t.id)
        image[rr, cc] = _render_thing(t, rr, cc)
        if t.outline:
            rim = m & ~ndimage.binary_erosion(m) & (id_map == t.id)
            image[rim] *= 0.5

    # Photometric nuisances: illumination ramp, blur, noise.
    rows, cols = _grid(h, w)
    light_dir = rng.uniform(0, _TWO_PI)
    ramp = ((cols / w - 0.5) * np.cos(light_dir) + (rows / h - 0.5) * np.sin(light_dir)) * 2.0
    image *= (1.0 + k.illumination * np.clip(ramp, -1.0, 1.0))[..., None]
    image = _gaussian_blur(image, k.blur_sigma)
    image += rng.normal(0.0, k.noise_std, (h, w, 3)) if k.noise_std > 0 else 0.0
    image_u8 = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    segments = [
        Segment(cid, cid, False, id_map == cid) for cid in stuff_ids if (id_map == cid).any()
    ] + [Segment(t.id, t.category_id, True, id_map == t.id) for t in things]

    by_id = {s.id: s.mask for s in segments}
    pairs = []
    if pair is not None and pair[0].id in by_id and pair[1].id in by_id:
        if _touches4(by_id[pair[0].id], by_id[pair[1].id]):
            pairs.append((pair[0].id, pair[1].id, weak))
    eight = np.ones((3, 3), bool)
    multi = [s.id for s in segments if s.isthing and ndimage.label(s.mask, structure=eight)[1] >= 2]

    record = ImageRecord(
        image_id=int(index),
        height=h,
        width=w,
        file_name=f"synthetic://seed{int(seed)}/{int(index):06d}",
        image=image_u8,
        segments=segments,
    )
    return record, SceneLayout(touching_pairs=pairs, multi_part_things=multi)


def make_scene(seed: int, index: int, height: int = 128, width: int = 128, **knobs) -> ImageRecord:
    """Scene ``index`` of synthetic dataset ``seed``; see :func:`make_scene_with_layout`."""
    return make_scene_with_layout(seed, index, height, width, **knobs)[0]


class SyntheticDataset:
    """``num_images`` synthetic scenes, generated on demand (nothing is cached).

    ``dataset[i]`` is ``make_scene(seed, i, height, width, **knobs)``, so any
    image can be regenerated alone.
    """

    def __init__(self, num_images: int, height: int = 128, width: int = 128, seed: int = 0, **knobs) -> None:
        if not isinstance(num_images, (int, np.integer)) or num_images < 0:
            raise ValueError(f"SyntheticDataset: num_images must be an int >= 0, got {num_images!r}")
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v < 32:
                raise ValueError(f"SyntheticDataset: {name} must be an int >= 32, got {v!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"SyntheticDataset: seed must be an int >= 0, got {seed!r}")
        self.knobs = SceneKnobs(**knobs)  # fail early, naming a wrong knob
        self.num_images, self.height, self.width, self.seed = int(num_images), int(height), int(width), int(seed)
        self._knob_kwargs = dict(knobs)

    @property
    def categories(self) -> dict[int, Category]:
        return synthetic_categories()

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> ImageRecord:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"SyntheticDataset index must be an int, got {type(index).__name__}")
        if index < 0:
            index += self.num_images
        if not 0 <= index < self.num_images:
            raise IndexError(f"SyntheticDataset index {index} out of range for {self.num_images} images")
        return make_scene(self.seed, int(index), self.height, self.width, **self._knob_kwargs)

    def __iter__(self):
        for i in range(self.num_images):
            yield self[i]
