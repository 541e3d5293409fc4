"""Typed configs: YAML in, validated pydantic objects out.

Configs are data. ``load_config(path, overrides)`` reads YAML with
``yaml.safe_load`` only, applies ``a.b.c=value`` overrides (values parsed as
YAML scalars), and validates. A wrong key is an error that names the key path.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import fsspec
import yaml

from pointseg.fingerprint import config_hash  # noqa: F401  (re-exported)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


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

    scheme: Literal["p1", "p10", "extreme"] = "p1"
    seed: int = 0
    file: str | None = None


class GeneratorSection(Strict):
    method: str = "psps"
    params: dict[str, Any] = Field(default_factory=dict)


class RayDataConfig(Strict):
    """Resources of the pseudo-label stage; fractional CPUs so 2-core boxes don't deadlock."""

    num_actors: int = Field(1, ge=1)
    num_cpus_per_actor: float = Field(0.5, gt=0)
    num_gpus_per_actor: float = Field(0.0, ge=0)
    num_cpus_per_task: float = Field(0.25, gt=0)
    batch_size: int = Field(4, ge=1)
    no_progress_timeout_s: float = Field(600.0, gt=0)
    wait_for_min_actors_s: float = Field(120.0, gt=0)


class RayConfig(Strict):
    """How to reach Ray. ``address=None`` starts a local Ray, unless inside a job."""

    address: str | None = None
    num_cpus: int | None = None
    temp_dir: str | None = None


class ReportConfig(Strict):
    num_overlays: int = Field(4, ge=0)
    baselines: list[str] = Field(default_factory=lambda: ["voronoi"], description="generators scored alongside, on the driver")


class Stage2EvalConfig(Strict):
    """Evaluation of the trained model: a Ray Data actor pool over the validation images."""

    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(0.5, gt=0)
    batch_size: int = Field(2, ge=1)
    threshold: float = Field(0.5, ge=0, le=1, description="panoptic: min query class probability")
    score_threshold: float = Field(0.05, ge=0, le=1, description="instance: min detection score")
    num_pictures: int = Field(4, ge=0, description="validation predictions drawn beside ground truth")


class Stage2Config(Strict):
    """Stage-2 training on the pseudo labels (Ray Train) and its evaluation.

    ``panoptic`` / ``instance`` hold the fields of
    :class:`pointseg.models.panoptic.PanopticModelConfig` /
    :class:`pointseg.models.instance.InstanceModelConfig`, validated here (the
    model modules, and torch, are imported only when the section is given).
    ``supervision: points`` trains on disks of ``point_radius`` pixels around
    the clicks instead of the pseudo labels (EPLD Table 6, "point label" row).
    Validation images (every ``val_every``-th image id in sorted order) are
    never trained on.
    """

    enabled: bool = False
    task: Literal["panoptic", "instance"] = "panoptic"
    supervision: Literal["pseudo", "points"] = "pseudo"
    point_radius: int = Field(3, ge=0)
    panoptic: dict[str, Any] = Field(default_factory=dict)
    instance: dict[str, Any] = Field(default_factory=dict)
    augment: dict[str, Any] = Field(default_factory=dict)
    steps: int = Field(200, ge=1)
    batch_size: int = Field(2, ge=1, description="images per worker per step")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    checkpoint_every: int = Field(50, ge=1)
    report_every: int = Field(10, ge=1)
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0, description="fractional on small boxes: 1-CPU workers deadlock on 2 cores")
    use_gpu: bool = False
    max_failures: int = Field(1, ge=-1)
    find_unused_parameters: bool = True
    run_name: str = "stage2"
    storage_path: str | None = Field(None, description="Ray Train storage (fsspec URI); default OUTPUT/train")
    val_every: int = Field(4, ge=2, description="every k-th image (sorted ids) is validation")
    seed: int = 0
    eval: Stage2EvalConfig = Stage2EvalConfig()

    @field_validator("panoptic")
    @classmethod
    def _panoptic(cls, v: dict) -> dict:
        from pointseg.models.panoptic import PanopticModelConfig

        return PanopticModelConfig.model_validate(v).model_dump(exclude_unset=True)

    @field_validator("instance")
    @classmethod
    def _instance(cls, v: dict) -> dict:
        from pointseg.models.instance import InstanceModelConfig

        return InstanceModelConfig.model_validate(v).model_dump(exclude_unset=True)

    @field_validator("augment")
    @classmethod
    def _augment(cls, v: dict) -> dict:
        from pointseg.train.augment import AugmentConfig

        return AugmentConfig.model_validate(v).model_dump(exclude_unset=True)

    @model_validator(mode="after")
    def _crop_is_model_size(self):
        size = (self.panoptic if self.task == "panoptic" else self.instance).get("image_size", 256)
        crop = self.augment.get("crop_size", size)
        if crop != size:
            raise ValueError(
                f"augment.crop_size ({crop}) must equal {self.task}.image_size ({size}): "
                "the model is trained on crops of the size it predicts at"
            )
        return self


class MapsTrainingConfig(Strict):
    """Stage 1 of a Point2Mask run with ``generator.params.maps: learned``: train the
    map network (MapNet, ``P^s`` and ``P^b_high``) with Ray Train before labelling.

    ``map_net`` holds the other fields of
    :class:`pointseg.train.point2mask_maps.MapTrainConfig` (``backbone``,
    ``pretrained``, ``width``, ``weight_decay``, ``max_grad_norm``,
    ``pseudo_every``, ``pseudo_start``, ``loss``, ``generator``), validated here
    (torch is imported only when the section is given). The trained network is
    written to ``OUTPUT/maps/map_net.pt`` and handed to the generator as
    ``generator.params.checkpoint``. Rerunning with the same ``run_name`` and
    ``storage_path`` resumes from the latest Ray Train checkpoint.
    """

    enabled: bool = True
    steps: int = Field(300, ge=1)
    image_size: int = Field(128, ge=32, description="square training and inference size of the map network")
    batch_size: int = Field(2, ge=1, description="images per worker per step")
    lr: float = Field(2e-4, gt=0)
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0, description="fractional on small boxes: 1-CPU workers deadlock on 2 cores")
    use_gpu: bool = False
    max_failures: int = Field(1, ge=-1)
    checkpoint_every: int = Field(50, ge=1)
    report_every: int = Field(10, ge=1)
    run_name: str = "maps"
    storage_path: str | None = Field(None, description="Ray Train storage (fsspec URI); default OUTPUT/maps_train")
    seed: int = 0
    map_net: dict[str, Any] = Field(default_factory=dict)

    @field_validator("map_net")
    @classmethod
    def _map_net(cls, v: dict) -> dict:
        own = sorted(set(v) & {"image_size", "batch_size", "lr", "seed"})
        if own:
            raise ValueError(f"map_net.{own[0]}: set it as maps_training.{own[0]}, not inside map_net")
        from pointseg.train.point2mask_maps import MapTrainConfig

        return MapTrainConfig.model_validate(v).model_dump(exclude_unset=True)


class PipelineConfig(Strict):
    output: str = "out/run"
    dataset: DatasetConfig = DatasetConfig()
    points: PointsConfig = PointsConfig()
    generator: GeneratorSection = GeneratorSection()
    ray: RayConfig = RayConfig()
    ray_data: RayDataConfig = RayDataConfig()
    report: ReportConfig = ReportConfig()
    train: Stage2Config = Stage2Config()
    maps_training: MapsTrainingConfig = MapsTrainingConfig()
    strict: bool = False
    resume: bool = True


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


