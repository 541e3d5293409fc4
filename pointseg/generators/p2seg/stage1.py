"""P2Seg stage 1 on the engine's contract: the mutual-distillation network (MDM) trained on the points.

:class:`P2SegTrainable` trains :class:`~.network.P2SegNet` with
``L = 1.0 L_seg + 0.01 L_off + 1.0 L_I2S`` (Sec. 3.3, 4.1) on index rows
(``rows = "index"``, :class:`~pointseg.train.rows.IndexCollate`), batches of
``batch_size`` images resized to ``image_size`` squared.

**Rounds** (Sec. 3, "MDM is a recurrent learning module"). The
``steps`` are cut into ``rounds + 1`` equal parts:

* round 0 -- the labels come from S2I on the stage-1 semantic map, the pseudo
  labels of a training-free generator (``semantic_source``: PSPS or
  Point2Mask on low-level maps) or of a trained EPLD checkpoint, from the
  same points, standing in for the paper's SAM masks. They are made in the
  collate, on the data side.
* round r >= 1 -- at the start of the round the network is frozen as a
  teacher (the previous stage); each batch's labels are then the teacher's
  outputs: its I2S semantic map ``Â^{∘β} * C`` (or ``argmax C`` without I2S)
  -> S2I with the teacher's offsets -> class map, offsets and affinity
  targets. The teacher is saved with each checkpoint, so a resumed run
  continues the same round with the same labels.

The labelling params (:class:`~.config.P2SegConfig`) arrive as
``context["generator"]``. A training row whose image fails (unreadable, no
valid point) is skipped and counted by the collate before it reaches P2Seg; if the stage-1 generator fails on an image,
its semantic map is all background (a counted fallback, ``fallbacks``, and a
warning): Points First then gives every point its default box. An image with
no thing point is kept: all its pixels are background targets.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from pointseg.data.images import resize_square
from pointseg.data.record import ImageRecord
from pointseg.generators import build_generator
from pointseg.generators.p2seg.config import P2SegConfig, P2SegTrainConfig
from pointseg.generators.p2seg.i2s import affinity_targets, window_affinity_targets
from pointseg.generators.p2seg.losses import i2s_loss, offset_loss, point_loss, seg_loss
from pointseg.generators.p2seg.network import P2SegNet
from pointseg.generators.p2seg.targets import (
    ThingLayout,
    network_maps,
    s2i_targets,
    scale_points,
    semantic_from_label,
    thing_channels,
    thing_layout,
)
from pointseg.train.engine import RowCollate, Trainable, unwrap
from pointseg.train.rows import IndexCollate

__all__ = ["P2SegTrainable", "round_of"]

log = logging.getLogger("pointseg.train")


def round_of(step: int, steps: int, rounds: int) -> int:
    """The distillation round of (0-based) ``step`` when ``steps`` are cut into ``rounds + 1`` parts."""
    return min(rounds, step * (rounds + 1) // max(steps, 1))


class P2SegTrainable(Trainable):
    """Stage 1 of P2Seg (module docstring)."""

    name = "p2seg"
    Config = P2SegTrainConfig
    rows = "index"

    def __init__(self, config, categories, context=None):
        super().__init__(config, categories, context)
        self.params = P2SegConfig.model_validate(self.context.get("generator") or {})
        self.channel_of = thing_channels(categories, self.config.class_map)
        if not self.channel_of:
            raise ValueError("p2seg: the category table has no thing category; P2Seg labels instances")
        self.teacher: torch.nn.Module | None = None
        self.teacher_round = 0
        self._source = None
        self._collate: RowCollate | None = None
        self.fallbacks: Counter[str] = Counter()

    # ------------------------------------------------------------------ network
    def build(self, pretrained: bool = True) -> torch.nn.Module:
        cfg = self.config
        return P2SegNet(max(self.channel_of.values()) + 1, cfg.backbone, cfg.pretrained if pretrained else False,
                        cfg.width, cfg.embed_dim, cfg.affinity_grid, cfg.head_stride, cfg.affinity,
                        cfg.affinity_window, cfg.affinity_dilation)

    def optimizer(self, model) -> torch.optim.Optimizer:
        """AdamW; the backbone at ``backbone_lr_scale`` of the learning rate (0: frozen, not optimised)."""
        cfg, net = self.config, unwrap(model)
        backbone = set(map(id, net.backbone.parameters()))
        groups = [{"params": [q for q in net.parameters() if id(q) not in backbone]}]
        if cfg.backbone_lr_scale > 0:
            groups.append({"params": list(net.backbone.parameters()), "lr": cfg.lr * cfg.backbone_lr_scale})
        else:
            for q in net.backbone.parameters():
                q.requires_grad_(False)
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def round_of(self, step: int) -> int:
        return round_of(step, self.config.steps, self.params.rounds)

    # ------------------------------------------------------------------ batches
    def collate(self, train: bool = True) -> RowCollate:
        self._collate = IndexCollate(self.categories, self.make_batch)
        return self._collate

    def _box(self, height: int, width: int) -> tuple[tuple[int, int], int]:
        """Default box and min area of the config (original-image pixels) on the square input."""
        s = self.config.image_size
        sy, sx = s / height, s / width
        box = (max(1, round(self.params.default_box * sy)), max(1, round(self.params.default_box * sx)))
        return box, max(1, round(self.params.min_area * sy * sx))

    def _prepare(self, record: ImageRecord) -> tuple[np.ndarray, ThingLayout, tuple, dict | None]:
        """One record -> (input image, thing layout, (box, min_area), round-0 targets or None)."""
        s = self.config.image_size
        image = resize_square(record.image, s)
        points = scale_points(record.points, record.height, record.width, s, s)
        epoch = self._collate.epoch if self._collate is not None else 0
        if self.config.hflip and np.random.default_rng([self.config.seed, epoch, record.image_id]).random() < 0.5:
            image = np.ascontiguousarray(image[:, ::-1])
            points.xy[:, 0] = s - 1 - points.xy[:, 0]
        layout = thing_layout(points, self.categories, self.channel_of)
        box = self._box(record.height, record.width)
        targets = None
        if self.teacher_round == 0:
            targets, _ = s2i_targets(self._stage1_semantic(record.image_id, image, points), layout,
                                     self.params.priority, self.config.affinity_side, *box,
                                     components=self.params.components)
        return image, layout, box, targets

    def _stage1_semantic(self, image_id, image: np.ndarray, points) -> np.ndarray:
        """The stage-1 semantic map (channels) of one input; all background, counted, if the source fails."""
        if self._source is None:
            self._source = build_generator(self.params.semantic_source, self.params.semantic_params, self.categories)
        try:
            return semantic_from_label(self._source.generate(image, points), self.channel_of)
        except Exception as exc:  # noqa: BLE001 - a counted fallback, never a lost image
            self.fallbacks["stage1_semantic_failed"] += 1
            log.warning("p2seg: image %s: stage-1 semantic map (%s) failed (%s: %s); all background, the points "
                        "get default boxes", image_id, self.params.semantic_source, type(exc).__name__, exc)
            return np.zeros(image.shape[:2], np.int64)

    def make_batch(self, records: list[ImageRecord]) -> dict:
        """Records -> ``image`` (B, 3, S, S) in [0, 1], ``layouts``, ``boxes`` and, in round 0, ``targets``."""
        prepared = [self._prepare(r) for r in records]
        batch = {
            "image": torch.from_numpy(np.stack([p[0] for p in prepared])).permute(0, 3, 1, 2).float().div(255.0),
            "layouts": [p[1] for p in prepared],
            "boxes": [p[2] for p in prepared],
        }
        if all(p[3] is not None for p in prepared):
            batch["targets"] = _stack_targets([p[3] for p in prepared])
        return batch

    # ------------------------------------------------------------------ labels of rounds >= 1
    @torch.no_grad()
    def teacher_targets(self, batch: dict) -> dict[str, torch.Tensor]:
        """The batch's labels from the frozen previous-round network (module docstring)."""
        p, s = self.params, self.config.image_size
        device = batch["image"].device
        out = self.teacher(batch["image"])
        targets = []
        for i, (layout, box) in enumerate(zip(batch["layouts"], batch["boxes"])):
            present = [0] + sorted({int(c) for c in layout.group_class})
            prob, semantic, offsets = network_maps({k: v[i] for k, v in out.items()}, present, p, (s, s), s,
                                                   window=self.config.window)
            t, _ = s2i_targets(semantic, layout, p.priority, self.config.affinity_side, *box,
                               offsets=offsets if p.grouping == "offsets" else None,
                               class_prob=prob.cpu().numpy() if p.offset_weighting == "confidence" else None,
                               present=present, components=p.components)
            targets.append(t)
        return {k: v.to(device) for k, v in _stack_targets(targets).items()}

    # ------------------------------------------------------------------ loss
    def loss(self, model, batch, step):
        cfg, p = self.config, self.params
        if self.teacher_round > 0:
            targets = self.teacher_targets(batch)
        elif "targets" in batch:
            targets = batch["targets"]
        else:
            raise RuntimeError(f"p2seg: step {step} is in round 0 but its batch has no stage-1 targets")
        if cfg.backbone_lr_scale == 0:
            unwrap(model).backbone.eval()  # frozen: its BN statistics stay the ImageNet ones
        out = model(batch["image"])
        h = cfg.image_size // cfg.loss_stride
        o = cfg.loss_stride // 2  # the centre pixel of each loss cell
        cls_t = targets["cls"][:, o::cfg.loss_stride, o::cfg.loss_stride]
        off_t = targets["offsets"][:, :, o::cfg.loss_stride, o::cfg.loss_stride]
        w_t = targets["weight"][:, o::cfg.loss_stride, o::cfg.loss_stride]
        logits = F.interpolate(out["class_logits"], size=(h, h), mode="bilinear", align_corners=False)
        offsets = F.interpolate(out["offsets"], size=(h, h), mode="bilinear", align_corners=False)
        l_seg = seg_loss(logits, cls_t, cfg.hard_pixel_ratio)  # Eq. 4
        l_off = offset_loss(offsets, off_t, w_t)  # Eq. 3
        terms = {"seg": l_seg, "offset": l_off}
        total = cfg.seg_weight * l_seg + cfg.offset_weight * l_off  # L_S2I
        if cfg.point_weight > 0:
            yx = [torch.from_numpy(np.concatenate([lay.point_yx, lay.stuff_yx])).float() for lay in batch["layouts"]]
            lab = [torch.from_numpy(np.concatenate([lay.group_class, np.zeros(len(lay.stuff_yx), np.int64)]))
                   for lay in batch["layouts"]]
            l_pt = point_loss(out["class_logits"], yx, lab, (cfg.image_size, cfg.image_size))
            terms["point"] = l_pt
            total = total + cfg.point_weight * l_pt
        if p.i2s:
            if cfg.window is None:
                l_i2s = i2s_loss(out["affinity_logits"], affinity_targets(targets["grid"], p.background_affinity))
            else:  # Eq. 5 on the window pairs
                side = cfg.affinity_side
                a, valid = window_affinity_targets(targets["grid"].view(-1, side, side), *cfg.window,
                                                   background_affinity=p.background_affinity)
                l_i2s = i2s_loss(out["affinity_logits"], a, valid)  # Eq. 5
            terms["i2s"] = l_i2s
            total = total + cfg.affinity_weight * l_i2s
        return {"loss": total, **terms}

    # ------------------------------------------------------------------ rounds
    def start(self, model) -> None:
        if self.teacher is not None:  # restored on the CPU by load_state_dict
            self.teacher.to(next(model.parameters()).device)
        self._snapshot_if_new_round(model, 0)

    def after_step(self, model, step: int) -> None:
        self._snapshot_if_new_round(model, step)

    def _snapshot_if_new_round(self, model, step: int) -> None:
        r = self.round_of(step)
        if r > self.teacher_round:
            self.teacher = copy.deepcopy(unwrap(model)).eval()
            for q in self.teacher.parameters():
                q.requires_grad_(False)
            self.teacher_round = r

    def state_dict(self) -> dict:
        state: dict = {"teacher_round": self.teacher_round}
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.teacher_round = int(state.get("teacher_round", 0))
        if "teacher" in state:
            self.teacher = self.build(pretrained=False)
            self.teacher.load_state_dict(state["teacher"])
            self.teacher.eval()
            for q in self.teacher.parameters():
                q.requires_grad_(False)


def _stack_targets(targets: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([t[k] for t in targets])) for k in ("cls", "offsets", "weight", "grid")}
