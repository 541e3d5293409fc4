"""Pseudo-label generators behind one interface (:mod:`pointseg.generators.base`).

``GENERATORS`` is the one table from method name to class; flows, operators,
Tune and benchmarks look methods up here and nowhere else.
"""

from __future__ import annotations

import hashlib

import fsspec

from pointseg.config import config_hash
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


def generator_fingerprint(method: str, params: dict | None) -> str:
    """Short hash of a generator's validated config, and of its weights file if it has one.

    Stored with every shard row (``config_hash``); a resumed run relabels rows
    whose fingerprint differs, e.g. after retraining the map network.
    """
    if method not in GENERATORS:
        raise ValueError(f"unknown generator method {method!r}; known: {sorted(GENERATORS)}")
    cfg = GENERATORS[method].Config.model_validate(params or {}).model_dump(mode="json")
    weights = cfg.get("checkpoint")
    if weights:
        fs, path = fsspec.core.url_to_fs(str(weights))
        if fs.exists(path):
            with fs.open(path, "rb") as f:
                cfg["checkpoint_sha1"] = hashlib.sha1(f.read()).hexdigest()
    return config_hash({"method": method, "params": cfg})


__all__ = [
    "GENERATORS",
    "generator_fingerprint",
    "GeneratorConfig",
    "PseudoLabel",
    "PseudoLabelGenerator",
    "assemble",
    "build_generator",
    "seed_groups",
]
