"""Pseudo-label generators behind one interface (:mod:`pointseg.generators.base`).

``GENERATORS`` is the one table from method name to class; flows, operators,
Tune and benchmarks look methods up here and nowhere else.
"""

from __future__ import annotations

from pointseg.data.record import Category
from pointseg.generators.base import GeneratorConfig, PseudoLabel, PseudoLabelGenerator, assemble, seed_groups
from pointseg.generators.point2mask import Point2MaskGenerator
from pointseg.generators.psps import PSPSGenerator
from pointseg.generators.voronoi import VoronoiGenerator

GENERATORS: dict[str, type[PseudoLabelGenerator]] = {
    PSPSGenerator.name: PSPSGenerator,
    Point2MaskGenerator.name: Point2MaskGenerator,
    VoronoiGenerator.name: VoronoiGenerator,
}


def build_generator(method: str, params: dict | None, categories: dict[int, Category]) -> PseudoLabelGenerator:
    """Build the generator called ``method`` with its config ``params``."""
    if method not in GENERATORS:
        raise ValueError(f"unknown generator method {method!r}; known: {sorted(GENERATORS)}")
    return GENERATORS[method](params or {}, categories)


__all__ = [
    "GENERATORS",
    "GeneratorConfig",
    "PseudoLabel",
    "PseudoLabelGenerator",
    "assemble",
    "build_generator",
    "seed_groups",
]
