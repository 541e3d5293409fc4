"""EXITS labelling (Sec. 3.3): crop every object, predict its mask, paste the masks back.

For a batch of images, every thing object (four extreme points, parsed by
:func:`~pointseg.generators.extreme_baselines.extreme_objects`) is cropped
as in training (the crop size and margin of the checkpoint's stage-1 config),
the generator network runs on ``batch_objects`` crops at a time, and each
mask probability map ``M`` is resampled back into its window of the image.

A pixel belongs to every object with ``M >= mask_threshold`` there; where
several claim it, ``overlap="smallest"`` (default) gives it to the object
with the smallest box (usually in front, the rule of the baselines and of
:func:`pointseg.data.coco.panoptic_order`; with ``"probability"`` a large
object whose ``M`` saturates swallows the smaller ones inside its box), and
``"probability"`` to the highest ``M``. When none claims it, it is VOID, or the nearest
stuff click's segment when the image has stuff clicks (the VOC-panoptic
``background``, :func:`~pointseg.generators.extreme_baselines.fill_stuff`). Objects the network cannot take
get the per-object fallbacks of
:mod:`~pointseg.generators.extreme_baselines` (degenerate and small objects:
their box), and an object whose mask comes out empty gets its filled box too
(counted as ``empty_mask``); all are counted in the diagnostics and the
other objects of the image are labelled as usual.

Uncertainty: at every pixel the candidate labels are the objects, with
probabilities ``M_k`` (0 outside an object's window), and VOID with ``1 -
max_k M_k``; the uncertainty is ``1 - (top1 - top2)`` over these scores, the
margin of the two best. It is 1 on a mask edge (``M = 0.5``) and where two
objects claim a pixel equally, and near 0 deep inside one confident mask or
far outside every object. Fallback masks count as ``M = 1``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from pointseg.argmax import first_argmax
from pointseg.data.record import Points
from pointseg.generators.base import PseudoLabel, TrainableGenerator, assemble
from pointseg.generators.exits.config import ExitsConfig
from pointseg.generators.exits.crops import paste_probabilities
from pointseg.generators.exits.stage1 import ExitsStage1, crop_objects
from pointseg.generators.extreme_baselines import (
    box_mask,
    extreme_objects,
    fill_stuff,
    object_diagnostics,
    paint_smallest_last,
    summarize_objects,
)

__all__ = ["ExitsGenerator", "margin_uncertainty"]


def margin_uncertainty(probs: np.ndarray) -> np.ndarray:
    """``1 - (top1 - top2)`` over ``[M_1 .. M_K, 1 - max_k M_k]`` per pixel: (K, H, W) -> (H, W) float32."""
    if len(probs) == 0:
        return np.zeros(probs.shape[1:], np.float32)
    scores = np.concatenate([probs, 1 - probs.max(0, keepdims=True)])
    top2 = -np.partition(-scores, 1, axis=0)[:2]
    return np.clip(1 - (top2[0] - top2[1]), 0, 1).astype(np.float32)


class ExitsGenerator(TrainableGenerator):
    """EXITS pseudo masks from four extreme points per object (module docstring)."""

    name = "exits"
    Config = ExitsConfig
    stage1 = ExitsStage1

    def __init__(self, config, categories, net=None):
        super().__init__(config, categories, net)
        self.train_config = self.stage1.Config.model_validate(self.net_meta["config"]) if self.net_meta else \
            getattr(self.net, "train_config", None) or self.stage1.Config()
        self.net.eval()

    def generate(self, image: np.ndarray, points: Points) -> PseudoLabel:
        return self([image], [points])[0]

    @torch.no_grad()
    def _masks(self, crops: torch.Tensor) -> torch.Tensor:
        """(K, 3, S, S) crops -> (K, h, w) probabilities, ``batch_objects`` at a time."""
        device = next(self.net.parameters()).device
        out = []
        for s in range(0, len(crops), self.config.batch_objects):
            logits = self.net(crops[s : s + self.config.batch_objects].to(device))
            out.append(torch.sigmoid(logits)[:, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 1, 1)

    def __call__(self, images: list[np.ndarray], points: list[Points]) -> list[PseudoLabel]:
        if len(images) != len(points):
            raise ValueError(f"{len(images)} images but {len(points)} point sets")
        parsed, crops, owners = [], [], []
        for i, (image, pts) in enumerate(zip(images, points)):
            h, w = image.shape[:2]
            groups, objects = extreme_objects(pts, self.categories, h, w, self.config.min_object_px)
            if not groups:
                raise ValueError("image has no points")
            ok = [o for o in objects if o.status == "ok"]
            part = crop_objects(image, ok, self.train_config) if ok else None
            parsed.append((groups, objects, part))
            if part is not None:
                crops.append(part["crops"])
                owners += [(i, k) for k in range(len(ok))]
        probs = self._masks(torch.cat(crops)) if crops else None
        by_image: dict[int, list[torch.Tensor]] = {}
        for j, (i, _) in enumerate(owners):
            by_image.setdefault(i, []).append(probs[j])
        return [self._assemble(images[i], points[i], *parsed[i], by_image.get(i, [])) for i in range(len(images))]

    def _assemble(self, image, points, groups, objects, part, probs) -> PseudoLabel:
        h, w = image.shape[:2]
        thr = self.config.mask_threshold
        counts: Counter = Counter()
        stack = np.zeros((len(objects), h, w), np.float32)
        ok_index = 0
        for k, o in enumerate(objects):
            if o.status == "no_points":
                continue
            if o.status != "ok":
                stack[k][box_mask(o, h, w)] = 1.0
                continue
            (rows, cols), patch = paste_probabilities(probs[ok_index], part["windows"][ok_index], h, w)
            ok_index += 1
            stack[k][rows, cols] = patch
            if self.config.clip_to_box:
                stack[k][~box_mask(o, h, w)] = 0.0
            if not (stack[k] >= thr).any():
                counts["empty_mask"] += 1
                stack[k][box_mask(o, h, w)] = 1.0
        if self.config.overlap == "smallest":
            masks = [stack[k] >= thr for k in range(len(objects))]
            assignment = paint_smallest_last(masks, objects, h, w)
        else:
            best = first_argmax(torch.from_numpy(stack), 0).numpy() if len(objects) else np.zeros((h, w), np.int64)
            labelled = stack.max(0) >= thr if len(objects) else np.zeros((h, w), bool)
            group_of = np.array([o.group for o in objects] or [-1])
            assignment = np.where(labelled, group_of[best], -1)
        assignment = fill_stuff(assignment, points, groups)
        diag = object_diagnostics(objects)
        diag["empty_mask"] = int(counts["empty_mask"])
        return assemble(assignment, groups, diag, margin_uncertainty(stack))

    @classmethod
    def summarize(cls, diagnostics: list[dict]) -> dict | None:
        return summarize_objects("exits: objects from extreme points", diagnostics, ("empty_mask",))

    def explain(self, image: np.ndarray, points: Points) -> np.ndarray | None:
        """The image with every object's mask probability in red (max over objects)."""
        h, w = image.shape[:2]
        _, objects = extreme_objects(points, self.categories, h, w, self.config.min_object_px)
        ok = [o for o in objects if o.status == "ok"]
        if not ok:
            return None
        part = crop_objects(image, ok, self.train_config)
        heat = np.zeros((h, w), np.float32)
        for p, win in zip(self._masks(part["crops"]), part["windows"]):
            (rows, cols), patch = paste_probabilities(p, win, h, w)
            heat[rows, cols] = np.maximum(heat[rows, cols], patch)
        out = image.astype(np.float32) * 0.5
        out[..., 0] += 127 * heat
        return np.clip(out, 0, 255).astype(np.uint8)
