"""Pictures a person would rather look at than read: labels over images, side by side."""

from __future__ import annotations

import cv2
import numpy as np

from pointseg.data.record import Category, Points


def segment_colors(segments_info: list[dict], categories: dict[int, Category], seed: int = 0) -> dict[int, tuple]:
    """A colour per segment id: the category colour for stuff, a jittered one per thing instance."""
    rng = np.random.default_rng(seed)
    colors = {}
    for s in segments_info:
        cat = categories.get(s["category_id"])
        base = np.array(cat.color if cat and any(cat.color) else rng.integers(40, 255, 3), float)
        if s.get("isthing", cat.isthing if cat else True):
            base = np.clip(base + rng.integers(-60, 61, 3), 0, 255)
        colors[s["id"]] = tuple(int(v) for v in base)
    return colors


def colorize(id_map: np.ndarray, segments_info: list[dict], categories: dict[int, Category]) -> np.ndarray:
    """``(H, W)`` id map -> ``(H, W, 3) uint8``; VOID black, instance borders white."""
    out = np.zeros(id_map.shape + (3,), np.uint8)
    for sid, color in segment_colors(segments_info, categories).items():
        out[id_map == sid] = color
    edges = cv2.morphologyEx(id_map.astype(np.float32), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    out[edges] = 255
    return out


def draw_points(image: np.ndarray, points: Points, radius: int = 3) -> np.ndarray:
    out = image.copy()
    r = max(radius, int(round(max(image.shape[:2]) / 160)))
    for x, y in points.xy:
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        c = (int(round(x)), int(round(y)))
        cv2.circle(out, c, r + 1, (0, 0, 0), -1)
        cv2.circle(out, c, r, (255, 255, 0), -1)
    return out


def panel(
    image: np.ndarray,
    points: Points,
    pred: tuple[np.ndarray, list[dict]],
    gt: tuple[np.ndarray, list[dict]] | None,
    categories: dict[int, Category],
    titles: tuple[str, ...] = ("image + points", "pseudo label", "ground truth"),
) -> np.ndarray:
    """Side-by-side ``image+points | pseudo label | ground truth`` as one RGB array (:func:`side_by_side`)."""
    labels = [(titles[1], pred)] + ([] if gt is None else [(titles[2], gt)])
    return side_by_side(image, points, labels, categories, titles[0])


def side_by_side(
    image: np.ndarray,
    points: Points,
    labels: list[tuple[str, tuple[np.ndarray, list[dict]] | None]],
    categories: dict[int, Category],
    points_title: str = "image + points",
    max_side: int | None = None,
) -> np.ndarray:
    """``image+points | label 1 | label 2 | ...``, each tile under its title, as one RGB array.

    ``labels``: ``(title, (id_map, segments_info))``, or ``(title, None)`` for a
    label that does not exist (a failed image: a grey tile). Small images are
    enlarged (nearest neighbour, integer factor) to at least 256 px on the long
    side so that the tiles stay readable; with ``max_side``, larger ones are
    shrunk to it (area for the image, nearest for the labels).
    """
    h, w = image.shape[:2]
    f = max(1, int(np.ceil(256 / max(h, w))))
    if f > 1:
        image = np.repeat(np.repeat(image, f, 0), f, 1)
        points = Points(points.xy * f + (f - 1) / 2, points.segment, points.category_id)
        labels = [(t, None if lab is None else (np.repeat(np.repeat(lab[0], f, 0), f, 1), lab[1]))
                  for t, lab in labels]
    elif max_side is not None and max(h, w) > max_side:
        s = max_side / max(h, w)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        points = Points(points.xy * s, points.segment, points.category_id)
        labels = [(t, None if lab is None else
                   (cv2.resize(lab[0].astype(np.int32), size, interpolation=cv2.INTER_NEAREST), lab[1]))
                  for t, lab in labels]
    tiles = [_title(draw_points(image, points), points_title)]
    for title, lab in labels:
        tile = np.full_like(image, 128) if lab is None else blend(image, colorize(*lab, categories))
        tiles.append(_title(tile, title))
    return np.concatenate(tiles, axis=1)


def stack(rows: list[np.ndarray], gap: int = 6) -> np.ndarray:
    """RGB rows of any widths one under the other, white-padded on the right, ``gap`` white pixels apart."""
    if not rows:
        raise ValueError("no rows to stack")
    width = max(r.shape[1] for r in rows)
    out = []
    for i, r in enumerate(rows):
        if i:
            out.append(np.full((gap, width, 3), 255, np.uint8))
        out.append(np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255))
    return np.concatenate(out, axis=0)


def blend(image: np.ndarray, colors: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    return (alpha * colors + (1 - alpha) * image).astype(np.uint8)


def _title(tile: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((18, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, tile], axis=0)


def save_png(path_or_file, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    if hasattr(path_or_file, "write"):
        path_or_file.write(buf.tobytes())
    else:
        with open(path_or_file, "wb") as f:
            f.write(buf.tobytes())
