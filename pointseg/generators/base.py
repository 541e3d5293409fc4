"""The one interface every pseudo-label generator implements.

A generator is built once (per Ray actor) from a typed config and the category
table, then called on batches::

    gen = build_generator("psps", {"beta": 1.0}, categories)
    labels = gen(images, points)          # list[PseudoLabel], same order

Input: ``images`` is a list of ``(H, W, 3) uint8`` RGB arrays, ``points`` a
list of :class:`~pointseg.data.record.Points`. Output: one
:class:`PseudoLabel` per image in the fixed schema below, whatever the method.

Two kinds of generator:

* **from points alone** (PSPS, Voronoi): subclass :class:`PseudoLabelGenerator`
  and implement :meth:`~PseudoLabelGenerator.generate` (or a batched
  ``__call__``).
* **trainable** (Point2Mask's learned maps, EPLD, P2Seg, EXITS): subclass
  :class:`TrainableGenerator` and declare ``stage1``, a
  :class:`~pointseg.train.engine.Trainable` (network builder, collate, loss;
  checkpoint I/O is the engine's). The pipeline then trains stage 1 on the
  dataset's points through the one engine (``flows/train_generator.py``,
  ``full_pipeline``) whenever :meth:`~PseudoLabelGenerator.trains` says so,
  and hands the checkpoint folder to the generator as ``params.checkpoint``.
  The generator loads it once in ``__init__`` (:attr:`TrainableGenerator.net`).
  Nothing in ``flows/`` or ``operators/`` names a method.

Grouping rule (shared by all methods, :func:`seed_groups`): every distinct thing
``segment`` among the points becomes one instance; all stuff points of one
category become one stuff segment (COCO panoptic has one segment per stuff class
per image). Points with a category id not in the table are an error.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pointseg.data.record import VOID, Category, Points
from pointseg.uncertainty import uncertainty_diagnostics

if TYPE_CHECKING:
    from pointseg.train.engine import EngineConfig, Trainable


class GeneratorConfig(BaseModel):
    """Base of every generator's config: unknown keys are errors that name the key."""

    model_config = ConfigDict(extra="forbid")


class TrainableGeneratorConfig(GeneratorConfig):
    """Base of a trainable generator's config: where its stage-1 weights are, and their device."""

    checkpoint: str | None = Field(
        None, description="stage-1 checkpoint folder (fsspec URI); null: the pipeline trains stage 1 first")
    device: str = Field("cpu", description="torch device of the network (cuda on GPU actors)")
    fold_batchnorm: bool = Field(
        True, description="label with a copy of the network whose eval-mode BatchNorms are folded into the "
        "convolutions before them (pointseg.models.backbones.fold_batchnorm: exact up to float rounding, one pass "
        "less over every activation map); a network passed in memory is copied first, never changed")
    pad_same_inside: bool = Field(
        True, description="label with TF-SAME convolutions (timm Conv2dSame, EfficientNet-Lite0's stride-2 blocks) "
        "that pad inside the convolution instead of copying a padded input (pointseg.models.backbones."
        "pad_same_inside: exact); on a copy of a network passed in memory, as fold_batchnorm")


@dataclass
class SeedGroup:
    """The points that define one output segment."""

    id: int  # output segment id, 1..G
    category_id: int
    isthing: bool
    point_index: np.ndarray  # (k,) indices into the image's Points
    source_segment: int  # the points' ``segment`` (first one for merged stuff)


@dataclass
class PseudoLabel:
    """Panoptic pseudo label of one image: the fixed output schema.

    id_map : (H, W) int32, 0 = unlabeled (VOID), else a ``segments_info`` id.
    segments_info : list of dict with ``id, category_id, isthing, iscrowd,
        area, bbox, source_segment``.
    diagnostics : method-specific numbers (e.g. OT marginal error); JSON-able.
    uncertainty : optional (H, W) float in [0, 1], higher = less certain; needs
        no ground truth (each method documents its score).
    """

    id_map: np.ndarray
    segments_info: list[dict]
    diagnostics: dict[str, Any] = field(default_factory=dict)
    uncertainty: np.ndarray | None = None


def seed_groups(points: Points, categories: dict[int, Category]) -> list[SeedGroup]:
    """Group an image's points into output segments (rule in the module docstring)."""
    unknown = sorted({int(c) for c in points.category_id if int(c) not in categories})
    if unknown:
        raise ValueError(f"unknown category id(s) {unknown} in points")
    groups: list[SeedGroup] = []
    keys: dict[tuple, int] = {}
    members: list[list[int]] = []
    for i, (seg, cat) in enumerate(zip(points.segment.tolist(), points.category_id.tolist())):
        isthing = categories[cat].isthing
        key = ("thing", seg, cat) if isthing else ("stuff", cat)
        if key not in keys:
            keys[key] = len(groups)
            groups.append(SeedGroup(len(groups) + 1, cat, isthing, np.zeros(0, np.int64), seg))
            members.append([])
        members[keys[key]].append(i)
    for g, m in zip(groups, members):
        g.point_index = np.asarray(m, np.int64)
    return groups


def group_of_points(groups: list[SeedGroup], num_points: int) -> np.ndarray:
    """``(num_points,) int64``: the index into ``groups`` of each point (the inverse of ``point_index``)."""
    out = np.empty(num_points, np.int64)
    for gi, g in enumerate(groups):
        out[g.point_index] = gi
    return out


def assemble(assignment: np.ndarray, groups: list[SeedGroup], diagnostics: dict | None = None,
             uncertainty: np.ndarray | None = None) -> PseudoLabel:
    """Turn a per-pixel group index map into a :class:`PseudoLabel`.

    assignment : (H, W) int, index into ``groups`` or -1 for unlabeled.
    uncertainty : optional (H, W) map in [0, 1]; its image and per-segment
        summaries join ``diagnostics``
        (:func:`pointseg.uncertainty.uncertainty_diagnostics`).
    """
    assignment = np.asarray(assignment)
    ids = [g.id for g in groups] or [VOID]
    if assignment.size and assignment.max() >= len(ids):
        raise ValueError(f"assignment holds group index {int(assignment.max())} but there are {len(groups)} groups")
    lookup = np.array([*ids, VOID], np.int32)  # a negative index (unlabeled) reads the last entry, VOID
    id_map = lookup[np.maximum(assignment, -1)]
    info = []
    areas = np.bincount(id_map.ravel(), minlength=len(groups) + 1)
    for g in groups:
        area = int(areas[g.id])
        if area == 0:
            continue
        mask = id_map == g.id  # the box from its rows and columns: no coordinate list of every pixel
        ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        info.append(
            {
                "id": g.id,
                "category_id": g.category_id,
                "isthing": int(g.isthing),
                "iscrowd": 0,
                "area": area,
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                "source_segment": g.source_segment,
            }
        )
    diagnostics = dict(diagnostics or {})
    if uncertainty is not None:
        uncertainty = np.asarray(uncertainty, np.float32)
        if uncertainty.shape != id_map.shape:
            raise ValueError(f"uncertainty map {uncertainty.shape} and label {id_map.shape} differ in shape")
        diagnostics.update(uncertainty_diagnostics(uncertainty, id_map))
    return PseudoLabel(id_map, info, diagnostics, uncertainty)


@dataclass
class SourceStage:
    """A trainable generator whose stage 1 must run before another generator's (its labels feed that
    generator, e.g. P2Seg's stage-1 semantic map): its method, label params and stage-1 config, and
    ``attach(checkpoint)`` -> the updates of the dependent generator's params once it is trained."""

    method: str
    params: GeneratorConfig
    train: EngineConfig
    attach: Callable[[str], dict]


class PseudoLabelGenerator(ABC):
    """Base class: subclasses set ``name`` and ``Config`` and implement :meth:`generate`.

    Batched methods (e.g. a network on a GPU) override :meth:`__call__`, which
    receives the whole actor batch.
    """

    name: ClassVar[str]
    Config: ClassVar[type[GeneratorConfig]] = GeneratorConfig
    #: The stage-1 trainable of a trainable generator; None: labels from points alone.
    stage1: ClassVar[type[Trainable] | None] = None

    def __init__(self, config: GeneratorConfig | dict | None, categories: dict[int, Category]):
        if not isinstance(config, self.Config):
            config = self.Config.model_validate(config if isinstance(config, dict) else
                                                (config.model_dump() if config is not None else {}))
        self.config = config
        self.categories = categories

    @classmethod
    def trains(cls, config: GeneratorConfig) -> bool:
        """Whether labelling with ``config`` needs stage 1 first (no weights given yet)."""
        return False

    @classmethod
    def source_stage(cls, config: GeneratorConfig) -> SourceStage | None:
        """The untrained generator whose stage 1 the pipeline runs before this one's, or None (default)."""
        return None

    @classmethod
    def summarize(cls, diagnostics: list[dict]) -> dict | None:
        """A run-level summary of the per-image ``diagnostics`` for the report, or None.

        Returns ``{"title": str, "summary": {...}, "table": [row dicts]}``; the
        default has nothing to say.
        """
        return None

    def explain(self, image: np.ndarray, points: Points) -> np.ndarray | None:
        """An ``(h, w, 3) uint8`` picture of the method's inner maps for one image, or None."""
        return None

    @abstractmethod
    def generate(self, image: np.ndarray, points: Points) -> PseudoLabel:
        """Label one ``(H, W, 3) uint8`` image from its points."""

    def __call__(self, images: list[np.ndarray], points: list[Points]) -> list[PseudoLabel]:
        if len(images) != len(points):
            raise ValueError(f"{len(images)} images but {len(points)} point sets")
        return [self.generate(im, pts) for im, pts in zip(images, points)]


class TrainableGenerator(PseudoLabelGenerator):
    """A generator whose network is trained on the dataset's points first (stage 1).

    Subclasses set ``stage1`` (a :class:`~pointseg.train.engine.Trainable`
    whose ``context["generator"]`` receives this generator's params) and a
    ``Config`` derived from :class:`TrainableGeneratorConfig`. ``__init__``
    loads the network once from ``config.checkpoint`` (any fsspec URI; read
    with ``weights_only=True``), or takes ``net``, an in-memory network (a
    stage-1 loss that needs the current network's pseudo labels).
    :meth:`uses_net` says whether a config needs the network at all
    (Point2Mask's training-free maps do not). With ``fold_batchnorm`` (the
    default) the generator labels with a copy of the network whose eval-mode
    BatchNorms are folded into their convolutions, and with ``pad_same_inside``
    its TF-SAME convolutions pad inside the convolution; a network handed in is
    copied first, so a network still training is never changed.
    """

    Config: ClassVar[type[GeneratorConfig]] = TrainableGeneratorConfig
    stage1: ClassVar[type[Trainable]]

    def __init__(self, config, categories: dict[int, Category], net=None):
        super().__init__(config, categories)
        self.net = net
        self.net_meta: dict = {}
        if net is None and self.uses_net(self.config):
            # Deferred: the training engine (and torch) is not needed by the generators that label
            # from points alone, and their actors start faster without it.
            from pointseg.train.engine import load_trained

            if not self.config.checkpoint:
                raise ValueError(
                    f"checkpoint: {self.name} needs its stage-1 network: train it "
                    f"(flows/train_generator.py, or full_pipeline with generator.train.enabled) or set "
                    f"generator.params.checkpoint to a checkpoint folder")
            self.net, self.net_meta = load_trained(self.config.checkpoint, self.stage1, device=self.config.device)
        if self.net is not None and (self.config.fold_batchnorm or self.config.pad_same_inside):
            from pointseg.models.backbones import fold_batchnorm, pad_same_inside

            # inference only: a network handed in stays untouched
            self.net = copy.deepcopy(self.net) if net is not None else self.net
            self.net.eval()
            if self.config.fold_batchnorm:
                fold_batchnorm(self.net)
            if self.config.pad_same_inside:
                pad_same_inside(self.net)

    @classmethod
    def uses_net(cls, config: GeneratorConfig) -> bool:
        """Whether ``config`` labels with the stage-1 network (default: always)."""
        return True

    @classmethod
    def trains(cls, config: GeneratorConfig) -> bool:
        return cls.uses_net(config) and not getattr(config, "checkpoint", None)
