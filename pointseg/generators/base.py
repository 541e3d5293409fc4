"""The one interface every pseudo-label generator implements.

A generator is built once (per Ray actor) from a typed config and the category
table, then called on batches::

    gen = build_generator("psps", {"beta": 1.0}, categories)
    labels = gen(images, points)          # list[PseudoLabel], same order

Input: ``images`` is a list of ``(H, W, 3) uint8`` RGB arrays, ``points`` a
list of :class:`~pointseg.data.record.Points`. Output: one
:class:`PseudoLabel` per image in the fixed schema below, whatever the method.

Grouping rule (shared by all methods, :func:`seed_groups`): every distinct thing
``segment`` among the points becomes one instance; all stuff points of one
category become one stuff segment (COCO panoptic has one segment per stuff class
per image). Points with a category id not in the table are an error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from pointseg.data.record import VOID, Category, Points


class GeneratorConfig(BaseModel):
    """Base of every generator's config: unknown keys are errors that name the key."""

    model_config = ConfigDict(extra="forbid")


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
    """

    id_map: np.ndarray
    segments_info: list[dict]
    diagnostics: dict[str, Any] = field(default_factory=dict)


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


def assemble(assignment: np.ndarray, groups: list[SeedGroup], diagnostics: dict | None = None) -> PseudoLabel:
    """Turn a per-pixel group index map into a :class:`PseudoLabel`.

    assignment : (H, W) int, index into ``groups`` or -1 for unlabeled.
    """
    assignment = np.asarray(assignment)
    id_map = np.zeros(assignment.shape, np.int32)
    valid = assignment >= 0
    ids = np.array([g.id for g in groups] or [VOID], np.int32)
    id_map[valid] = ids[assignment[valid]]
    info = []
    areas = np.bincount(id_map.ravel(), minlength=len(groups) + 1)
    for g in groups:
        area = int(areas[g.id])
        if area == 0:
            continue
        ys, xs = np.nonzero(id_map == g.id)
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
    return PseudoLabel(id_map, info, diagnostics or {})


class PseudoLabelGenerator(ABC):
    """Base class: subclasses set ``name`` and ``Config`` and implement :meth:`generate`.

    Batched methods (e.g. a network on a GPU) override :meth:`__call__`.
    """

    name: ClassVar[str]
    Config: ClassVar[type[GeneratorConfig]] = GeneratorConfig

    def __init__(self, config: GeneratorConfig | dict | None, categories: dict[int, Category]):
        if not isinstance(config, GeneratorConfig):
            config = self.Config.model_validate(config or {})
        self.config = config
        self.categories = categories

    @abstractmethod
    def generate(self, image: np.ndarray, points: Points) -> PseudoLabel:
        """Label one ``(H, W, 3) uint8`` image from its points."""

    def __call__(self, images: list[np.ndarray], points: list[Points]) -> list[PseudoLabel]:
        if len(images) != len(points):
            raise ValueError(f"{len(images)} images but {len(points)} point sets")
        return [self.generate(im, pts) for im, pts in zip(images, points)]
