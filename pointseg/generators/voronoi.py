"""Euclidean nearest-point (Voronoi) assignment: the strongest trivial baseline.

Each pixel takes the seed group of the nearest point in the image plane,
ignoring the image content. Any generator that uses the image must beat it.

Uncertainty: ``u = D_1 / D_2`` with ``D_1``, ``D_2`` the Euclidean distances
to the nearest and the second-nearest seed group
(:func:`pointseg.uncertainty.distance_ratio`), one exact distance transform per
group.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pointseg.data.record import Points
from pointseg.generators.base import GeneratorConfig, PseudoLabel, PseudoLabelGenerator, assemble, seed_groups
from pointseg.uncertainty import distance_ratio


class VoronoiGenerator(PseudoLabelGenerator):
    name = "voronoi"
    Config = GeneratorConfig

    def generate(self, image: np.ndarray, points: Points) -> PseudoLabel:
        height, width = image.shape[:2]
        groups = seed_groups(points, self.categories)
        if not groups:
            raise ValueError("image has no points")
        seeds = np.full((height, width), -1, np.int64)
        rc = points.pixels(height, width)
        for gi, g in enumerate(groups):
            seeds[rc[g.point_index, 0], rc[g.point_index, 1]] = gi
        # Nearest seed pixel for every pixel (exact Euclidean distance transform).
        _, (ri, ci) = ndimage.distance_transform_edt(seeds < 0, return_indices=True)
        return assemble(seeds[ri, ci], groups, uncertainty=group_distance_ratio(seeds, len(groups)))


def group_distance_ratio(seeds: np.ndarray, num_groups: int) -> np.ndarray:
    """``D_1 / D_2`` per pixel: Euclidean distances to the nearest and second-nearest group's seed pixel.

    seeds : (H, W) int, group index on seed pixels, -1 elsewhere.
    """
    if num_groups < 2:
        return np.zeros(seeds.shape, np.float32)
    two = np.full((2,) + seeds.shape, np.inf)
    for g in range(num_groups):
        if not (seeds == g).any():  # all its points share pixels with later groups
            continue
        d = ndimage.distance_transform_edt(seeds != g)
        # keep the two smallest per pixel: (two[0], two[1]) <- sorted of (two[0], two[1], d)
        two[1] = np.minimum(two[1], np.maximum(two[0], d))
        two[0] = np.minimum(two[0], d)
    return distance_ratio(two[0], two[1])
