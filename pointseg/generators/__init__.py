"""Pseudo-label generators behind one interface (:mod:`pointseg.generators.base`).

``GENERATORS`` is the one table from method name to class; flows, operators,
Tune and benchmarks look methods up here (:func:`generator_class`) and nowhere
else. A method outside the table can be named by its import path,
``"package.module:ClassName"`` (a plug-in: it must be importable by the Ray
workers too).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from pointseg.data.record import Category
from pointseg.fingerprint import config_hash
from pointseg.generators.base import (
    GeneratorConfig,
    PseudoLabel,
    PseudoLabelGenerator,
    TrainableGenerator,
    TrainableGeneratorConfig,
    assemble,
    seed_groups,
)

#: Method name -> ``"module:Class"``. Imported on first use, so a labelling actor imports its own
#: method only (PSPS never pays for torch).
_METHODS = {
    "psps": "pointseg.generators.psps:PSPSGenerator",
    "point2mask": "pointseg.generators.point2mask:Point2MaskGenerator",
    "voronoi": "pointseg.generators.voronoi:VoronoiGenerator",
    "exits": "pointseg.generators.exits:ExitsGenerator",
    "box": "pointseg.generators.extreme_baselines:BoxGenerator",
    "extreme_polygon": "pointseg.generators.extreme_baselines:ExtremePolygonGenerator",
    "grabcut": "pointseg.generators.extreme_baselines:GrabCutGenerator",
    "p2seg": "pointseg.generators.p2seg:P2SegGenerator",
    "epld": "pointseg.generators.epld:EPLDGenerator",
}


class _Table(Mapping):
    """The ``GENERATORS`` table: a read-only mapping of method name -> generator class."""

    def __init__(self, paths: dict[str, str]):
        self._paths, self._classes = paths, {}

    def __getitem__(self, name: str) -> type[PseudoLabelGenerator]:
        if name not in self._classes:
            module, _, cls = self._paths[name].partition(":")
            self._classes[name] = getattr(importlib.import_module(module), cls)
        return self._classes[name]

    def __iter__(self):
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __repr__(self) -> str:
        return f"GENERATORS({sorted(self._paths)})"


GENERATORS: Mapping[str, type[PseudoLabelGenerator]] = _Table(_METHODS)


def generator_class(method: str) -> type[PseudoLabelGenerator]:
    """The class of ``method``: a ``GENERATORS`` name or a ``"module:Class"`` import path."""
    if method in GENERATORS:
        return GENERATORS[method]
    if ":" in method:
        module, _, name = method.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"generator method {method!r}: cannot import it ({type(e).__name__}: {e})") from None
        if not (isinstance(cls, type) and issubclass(cls, PseudoLabelGenerator)):
            raise ValueError(f"generator method {method!r} is not a PseudoLabelGenerator subclass")
        return cls
    raise ValueError(f"unknown generator method {method!r}; known: {sorted(GENERATORS)} (or 'module:Class')")


def build_generator(method: str, params: GeneratorConfig | dict | None, categories: dict[int, Category],
                    **kwargs) -> PseudoLabelGenerator:
    """Build the generator called ``method`` with its config ``params``."""
    return generator_class(method)(params, categories, **kwargs)


def generator_fingerprint(method: str, params: GeneratorConfig | dict | None) -> str:
    """Short hash of a generator's validated config, and of its weights if it has a checkpoint.

    Stored with every shard row (``config_hash``); a resumed run relabels rows
    whose fingerprint differs, e.g. after retraining stage 1. The weights'
    SHA-1 comes from the checkpoint's ``meta.json`` (no weight file is read).
    """
    from pointseg.train.checkpoint import checkpoint_fingerprint

    cls = generator_class(method)
    cfg = params if isinstance(params, cls.Config) else cls.Config.model_validate(
        params if isinstance(params, dict) else (params.model_dump() if params is not None else {}))
    data = cfg.model_dump(mode="json")
    weights = data.get("checkpoint")
    if weights:
        try:
            data["checkpoint_sha1"] = checkpoint_fingerprint(str(weights))
        except FileNotFoundError:
            pass  # the generator itself reports the missing checkpoint
    return config_hash({"method": method, "params": data})


__all__ = [
    "GENERATORS",
    "GeneratorConfig",
    "PseudoLabel",
    "PseudoLabelGenerator",
    "TrainableGenerator",
    "TrainableGeneratorConfig",
    "assemble",
    "build_generator",
    "generator_class",
    "generator_fingerprint",
    "seed_groups",
]
