"""COCO panoptic PNG encoding: ``id = R + 256*G + 256**2*B``."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3) uint8`` -> ``(H, W) int32`` segment ids."""
    rgb = np.asarray(rgb).astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(id_map: np.ndarray) -> np.ndarray:
    """``(H, W)`` int ids -> ``(H, W, 3) uint8``; ids must be below 256**3."""
    id_map = np.asarray(id_map).astype(np.int64)
    if id_map.size and (id_map.min() < 0 or id_map.max() >= 256**3):
        raise ValueError("panoptic ids must lie in [0, 256**3)")
    out = np.empty(id_map.shape + (3,), np.uint8)
    for c in range(3):
        out[..., c] = id_map % 256
        id_map = id_map // 256
    return out


def encode_png(id_map: np.ndarray) -> bytes:
    """Id map -> COCO panoptic PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(id2rgb(id_map)).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """COCO panoptic PNG bytes -> ``(H, W) int32`` id map."""
    with Image.open(io.BytesIO(data)) as im:
        return rgb2id(np.asarray(im.convert("RGB")))


#: Largest id for which :func:`unique_ids` counts with ``np.bincount`` (a table of 32 MiB at most).
BINCOUNT_MAX_ID = 1 << 22


def unique_ids(id_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(id_map, return_inverse=True)`` of an integer id map, in O(pixels).

    Returns ``(ids, inverse)``: the sorted distinct ids ``(n,)`` and, per pixel,
    the index of its id in ``ids`` (``inverse`` has ``id_map``'s shape, int64).
    Ids in ``[0, BINCOUNT_MAX_ID)`` are counted with ``np.bincount`` and a
    lookup table (a sort of a 640x480 map costs 20x more); anything else
    (negative, larger or non-integer values) goes through ``np.unique``.
    """
    a = np.asarray(id_map)
    if a.size and np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo >= 0 and hi < BINCOUNT_MAX_ID:
            ids = np.flatnonzero(np.bincount(a.ravel(), minlength=hi + 1))
            lut = np.zeros(hi + 1, np.int64)
            lut[ids] = np.arange(len(ids))
            return ids.astype(a.dtype), lut[a]
    ids, inverse = np.unique(a, return_inverse=True)
    return ids, inverse.reshape(a.shape).astype(np.int64)
