"""Stage 2: the model table, its typed config, and the point-label baseline.

``STAGE2_MODELS`` is the one table of stage-2 models, name -> a
:class:`~pointseg.train.engine.Trainable` subclass that also knows its task
and how to predict::

    mask2former  panoptic  Mask2Former (transformers), EfficientNet-Lite0   PQ
    mask_rcnn    instance  Mask R-CNN (torchvision), MobileNetV2-FPN        PQ_th + COCO mask AP

Each row gives ``build`` (the network, ImageNet backbone loaded offline),
``collate`` (shard rows -> inputs, :mod:`pointseg.train.batches`), ``loss``
(the model's own losses) and ``predict`` (RGB images -> panoptic id maps and,
for instance models, scored masks). Training runs through the one engine
(:mod:`pointseg.train.engine`); a checkpoint folder holds the config and the
categories, so :func:`load_stage2` rebuilds the model anywhere (an evaluation
actor, a notebook) from the folder alone.

The "point label" baseline of EPLD Table 6 trains the same network on the
clicks only. :func:`point_disk_label` turns the points of an image into such a
label: a disk of radius ``r`` around every click, one segment per thing
``segment`` and one per stuff category, everything else VOID.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationInfo, field_validator, model_validator

from pointseg.data.record import Category, Points
from pointseg.models.instance import InstanceModelConfig, build_instance_model, predict_instances
from pointseg.models.panoptic import PanopticModelConfig, build_panoptic_model, predict_panoptic
from pointseg.train.augment import AugmentConfig
from pointseg.train.batches import InstanceCollate, PanopticCollate, instance_losses, panoptic_losses
from pointseg.train.engine import EngineConfig, RowCollate, Trainable, categories_from_meta, load_trained
from pointseg.metrics.instances import rle
from pointseg.train.checkpoint import read_meta


class Stage2EvalConfig(BaseModel):
    """Evaluation of the trained model: a Ray Data actor pool over the validation images."""

    model_config = ConfigDict(extra="forbid")

    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(0.5, gt=0)
    batch_size: int = Field(2, ge=1)
    threshold: float = Field(0.5, ge=0, le=1, description="panoptic: min query class probability")
    score_threshold: float = Field(0.05, ge=0, le=1, description="instance: min detection score")
    num_pictures: int = Field(4, ge=0, description="validation predictions drawn beside ground truth")


class Stage2Config(EngineConfig):
    """Stage-2 training on the pseudo labels and its evaluation (pipeline key ``train``).

    ``model`` picks a row of ``STAGE2_MODELS``; ``params`` is validated by that
    row's model config (:class:`~pointseg.models.panoptic.PanopticModelConfig`,
    :class:`~pointseg.models.instance.InstanceModelConfig`). ``supervision:
    points`` trains on disks of ``point_radius`` pixels around the clicks
    instead of the pseudo labels (EPLD Table 6, "point label" row).
    Validation images (every ``val_every``-th image id in sorted order) are
    never trained on. The augmentation crop is the model's ``image_size``.
    """

    enabled: bool = False
    model: str = Field("mask2former", description="a STAGE2_MODELS name")
    params: SerializeAsAny[BaseModel] = Field(default_factory=PanopticModelConfig, validate_default=True)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    supervision: Literal["pseudo", "points"] = "pseudo"
    point_radius: int = Field(3, ge=0)
    run_name: str = "stage2"
    val_every: int = Field(4, ge=2, description="every k-th image (sorted ids) is validation")
    eval: Stage2EvalConfig = Stage2EvalConfig()

    @field_validator("params", mode="wrap")
    @classmethod
    def _typed_params(cls, v, handler, info: ValidationInfo):
        model = info.data.get("model", "mask2former")
        if model not in STAGE2_MODELS:
            raise ValueError(f"unknown stage-2 model {model!r}; known: {sorted(STAGE2_MODELS)}")
        config_cls = STAGE2_MODELS[model].ModelConfig
        if isinstance(v, config_cls):
            return v
        return config_cls.model_validate(v.model_dump() if isinstance(v, BaseModel) else (v or {}))

    @model_validator(mode="after")
    def _crop_is_model_size(self):
        size = self.params.image_size
        if "crop_size" in self.augment.model_fields_set and self.augment.crop_size != size:
            raise ValueError(
                f"augment.crop_size ({self.augment.crop_size}) must equal params.image_size ({size}): "
                "the model is trained on crops of the size it predicts at"
            )
        if self.augment.crop_size != size:
            self.augment = self.augment.model_copy(update={"crop_size": size})
        return self

    @property
    def task(self) -> str:
        return STAGE2_MODELS[self.model].task


@dataclass
class Prediction:
    """One image's prediction: a panoptic id map, its ``segments_info``, and scored
    instances (COCO detections, masks as RLE) for mask AP (instance models only)."""

    id_map: np.ndarray
    segments_info: list[dict]
    instances: list[dict] | None = None


class Stage2Model(Trainable):
    """A row of ``STAGE2_MODELS``: a stage-2 network trained on pseudo-label shard rows."""

    Config = Stage2Config
    rows = "shards"
    task: ClassVar[Literal["panoptic", "instance"]]
    ModelConfig: ClassVar[type[BaseModel]]

    def predict(self, model: torch.nn.Module, images: list[np.ndarray]) -> list[Prediction]:
        raise NotImplementedError


class Mask2FormerModel(Stage2Model):
    """Mask2Former, panoptic (:mod:`pointseg.models.panoptic`)."""

    name = "mask2former"
    task = "panoptic"
    ModelConfig = PanopticModelConfig

    def build(self, pretrained: bool = True) -> torch.nn.Module:
        params = self.config.params if pretrained else self.config.params.model_copy(update={"pretrained": False})
        model, processor = build_panoptic_model(params, self.categories)
        model.pointseg_processor = processor  # predict() needs it; not a module, not in the state dict
        return model

    def collate(self, train: bool = True) -> RowCollate:
        return PanopticCollate(self.categories, self.config.params.backbone, self.config.augment, seed=self.config.seed,
                               train=train)

    def loss(self, model, batch, step):
        return panoptic_losses(model, batch)

    def predict(self, model, images):
        ev = self.config.eval
        return [Prediction(m, info) for m, info in predict_panoptic(model, model.pointseg_processor, images,
                                                                       threshold=ev.threshold)]


class MaskRCNNModel(Stage2Model):
    """Mask R-CNN, instances (:mod:`pointseg.models.instance`); its panoptic map paints the
    masks lowest score first, so the best detection wins overlaps."""

    name = "mask_rcnn"
    task = "instance"
    ModelConfig = InstanceModelConfig

    def build(self, pretrained: bool = True) -> torch.nn.Module:
        params = self.config.params if pretrained else self.config.params.model_copy(update={"pretrained": False})
        return build_instance_model(params, self.categories)

    def collate(self, train: bool = True) -> RowCollate:
        return InstanceCollate(self.categories, self.config.augment, seed=self.config.seed, train=train)

    def loss(self, model, batch, step):
        return instance_losses(model, batch)

    def predict(self, model, images):
        out = []
        for p, im in zip(predict_instances(model, images, score_threshold=self.config.eval.score_threshold), images):
            id_map = np.zeros(im.shape[:2], np.int32)
            for k in np.argsort(p["scores"], kind="stable"):
                id_map[p["masks"][k]] = k + 1
            info = [{"id": int(k + 1), "category_id": int(p["labels"][k]), "isthing": 1, "iscrowd": 0}
                    for k in range(len(p["masks"])) if (id_map == k + 1).any()]
            dets = [{"category_id": int(c), "score": float(sc), "segmentation": rle(m)}
                    for m, c, sc in zip(p["masks"], p["labels"], p["scores"])]
            out.append(Prediction(id_map, info, dets))
        return out


#: The stage-2 model table: name -> trainable (build, collate, loss, predict, task).
STAGE2_MODELS: dict[str, type[Stage2Model]] = {m.name: m for m in (Mask2FormerModel, MaskRCNNModel)}


def load_stage2(uri: str, device: str = "cpu") -> tuple[torch.nn.Module, Stage2Model, dict]:
    """``(model in eval mode, its trainable (config, categories, predict), meta)`` from a checkpoint folder."""
    meta = read_meta(uri)
    name = meta.get("trainable")
    if name not in STAGE2_MODELS:
        raise ValueError(f"checkpoint {uri}: trained by {name!r}, which is not a stage-2 model ({sorted(STAGE2_MODELS)})")
    model, meta = load_trained(uri, STAGE2_MODELS[name], device=device)
    return model, STAGE2_MODELS[name](meta["config"], categories_from_meta(meta)), meta


def point_disk_label(points: Points, height: int, width: int, radius: int,
                     categories: dict[int, Category]) -> tuple[np.ndarray, list[dict]]:
    """A label holding only disks around the clicks (the "point label" supervision).

    Parameters
    ----------
    points : clicks of one image; ``segment`` groups the clicks of one thing.
    height, width : image size.
    radius : disk radius in pixels (0: the click pixel only).
    categories : the label space (``isthing`` decides thing vs stuff).

    Returns
    -------
    ``id_map (H, W) int32`` (0 = VOID) and COCO ``segments_info`` (``id,
    category_id, isthing, iscrowd, area, bbox``). Thing segment ``k`` (in order
    of first click) gets id ``k + 1``; stuff category ``c`` gets one segment.
    Where disks overlap, the later click wins.
    """
    id_map = np.zeros((height, width), np.int32)
    if len(points) == 0:
        return id_map, []
    rc = points.pixels(height, width)
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = (yy**2 + xx**2) <= radius * radius
    dy, dx = yy[disk], xx[disk]
    seg_of: dict[tuple, int] = {}
    cat_of: dict[int, int] = {}
    for (r, c), seg, cat in zip(rc, points.segment, points.category_id):
        cat = int(cat)
        if cat not in categories:
            raise ValueError(f"points: category_id {cat} is not in the category table")
        key = ("thing", int(seg)) if categories[cat].isthing else ("stuff", cat)
        sid = seg_of.setdefault(key, len(seg_of) + 1)
        cat_of[sid] = cat
        rr, cc = r + dy, c + dx
        ok = (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width)
        id_map[rr[ok], cc[ok]] = sid
    info = []
    for sid, cat in cat_of.items():
        ys, xs = np.nonzero(id_map == sid)
        if len(ys) == 0:
            continue
        info.append({
            "id": sid, "category_id": cat, "isthing": int(categories[cat].isthing), "iscrowd": 0,
            "area": int(len(ys)),
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
        })
    return id_map, info


def point_label_rows(index_rows: list[dict], categories: dict[int, Category], radius: int) -> list[dict]:
    """Shard rows (README "Output layout") with :func:`point_disk_label` labels, one per index row."""
    from pointseg.data.panoptic_format import encode_png

    out = []
    for r in index_rows:
        base = {"image_id": int(r["image_id"]), "file_name": r["file_name"], "height": int(r["height"]),
                "width": int(r["width"]), "method": "points", "config_hash": f"disk{radius}",
                "diagnostics": "{}", "seconds": 0.0, "warnings": "[]"}
        try:
            pts = Points.from_list(json.loads(r["points"]))
            id_map, info = point_disk_label(pts, int(r["height"]), int(r["width"]), radius, categories)
            out.append({**base, "label_png": encode_png(id_map), "segments_info": json.dumps(info), "error": ""})
        except Exception as e:  # noqa: BLE001 - one bad image never sinks the run
            out.append({**base, "label_png": b"", "segments_info": "[]", "error": f"{type(e).__name__}: {e}"})
    return out



def validation_ids(image_ids, val_every: int) -> set[int]:
    """Every ``val_every``-th id in sorted order (starting with the first): the held-out images."""
    if val_every < 2:
        raise ValueError(f"val_every must be >= 2 (got {val_every}): otherwise nothing is left to train on")
    return set(sorted(int(i) for i in image_ids)[::val_every])
