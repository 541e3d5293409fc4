"""Stage 1 of ``maps="learned"``: the MapNet trained on the points (Point2Mask Sec. 3.4.1).

The engine's :class:`~pointseg.train.engine.Trainable` for Point2Mask::

    L = L_partial + alpha_1 L_sem^LAB + alpha_2 L_sem^RGB + L_bou     (Eq. 5-8, without L_full)

(:func:`pointseg.losses.point2mask_loss`). ``L_bou`` (Eq. 6-7) needs the
*current* pseudo masks: every ``pseudo_every`` steps (from ``pseudo_start`` on)
an image's pseudo labels are recomputed by Point2Mask itself
(:func:`~pointseg.generators.point2mask.assign.label_image`) on the network's
own current maps (no-grad forward, eval mode), with the run's labelling params
(``context["generator"]``), and cached until they are ``pseudo_every`` steps
old.

Batches (:func:`collate_records`): images resized to ``image_size`` squared
(aspect not kept; the generator runs the network at that size too), points
scaled onto them, class indices of ``sorted(categories)``.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from pointseg.data.images import resize_square
from pointseg.data.record import ImageRecord, Points
from pointseg.generators.point2mask.assign import label_image
from pointseg.generators.point2mask.config import Point2MaskConfig, Point2MaskTrainConfig
from pointseg.generators.point2mask.maps import learned_maps
from pointseg.losses.point2mask import point2mask_loss
from pointseg.models.map_net import MapNet
from pointseg.train.engine import Trainable
from pointseg.train.rows import IndexCollate

#: Labelling params that concern loading a network, not the pseudo labels of training.
_LOADING_KEYS = ("maps", "checkpoint", "device", "input_max_side")


def resize_record(record: ImageRecord, size: int) -> tuple[np.ndarray, Points]:
    """Image resized to ``size x size`` uint8 and its points scaled onto it."""
    h, w = record.image.shape[:2]
    img = resize_square(record.image, size)
    pts = record.points
    xy = (pts.xy + 0.5) * np.array([size / w, size / h]) - 0.5
    return np.ascontiguousarray(img), Points(xy, pts.segment, pts.category_id)


def collate_records(records: list[ImageRecord], category_ids: list[int], size: int) -> dict:
    """A training batch from records with decoded images and points.

    Returns ``image`` (B, 3, S, S) float in [0, 1]; ``point_yx`` B tensors
    (P_b, 2) long; ``point_labels`` B tensors (P_b,) long channel indices
    (``category_ids.index``); ``images_uint8`` (list of (S, S, 3)) and
    ``points`` (list of scaled :class:`Points`) for the pseudo labels.
    """
    channel = {c: i for i, c in enumerate(category_ids)}
    imgs, yx, labels, pts_list = [], [], [], []
    for r in records:
        img, pts = resize_record(r, size)
        unknown = sorted({int(c) for c in pts.category_id if int(c) not in channel})
        if unknown:
            raise ValueError(f"image {r.image_id}: points.category_id {unknown} not among the {len(channel)} categories")
        imgs.append(img)
        pts_list.append(pts)
        yx.append(torch.from_numpy(pts.pixels(size, size)))
        labels.append(torch.tensor([channel[int(c)] for c in pts.category_id], dtype=torch.long))
    image = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div(255.0)
    return {"image": image, "point_yx": yx, "point_labels": labels, "images_uint8": imgs, "points": pts_list}


class PseudoLabelCache:
    """Pseudo labels ``(pseudo_ids, thing_map)`` per image id, recomputed when ``every`` steps old."""

    def __init__(self, every: int):
        self.every = every
        self.entries: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
        self.refreshes = 0

    def stale(self, keys: list[int], step: int) -> list[int]:
        return [i for i, k in enumerate(keys) if k not in self.entries or step - self.entries[k][0] >= self.every]

    def put(self, key: int, step: int, ids: np.ndarray, things: np.ndarray) -> None:
        self.entries[key] = (step, ids, things)
        self.refreshes += 1

    def stack(self, keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(np.stack([self.entries[k][1] for k in keys])),
                torch.from_numpy(np.stack([self.entries[k][2] for k in keys])))


class MapNetTrainable(Trainable):
    """Point2Mask's stage 1 (module docstring): MapNet, index-row batches, the map losses."""

    name = "point2mask_maps"
    Config = Point2MaskTrainConfig
    rows = "index"

    def __init__(self, config, categories, context=None):
        super().__init__(config, categories, context)
        self.category_ids = sorted(int(c) for c in categories)
        params = {k: v for k, v in dict(self.context.get("generator") or {}).items() if k not in _LOADING_KEYS}
        self.label_config = Point2MaskConfig.model_validate({**params, "maps": "learned"})
        self.cache = PseudoLabelCache(self.config.pseudo_every)
        self.net: torch.nn.Module | None = None

    def build(self, pretrained: bool = True) -> torch.nn.Module:
        cfg = self.config
        return MapNet(len(self.category_ids), backbone=cfg.backbone, pretrained=cfg.pretrained and pretrained,
                      width=cfg.width)

    def collate(self, train: bool = True) -> IndexCollate:
        return IndexCollate(self.categories, partial(collate_records, category_ids=self.category_ids,
                                                     size=self.config.image_size))

    def start(self, model: torch.nn.Module) -> None:
        self.net = model

    @torch.no_grad()
    def pseudo_labels(self, batch: dict, idx: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(pseudo_ids, thing_map)`` (S, S) of batch items ``idx`` from the current maps."""
        net = self.net
        was = net.training
        net.eval()
        out = net(batch["image"][idx])
        net.train(was)
        sem = out["sem_logits"].softmax(1).cpu().double().numpy()
        bnd = out["boundary"][:, 0].cpu().double().numpy()
        cfg = self.label_config
        res = []
        for j, i in enumerate(idx):
            maps = partial(lambda im, size, present, o: learned_maps(
                im, size, o, self.category_ids, present, cfg.semantic_classes, cfg.boundary_maps, cfg.blur_sigma,
                cfg.feature_weight), o=(sem[j], bnd[j]))
            lab = label_image(batch["images_uint8"][i], batch["points"][i], cfg, self.categories, maps)
            things = np.zeros(lab.id_map.shape, bool)
            for s in lab.segments_info:
                if s["isthing"]:
                    things |= lab.id_map == s["id"]
            res.append((lab.id_map.astype(np.int64), things))
        return res

    def loss(self, model: torch.nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        cfg = self.config
        if cfg.loss.use_boundary and step >= cfg.pseudo_start:
            keys = [int(k) for k in batch["image_ids"]]
            stale = self.cache.stale(keys, step)
            if stale:
                for i, (ids, things) in zip(stale, self.pseudo_labels(batch, stale)):
                    self.cache.put(keys[i], step, ids, things)
            batch["pseudo_ids"], batch["thing_map"] = self.cache.stack(keys)
        total, terms = point2mask_loss(model(batch["image"]), batch, cfg.loss)
        return {"loss": total, **{f"loss_{k}": v for k, v in terms.items()}}

    def progress(self) -> dict:
        return {"pseudo_refreshes": self.cache.refreshes}


__all__ = ["MapNetTrainable", "PseudoLabelCache", "collate_records", "resize_record"]
