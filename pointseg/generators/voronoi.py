"""Euclidean nearest-point (Voronoi) assignment: the strongest trivial baseline.

Each pixel takes the seed group of the nearest point in the image plane,
ignoring the image content. Any generator that uses the image must beat it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pointseg.data.record import Points
from pointseg.generators.base import GeneratorConfig, PseudoLabel, PseudoLabelGenerator, assemble, seed_groups


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
        return assemble(seeds[ri, ci], groups)
