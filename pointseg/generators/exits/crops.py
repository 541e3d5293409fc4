"""Per-object crops (Sec. 3.2, Fig. 2): the box of the extreme points, with margin, resized to a square.

Coordinates: pointseg points are pixel centres (pixel ``c`` at ``x = c``).
Here boxes and windows are in *edge* coordinates, pixel ``c`` spanning
``[c, c + 1)``, so an extreme pixel is wholly inside its box: the box of
extreme pixels ``x_l .. x_r`` is ``[x_l, x_r + 1]``. A window
``[X0, Y0, X1, Y1]`` is the box grown by ``margin`` times its width (height)
on each side; it is resampled to ``S x S`` by
:func:`torchvision.ops.roi_align` (``aligned=True``: bilinear, averaged over
each output cell, zeros outside the image), so crop pixel ``i`` covers window
edge coordinates ``X0 + [i, i + 1) (X1 - X0) / S``. The crop is stretched,
not letterboxed, as in MAL and EXITS (a 512 x 512 resize).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

__all__ = ["crop_windows", "crop_images", "to_crop", "paste_probabilities", "grid_sets"]


def crop_windows(boxes: np.ndarray, margin) -> np.ndarray:
    """(K, 4) float ``[X0, Y0, X1, Y1]`` edge coordinates from (K, 4) inclusive pixel boxes ``(x_l, y_t, x_r, y_b)``.

    ``margin``: one fraction for every side, or (K, 4) fractions for the left,
    top, right and bottom sides of each box (random jitter in training).
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    m = np.broadcast_to(np.asarray(margin, np.float64), b.shape)
    x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 2] + 1, b[:, 3] + 1
    w, h = x1 - x0, y1 - y0
    return np.stack([x0 - m[:, 0] * w, y0 - m[:, 1] * h, x1 + m[:, 2] * w, y1 + m[:, 3] * h], 1)


def crop_images(image: torch.Tensor, windows: np.ndarray, size: int) -> torch.Tensor:
    """(K, 3, S, S) crops of one ``(3, H, W)`` float image at ``windows`` (module docstring)."""
    if len(windows) == 0:
        return image.new_zeros((0, image.shape[0], size, size))
    rois = torch.as_tensor(windows, dtype=image.dtype)
    return roi_align(image[None], [rois], output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1,
                     aligned=True)


def to_crop(xy: np.ndarray, windows: np.ndarray, size: int) -> np.ndarray:
    """Pixel-centre image points ``(K, P, 2)`` -> crop edge coordinates ``(K, P, 2)`` in ``[0, S]``."""
    w = np.asarray(windows, np.float64)[:, None, :]
    x = (np.asarray(xy)[..., 0] + 0.5 - w[..., 0]) * size / (w[..., 2] - w[..., 0])
    y = (np.asarray(xy)[..., 1] + 0.5 - w[..., 1]) * size / (w[..., 3] - w[..., 1])
    return np.stack([x, y], -1)


def paste_probabilities(probs: torch.Tensor, window: np.ndarray, height: int, width: int
                        ) -> tuple[tuple[slice, slice], np.ndarray]:
    """One crop's ``(h, w)`` probability map back onto the image: ``(slices, (rows, cols) float32)``.

    Image pixel ``c`` samples the map bilinearly at its centre ``c + 0.5``
    mapped into the window (``grid_sample``, ``align_corners=False``); only
    pixels inside the window and the image are returned.
    """
    X0, Y0, X1, Y1 = (float(v) for v in window)
    c0, c1 = max(0, int(np.floor(X0))), min(width, int(np.ceil(X1)))
    r0, r1 = max(0, int(np.floor(Y0))), min(height, int(np.ceil(Y1)))
    if c1 <= c0 or r1 <= r0:
        return (slice(0, 0), slice(0, 0)), np.zeros((0, 0), np.float32)
    gx = (torch.arange(c0, c1, dtype=torch.float32) + 0.5 - X0) / (X1 - X0) * 2 - 1
    gy = (torch.arange(r0, r1, dtype=torch.float32) + 0.5 - Y0) / (Y1 - Y0) * 2 - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None]
    out = F.grid_sample(probs[None, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (slice(r0, r1), slice(c0, c1)), out[0, 0].numpy()


def grid_sets(fg_points: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, grid: int, patch: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``P_FG``, ``P_BG`` and ``P_Box`` as (B, N*N) bool over the crop's cells (row-major).

    fg_points : (B, 4, 2) crop coordinates of the inward extreme points; the
        cell containing each is foreground.
    boxes, valid : (B, 4) ``[x0, y0, x1, y1]`` crop coordinates of the box and
        of the image's extent in the crop (padding outside it is no cell's
        evidence: it is neither background nor in the box).
    A cell is in the box (outside it) when its centre is inside (outside).
    """
    B = fg_points.shape[0]
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * patch
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    cx, cy = cx.reshape(1, -1), cy.reshape(1, -1)

    def inside(r):
        return (cx >= r[:, 0:1]) & (cx < r[:, 2:3]) & (cy >= r[:, 1:2]) & (cy < r[:, 3:4])

    in_image = inside(valid.float())
    in_box = inside(boxes.float()) & in_image
    cells = (fg_points.float() / patch).floor().long().clamp(0, grid - 1)
    fg = torch.zeros(B, grid * grid, dtype=torch.bool)
    fg.scatter_(1, cells[..., 1] * grid + cells[..., 0], True)
    return fg, in_image & ~in_box & ~fg, in_box
