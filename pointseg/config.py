"""Typed configs: YAML in, validated pydantic objects out.

Configs are data. ``load_config(path, overrides)`` reads YAML with
``yaml.safe_load`` only, applies ``a.b.c=value`` overrides (values parsed as
YAML scalars), and validates. A wrong key is an error that names the key path.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import fsspec
import yaml
from pydantic import (BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from pointseg.generators import GeneratorConfig, generator_class
from pointseg.review.options import ReviewOptions
from pointseg.train.engine import EngineConfig
from pointseg.train.stage2 import Stage2Config


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticDataConfig(Strict):
    num_images: int = Field(24, ge=1)
    height: int = Field(128, ge=16)
    width: int = Field(128, ge=16)
    seed: int = 0


class DatasetConfig(Strict):
    """Where the images and ground truth come from.

    ``kind``: ``synthetic`` (embedded default, nothing downloaded),
    ``coco_instances`` (``annotations`` = instances JSON, ``images`` = image dir)
    or ``coco_panoptic`` (``annotations`` = panoptic JSON, ``panoptic_dir`` = PNG
    dir, ``images`` = image dir).
    """

    kind: Literal["synthetic", "coco_instances", "coco_panoptic"] = "synthetic"
    synthetic: SyntheticDataConfig = SyntheticDataConfig()
    annotations: str | None = None
    images: str | None = None
    panoptic_dir: str | None = None
    categories: str | None = None
    max_images: int | None = Field(None, ge=1)
    background: Literal["void", "stuff"] = Field(
        "void", description="instance datasets: pixels outside every instance are VOID, or one 'background' stuff "
        "segment (the VOC-panoptic protocol: 20 things + 1 background stuff class; P1 puts one click on it)")
    allow_outside_paths: bool = Field(
        False, description="allow image file_names that escape the image root (.., absolute, another scheme)")


class PointsConfig(Strict):
    """Point labels: simulated from ground truth (``scheme``) or read from a JSONL ``file``."""

    scheme: Literal["p1", "p10", "extreme", "extreme_pixel"] = Field(
        "p1", description="p1 / p10: uniform clicks per segment; extreme: ExtremeNet's band rule on the polygons "
        "(things) plus one click per stuff segment; extreme_pixel: the extreme mask pixels (an approximation)")
    seed: int = 0
    file: str | None = None


class GeneratorSection(Strict):
    """``method`` picks a generator (a ``GENERATORS`` name or ``module:Class``); ``params`` is
    validated by its config and ``train`` (stage 1 of a trainable generator) by its stage-1
    config, so a typo names its full path, e.g. ``generator.params.betta``."""

    method: str = "psps"
    params: SerializeAsAny[GeneratorConfig] = Field(default_factory=GeneratorConfig, validate_default=True)
    train: SerializeAsAny[EngineConfig] | None = Field(None, validate_default=True)

    @field_validator("params", mode="wrap")
    @classmethod
    def _typed_params(cls, v, handler, info: ValidationInfo):
        config_cls = generator_class(info.data.get("method", "psps")).Config
        return _as_model(v, config_cls)

    @field_validator("train", mode="wrap")
    @classmethod
    def _typed_train(cls, v, handler, info: ValidationInfo):
        method = info.data.get("method", "psps")
        try:
            stage1 = generator_class(method).stage1
        except ValueError:
            return None  # the params validator names the unknown method
        if stage1 is None:
            if v:
                raise ValueError(f"{method} has no stage 1 to train (it labels from the points alone)")
            return None
        return _as_model(v, stage1.Config)

    @model_validator(mode="after")
    def _source_has_its_own_run(self):
        source = self.generator_class.source_stage(self.params)
        if source is not None and self.train is not None and source.train.run_name == self.train.run_name:
            raise ValueError(f"the {source.method} source and {self.method} stage 1 share run_name "
                             f"{source.train.run_name!r} (one would resume the other): give the source's "
                             f"training config its own run_name")
        return self

    @property
    def generator_class(self):
        return generator_class(self.method)

    def needs_training(self) -> bool:
        """Whether the pipeline must train stage 1 before labelling (a trainable generator without
        weights, or an untrained source it reads (``source_stage``), with ``train.enabled``)."""
        cls = self.generator_class
        return bool(self.train is not None and self.train.enabled
                    and (cls.trains(self.params) or cls.source_stage(self.params) is not None))


def _as_model(v, config_cls):
    """``v`` (dict, model or None) validated as ``config_cls``; nested errors keep their paths."""
    if isinstance(v, config_cls):
        return v
    return config_cls.model_validate(v.model_dump() if isinstance(v, BaseModel) else (v or {}))


class RayDataConfig(Strict):
    """Resources of the pseudo-label stage; fractional CPUs so 2-core boxes don't deadlock."""

    num_actors: int = Field(1, ge=1)
    num_cpus_per_actor: float = Field(0.5, gt=0)
    num_gpus_per_actor: float = Field(0.0, ge=0)
    batch_size: int = Field(4, ge=1, description="images per actor call; also the unit of shard files and of redone work")
    no_progress_timeout_s: float = Field(600.0, gt=0)
    wait_for_min_actors_s: float = Field(120.0, gt=0)
    min_images_for_ray: int = Field(
        64, ge=0, description="fewer images to label than this: label in this process (same operator, same shards); "
        "0: always Ray")
    keep_freed_memory_mib: int = Field(
        512, ge=0, le=2047, description="freed memory (MiB) each labelling process keeps for its next batch instead of handing it back "
        "to the OS (glibc malloc thresholds, pointseg.cpu_memory): a batched network call then stops paying a page "
        "fault per 4 KiB of its activations on every call; 0: glibc's defaults")


class RayConfig(Strict):
    """How to reach Ray. ``address=None`` starts a local Ray of the run's own (also when another Ray runs on the
    machine), unless inside a job (``RAY_ADDRESS``)."""

    address: str | None = None
    num_cpus: int | None = None
    temp_dir: str | None = None


class ReportConfig(Strict):
    num_overlays: int = Field(4, ge=0)
    baselines: list[str] = Field(default_factory=lambda: ["voronoi"], description="generators scored alongside, on the driver")
    num_contrasts: int = Field(4, ge=0, description="images drawn side by side with every baseline's labels: the half "
                               "where the pseudo labels' mean best IoU beats the first baseline's (psps if listed) by "
                               "most, the half where it loses by most (report/contrast.png); 0: none")


class PipelineConfig(Strict):
    output: str = "out/run"
    dataset: DatasetConfig = DatasetConfig()
    points: PointsConfig = PointsConfig()
    generator: GeneratorSection = GeneratorSection()
    ray: RayConfig = RayConfig()
    ray_data: RayDataConfig = RayDataConfig()
    report: ReportConfig = ReportConfig()
    train: Stage2Config = Stage2Config()
    review: ReviewOptions = ReviewOptions()
    strict: bool = False
    resume: bool = True


def with_generator_params(cfg: PipelineConfig, updates: dict) -> PipelineConfig:
    """A copy of ``cfg`` whose ``generator.params`` carry ``updates`` (e.g. the stage-1 checkpoint)."""
    cfg = cfg.model_copy(deep=True)
    cfg.generator.params = cfg.generator.params.model_copy(update=updates)
    return cfg


C = TypeVar("C", bound=BaseModel)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"override {dotted!r}: {k!r} is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict:
    """``["a.b=1", "c=x"]`` -> nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw))
    return tree


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(uri: str) -> dict:
    with fsspec.open(uri, "r") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{uri}: the top level of a config must be a mapping")
    return data


def validate(model: type[C], data: dict, source: str = "config") -> C:
    """Validate ``data`` into ``model``; errors name every bad key path."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            path = ".".join(str(p) for p in err["loc"]) or "<root>"
            lines.append(f"  {path}: {err['msg']}")
        raise ValueError(f"{source}: invalid config\n" + "\n".join(lines)) from None


def load_config(model: type[C], path: str | None, overrides: list[str] | None = None) -> C:
    data = read_yaml(path) if path else {}
    data = deep_merge(data, parse_overrides(overrides))
    return validate(model, data, source=path or "config")


