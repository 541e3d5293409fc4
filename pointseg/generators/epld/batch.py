"""Images and points -> the network's batch; the same for stage-1 training and for labelling.

Every image is resized to ``size x size`` (aspect not kept) and optionally
flipped; its points go onto the grids the network and the losses use with the
pixel-centre rule of :func:`pointseg.generators.psps.scaled_points` (a point
at ``(x, y)`` of a ``W x H`` image lies in cell ``floor((x + 0.5) g / W)`` of
a ``g``-wide grid). Instances are :func:`~pointseg.generators.base.seed_groups`:
one per thing object, one per stuff class of the image.
"""

from __future__ import annotations

import numpy as np
import torch

from pointseg.data.images import resize_square as square
from pointseg.data.record import Category, Points
from pointseg.generators.base import SeedGroup, seed_groups
from pointseg.generators.psps import scaled_points
from pointseg.lowlevel import rgb_to_lab

__all__ = ["FEATURE_STRIDE", "network_batch", "resize_square"]

#: Stride of F^1, F^fuse and M^l (H_1 = H / 8, Sec. 3.2).
FEATURE_STRIDE = 8


def resize_square(image: np.ndarray, size: int, flip: bool = False) -> np.ndarray:
    """``(H, W, 3) uint8`` -> ``(size, size, 3) uint8`` (area interpolation), mirrored left-right if ``flip``."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    out = square(image, size)
    return np.ascontiguousarray(out[:, ::-1] if flip else out)


def _cells(points: Points, height: int, width: int, grid: int, flip: bool) -> np.ndarray:
    """(P, 2) ``(row, col)`` of the points on a ``grid x grid`` copy of the (flipped) image."""
    rc = scaled_points(points, height, width, grid, grid)
    if flip:
        rc[:, 1] = grid - 1 - rc[:, 1]
    return rc


def network_batch(images: list[np.ndarray], points: list[Points], categories: dict[int, Category],
                  channel_of: dict[int, int], size: int, loss_stride: int | None = None,
                  flips: list[bool] | None = None, lab: bool = False) -> dict:
    """The batch dict of :class:`~pointseg.generators.epld.model.EPLDNet` (and of its losses).

    Returns
    -------
    image : (B, 3, size, size) float in [0, 1].
    point_masks : (B, N, size/8, size/8) float, ``P^01``: 1 at the cells of each instance's points.
    instance_valid : (B, N) bool (``N`` = the most instances of an image in the batch).
    instance_class : (B, N) long, ``channel_of[category_id]`` (0 in padded slots).
    groups : B lists of :class:`~pointseg.generators.base.SeedGroup` (instance ``n`` is ``groups[b][n]``).
    point_yx, point_instance : with ``loss_stride``, B tensors (P_b, 2) / (P_b,) long: each
        point's cell on the ``size / loss_stride`` loss grid and its instance.
    lab : with ``lab=True``, (B, 3, g, g) float L*a*b* of the image on the loss grid.

    A point whose category is not in ``categories`` or not in ``channel_of``
    (the network's label space) raises ``ValueError`` naming it.
    """
    if len(images) != len(points):
        raise ValueError(f"{len(images)} images but {len(points)} point sets")
    flips = flips or [False] * len(images)
    feat = size // FEATURE_STRIDE
    groups: list[list[SeedGroup]] = []
    for pts in points:
        g = seed_groups(pts, categories)
        if not g:
            raise ValueError("image has no points")
        missing = sorted({x.category_id for x in g if x.category_id not in channel_of})
        if missing:
            raise ValueError(f"category id(s) {missing} of the points have no class in the trained network")
        groups.append(g)
    n_max = max(len(g) for g in groups)
    b = len(images)
    point_masks = torch.zeros(b, n_max, feat, feat)
    valid = torch.zeros(b, n_max, dtype=torch.bool)
    klass = torch.zeros(b, n_max, dtype=torch.long)
    resized, point_yx, point_instance, labs = [], [], [], []
    for i, (img, pts, g, flip) in enumerate(zip(images, points, groups, flips)):
        height, width = np.asarray(img).shape[:2]
        resized.append(resize_square(img, size, flip))
        instance = np.empty(len(pts), np.int64)
        for n, grp in enumerate(g):
            instance[grp.point_index] = n
            valid[i, n] = True
            klass[i, n] = channel_of[grp.category_id]
        rc = torch.from_numpy(_cells(pts, height, width, feat, flip))
        point_masks[i, torch.from_numpy(instance), rc[:, 0], rc[:, 1]] = 1.0
        if loss_stride:
            grid = size // loss_stride
            point_yx.append(torch.from_numpy(_cells(pts, height, width, grid, flip)))
            point_instance.append(torch.from_numpy(instance))
            if lab:
                small = square(resized[-1], grid)
                labs.append(torch.from_numpy(np.moveaxis(rgb_to_lab(small), -1, 0).copy()))
    out = {
        "image": torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float().div(255.0),
        "point_masks": point_masks,
        "instance_valid": valid,
        "instance_class": klass,
        "groups": groups,
    }
    if loss_stride:
        out.update(point_yx=point_yx, point_instance=point_instance)
        if lab:
            out["lab"] = torch.stack(labs)
    return out
