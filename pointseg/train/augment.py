"""Stage-2 augmentation, applied jointly to an image and its panoptic id map.

The point-supervised papers train their second stage with the standard
Mask2Former / Mask R-CNN recipe: random resize by a scale factor, a random
crop to a fixed size (padding when the resized image is smaller), and a
horizontal flip. Every random choice comes from a ``numpy.random.Generator``
passed in, so an augmentation is reproducible from its seed.

Geometry: resizing maps output pixel centre ``i + 0.5`` to input coordinate
``(i + 0.5) / s`` for both the image (bilinear) and the id map (nearest), so
the two stay aligned. Padding gets image value 0 and id :data:`PAD_ID`.
"""

from __future__ import annotations

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Id of padded pixels in an augmented id map: no segment, and not real VOID.
PAD_ID = -1


class AugmentConfig(BaseModel):
    """Random resize -> random crop (pad) -> horizontal flip."""

    model_config = ConfigDict(extra="forbid")

    crop_size: int = Field(256, ge=8)  # output is (crop_size, crop_size)
    scale_range: tuple[float, float] = (0.5, 1.5)  # relative to fitting the longest side into crop_size
    hflip_prob: float = Field(0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check_scales(self):
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {self.scale_range}")
        return self


def resize_pair(image: np.ndarray, id_map: np.ndarray, out_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize ``(H, W, 3) uint8`` bilinearly and ``(H, W) int`` by nearest neighbour to ``out_hw``."""
    oh, ow = int(out_hw[0]), int(out_hw[1])
    h, w = id_map.shape
    image = cv2.resize(image, (ow, oh), interpolation=cv2.INTER_LINEAR)
    rows = np.minimum(((np.arange(oh) + 0.5) * h / oh).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(ow) + 0.5) * w / ow).astype(np.int64), w - 1)
    return image, id_map[rows[:, None], cols[None, :]]


def crop_or_pad(
    image: np.ndarray, id_map: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random ``size x size`` window; sides shorter than ``size`` are padded at the bottom/right."""
    h, w = id_map.shape
    top = int(rng.integers(0, h - size + 1)) if h > size else 0
    left = int(rng.integers(0, w - size + 1)) if w > size else 0
    image = image[top : top + size, left : left + size]
    id_map = id_map[top : top + size, left : left + size]
    out_img = np.zeros((size, size, 3), np.uint8)
    out_ids = np.full((size, size), PAD_ID, np.int32)
    out_img[: image.shape[0], : image.shape[1]] = image
    out_ids[: id_map.shape[0], : id_map.shape[1]] = id_map
    return out_img, out_ids


def augment(
    image: np.ndarray, id_map: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig | dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Random resize, crop/pad and flip of an image and its id map.

    Parameters
    ----------
    image : (H, W, 3) uint8 RGB.
    id_map : (H, W) int panoptic ids (0 = VOID).
    rng : source of all randomness.
    cfg : :class:`AugmentConfig`. The resize factor is
        ``s = u * crop_size / max(H, W)`` with ``u ~ U(scale_range)``.

    Returns
    -------
    ``image (S, S, 3) uint8`` and ``id_map (S, S) int32`` with ``S =
    crop_size``; padded pixels have id :data:`PAD_ID`.
    """
    if not isinstance(cfg, AugmentConfig):
        cfg = AugmentConfig.model_validate(cfg or {})
    image = np.asarray(image)
    id_map = np.asarray(id_map, np.int32)
    if image.shape[:2] != id_map.shape:
        raise ValueError(f"image {image.shape[:2]} and id_map {id_map.shape} differ in size")
    h, w = id_map.shape
    u = rng.uniform(*cfg.scale_range)
    s = u * cfg.crop_size / max(h, w)
    out_hw = (max(1, int(round(h * s))), max(1, int(round(w * s))))
    image, id_map = resize_pair(image, id_map, out_hw)
    image, id_map = crop_or_pad(image, id_map, cfg.crop_size, rng)
    if rng.random() < cfg.hflip_prob:
        image, id_map = image[:, ::-1], id_map[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(id_map)
