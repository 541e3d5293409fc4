"""EPLD stage 1: the distance branch trained on the dataset's points through the one engine.

:class:`EPLDTrainable` reads index rows (``rows = "index"``): an
:class:`~pointseg.train.rows.IndexCollate` decodes each image and its valid
points, and :func:`~pointseg.generators.epld.batch.network_batch` resizes it
to ``input_size`` with its points scaled onto the network's grids. The loss is
Eq. 11 (:func:`~pointseg.generators.epld.losses.distance_loss`).

With ``freeze_backbone`` (default) the ImageNet backbone is a fixed feature
extractor: its maps are computed once per (image, flip) and cached on the
worker (``feature_cache`` entries), so a step costs only the FPN, the fusion
module and the ``L`` decoder layers.
"""

from __future__ import annotations

import numpy as np
import torch

from pointseg.data.record import Category, ImageRecord
from pointseg.generators.epld.batch import network_batch
from pointseg.generators.epld.config import EPLDTrainConfig
from pointseg.generators.epld.losses import distance_loss
from pointseg.generators.epld.model import EPLDNet
from pointseg.train.engine import Trainable, unwrap
from pointseg.train.rows import IndexCollate

__all__ = ["EPLDTrainable"]


class EPLDTrainable(Trainable):
    """The EPLD distance branch as a :class:`~pointseg.train.engine.Trainable` (module docstring).

    Class channel ``i`` (of ``E^cls`` and the classifier) is the ``i``-th id
    of ``sorted(categories)``; the checkpoint keeps the categories, so the
    generator maps its points the same way.
    """

    name = "epld"
    Config = EPLDTrainConfig
    rows = "index"

    def __init__(self, config: EPLDTrainConfig | dict | None, categories: dict[int, Category], context: dict | None = None):
        super().__init__(config, categories, context)
        self.category_ids = sorted(int(c) for c in categories)
        self.channel_of = {c: i for i, c in enumerate(self.category_ids)}
        self._features: dict[tuple[int, bool], list[torch.Tensor]] = {}

    def build(self, pretrained: bool = True) -> EPLDNet:
        return EPLDNet(self.config, self.category_ids, pretrained=pretrained and self.config.pretrained,
                       thing_ids=[c for c in self.category_ids if self.categories[c].isthing])

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        cfg = self.config
        net = unwrap(model)
        backbone = [p for p in net.backbone.parameters() if p.requires_grad]
        ids = {id(p) for p in backbone}
        rest = [p for p in net.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": rest}]
        if backbone:
            groups.append({"params": backbone, "lr": cfg.lr * cfg.backbone_lr_mult})
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def collate(self, train: bool = True) -> IndexCollate:
        collate = IndexCollate(self.categories, lambda records: self.make_batch(records, collate.epoch if train else None))
        return collate

    def make_batch(self, records: list[ImageRecord], epoch: int | None = None) -> dict:
        """Records -> :func:`network_batch` with the loss targets; ``epoch`` None: no augmentation."""
        cfg = self.config
        flips = [bool(cfg.hflip and epoch is not None
                      and np.random.default_rng([cfg.seed, epoch, r.image_id % (1 << 62)]).random() < 0.5)
                 for r in records]
        batch = network_batch([r.image for r in records], [r.points for r in records], self.categories,
                              self.channel_of, cfg.input_size, cfg.loss_stride, flips, lab=cfg.color_prior)
        batch["flips"] = flips
        return batch

    def _backbone_features(self, model: torch.nn.Module, batch: dict) -> list[torch.Tensor] | None:
        """The frozen backbone's maps of the batch, from the cache where possible; None: not cached."""
        cfg = self.config
        if not (cfg.freeze_backbone and cfg.feature_cache > 0):
            return None
        keys = [(int(i), bool(f)) for i, f in zip(batch["image_ids"], batch["flips"])]
        missing = [j for j, k in enumerate(keys) if k not in self._features]
        if missing:
            with torch.no_grad():
                fresh = unwrap(model).backbone_features(batch["image"][missing])
            for slot, j in enumerate(missing):
                feats = [f[slot : slot + 1] for f in fresh]
                if len(self._features) < cfg.feature_cache:
                    self._features[keys[j]] = feats
                else:  # cache full: use them for this step only
                    batch.setdefault("_uncached", {})[keys[j]] = feats
        extra = batch.pop("_uncached", {})
        per_image = [self._features.get(k) or extra[k] for k in keys]
        return [torch.cat([p[level] for p in per_image]) for level in range(len(per_image[0]))]

    def loss(self, model: torch.nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        features = self._backbone_features(model, batch)
        outputs = model(batch["image"], batch["point_masks"], batch["instance_valid"], batch["instance_class"],
                        features=features)
        return distance_loss(outputs, batch, self.config, step)
