"""PSPS: each pixel takes the label of the point with the minimum geodesic cost.

Fan et al., "Pointly-supervised panoptic segmentation", ECCV 2022; it is the
"Minimum Cost" baseline of Point2Mask (Table 7). Training-free form, on
low-level maps only:

* edge cost between 8-neighbours k, l (Point2Mask Eq. 2-3 with low-level maps):
  ``c(k, l) = ||LAB(k) - LAB(l)|| / 100 + beta * max(B(k), B(l))`` where ``B``
  is the normalised LAB Sobel boundary (:func:`pointseg.lowlevel.lab_sobel_boundary`),
  the substitute the PSPS code uses for a learned boundary map;
* every point is a source; one multi-source Dijkstra
  (:func:`pointseg.geodesic.nearest_source`) gives each pixel the seed group
  (:func:`~pointseg.generators.base.seed_groups`) of its nearest point;
* computed at ``downscale`` of the input and upsampled by nearest neighbour.

Every pixel reachable from a point gets a label; unreachable pixels stay 0.

Uncertainty (``PseudoLabel.uncertainty``): the same search also keeps each
pixel's second-nearest seed group (:func:`pointseg.geodesic.nearest_two_sources`),
and ``u = D_1 / D_2``, one minus the relative gap between the nearest and the
second-nearest group's geodesic distance (:func:`pointseg.uncertainty.distance_ratio`),
upsampled bilinearly (``uncertainty: false`` skips it).
"""

from __future__ import annotations

import time

import cv2
import numpy as np
from pydantic import Field

from pointseg.data.record import Points
from pointseg.generators.base import (GeneratorConfig, PseudoLabel, PseudoLabelGenerator, assemble, group_of_points,
                                      seed_groups)
from pointseg.geodesic import edge_costs, nearest_source, nearest_two_sources
from pointseg.lowlevel import lab_sobel_boundary, rgb_to_lab
from pointseg.uncertainty import distance_ratio


class PSPSConfig(GeneratorConfig):
    beta: float = Field(0.1, ge=0, description="weight of the boundary term in the edge cost (Point2Mask default 0.1)")
    downscale: float = Field(0.5, gt=0, le=1, description="geodesic computed at this fraction of the size")
    blur_sigma: float = Field(0.5, ge=0, description="Gaussian blur of the image before LAB, in pixels of the scaled image")
    uncertainty: bool = Field(True, description="also search the second-nearest group for the uncertainty map "
                              "(about 2x the geodesic time; benchmarks/psps_uncertainty.py)")


def scaled_size(height: int, width: int, downscale: float) -> tuple[int, int]:
    return max(1, int(round(height * downscale))), max(1, int(round(width * downscale)))


def low_level_maps(image: np.ndarray, size: tuple[int, int], blur_sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """LAB image ``(3, h, w)`` scaled to [0, 1]-ish units and Sobel boundary ``(h, w)`` at ``size``."""
    h, w = size
    small = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA) if image.shape[:2] != (h, w) else image
    if blur_sigma > 0:
        small = cv2.GaussianBlur(small, (0, 0), blur_sigma)
    lab = rgb_to_lab(small)
    boundary = lab_sobel_boundary(lab)
    return np.moveaxis(lab, -1, 0) / 100.0, boundary


def geodesic_cost(image: np.ndarray, downscale: float, blur_sigma: float, beta: float) -> tuple[np.ndarray, tuple[int, int]]:
    """PSPS's edge costs (LAB colour + ``beta`` * Sobel boundary) of ``image`` at ``downscale`` of its size,
    and that working size ``(h, w)``: the one cost the geodesic splits of PSPS, EPLD and P2Seg share."""
    height, width = np.asarray(image).shape[:2]
    size = scaled_size(height, width, downscale)
    lab, boundary = low_level_maps(np.asarray(image), size, blur_sigma)
    return edge_costs(lab, boundary, beta=beta), size


def upsample_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    if labels.shape == (height, width):
        return labels
    return cv2.resize(labels.astype(np.int32), (width, height), interpolation=cv2.INTER_NEAREST)


def cells_read_by(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """``(h, w) bool``: the working-grid cells that the ``True`` pixels of a full-size ``mask`` read when a
    ``(h, w)`` label map is resized with :func:`upsample_labels` (so a label on those cells reaches every pixel
    of ``mask``; a plain nearest downscale of ``mask`` can miss cells at its border)."""
    cell = upsample_labels(np.arange(h * w, dtype=np.int32).reshape(h, w), *np.shape(mask))
    out = np.zeros(h * w, bool)
    out[cell[np.asarray(mask, bool)]] = True
    return out.reshape(h, w)


class PSPSGenerator(PseudoLabelGenerator):
    name = "psps"
    Config = PSPSConfig

    def generate(self, image: np.ndarray, points: Points) -> PseudoLabel:
        cfg = self.config
        height, width = image.shape[:2]
        groups = seed_groups(points, self.categories)
        if not groups:
            raise ValueError("image has no points")
        t0 = time.perf_counter()
        cost, (h, w) = geodesic_cost(image, cfg.downscale, cfg.blur_sigma, cfg.beta)
        sources = scaled_points(points, height, width, h, w)
        point_group = group_of_points(groups, len(points))
        uncertainty = None
        if cfg.uncertainty:
            dist, label = nearest_two_sources(cost, sources, labels=point_group)
            uncertainty = upsample_map(distance_ratio(dist[0], dist[1]), height, width)
            label = label[0]
        else:
            _, label = nearest_source(cost, sources, labels=point_group)
        assignment = upsample_labels(label, height, width)
        return assemble(assignment, groups, {"geodesic_seconds": time.perf_counter() - t0, "scaled_size": [h, w]},
                        uncertainty)


def upsample_map(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """A float map bilinearly resized to ``(height, width)`` (values stay within their range)."""
    if values.shape == (height, width):
        return values
    return cv2.resize(values, (width, height), interpolation=cv2.INTER_LINEAR)


def scaled_points(points: Points, height: int, width: int, h: int, w: int) -> np.ndarray:
    """``(P, 2)`` int ``(row, col)`` of the points on an ``(h, w)`` grid scaled from ``(height, width)``."""
    return scaled_cells(points.xy[:, ::-1], height, width, h, w)


def scaled_cells(yx: np.ndarray, height: int, width: int, h: int, w: int) -> np.ndarray:
    """``(N, 2)`` int ``(row, col)`` on an ``(h, w)`` grid of pixel coordinates ``yx`` (row, col) of a
    ``(height, width)`` image: ``floor((y + 0.5) h / height)``, clipped to the grid."""
    yx = np.asarray(yx, np.float64).reshape(-1, 2)
    rows = np.clip(np.floor((yx[:, 0] + 0.5) * h / height), 0, h - 1)
    cols = np.clip(np.floor((yx[:, 1] + 0.5) * w / width), 0, w - 1)
    return np.stack([rows, cols], 1).astype(np.int64)
