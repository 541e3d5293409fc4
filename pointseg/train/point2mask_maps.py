"""Training the Point2Mask map network (stage 1) in plain PyTorch.

Point2Mask (Sec. 3.4.1, Eq. 5-8 without ``L_full``) learns the semantic map
``P^s`` and the high-level boundary map ``P^b_high`` of a
:class:`~pointseg.models.map_net.MapNet` from points only::

    L = L_partial + alpha_1 L_sem^LAB + alpha_2 L_sem^RGB + L_bou

``L_bou`` (Eq. 6-7) needs the *current* pseudo masks: every ``pseudo_every``
steps (from step ``pseudo_start`` on) an image's pseudo labels are recomputed
by :class:`~pointseg.generators.point2mask.Point2MaskGenerator` on the
network's own current maps (no-grad forward, ``eval`` mode) and cached until
they are ``pseudo_every`` steps old.

Pieces, so that a Ray Train worker loop can reuse them:

* :func:`collate_records` -- records -> a batch dict (images resized to a
  square ``image_size``, points scaled onto it);
* :func:`train_step` -- forward, :func:`pointseg.losses.point2mask_loss`,
  backward, optimiser step: one function, no state;
* :func:`train_map_net` -- the loop: batches, pseudo-label refresh, steps,
  checkpoint ``{state_dict, config, categories, step}``;
* :func:`load_map_net` -- ``(MapNet in eval mode, meta)`` from a checkpoint.

Images are resized to ``image_size x image_size`` (aspect not kept) for
training and for inference in the generator, so the network sees the same
geometry in both.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from pointseg.data.record import Category, ImageRecord, Points
from pointseg.losses.point2mask import Point2MaskLossConfig, point2mask_loss
from pointseg.models.map_net import MapNet

__all__ = [
    "MapTrainConfig",
    "collate_records",
    "train_step",
    "train_map_net",
    "load_map_net",
    "save_map_net",
]

log = logging.getLogger(__name__)


class MapTrainConfig(BaseModel):
    """Hyper-parameters of map-network training (defaults sized for a CPU)."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = Field("efficientnet_lite0", description="efficientnet_lite0 | mobilenet_v2")
    pretrained: bool = Field(True, description="offline ImageNet weights (False: random init, explicit)")
    width: int = Field(64, ge=8, description="MapNet neck / decoder channels")
    image_size: int = Field(256, ge=32, description="square training (and inference) size")
    batch_size: int = Field(2, ge=1)
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate (paper: 1e-4 VOC, 2e-4 COCO)")
    weight_decay: float = Field(0.05, ge=0)
    max_grad_norm: float | None = Field(5.0, gt=0)
    pseudo_every: int = Field(20, ge=1, description="K: recompute an image's pseudo labels when K steps old")
    pseudo_start: int = Field(20, ge=0, description="first step with L_bou (semantic map warm-up)")
    loss: Point2MaskLossConfig = Field(default_factory=Point2MaskLossConfig)
    generator: dict[str, Any] = Field(default_factory=dict, description="Point2Mask generator params for the pseudo labels")
    seed: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)


# ----------------------------------------------------------------------------- batches


def _resize_record(record: ImageRecord, size: int) -> tuple[np.ndarray, Points]:
    """Image resized to ``size x size`` uint8 and its points scaled onto it."""
    if record.image is None:
        raise ValueError(f"image {record.image_id}: record has no decoded image (load_images=True)")
    h, w = record.image.shape[:2]
    img = cv2.resize(record.image, (size, size), interpolation=cv2.INTER_AREA) if (h, w) != (size, size) else record.image
    pts = record.points
    xy = (pts.xy + 0.5) * np.array([size / w, size / h]) - 0.5
    return np.ascontiguousarray(img), Points(xy, pts.segment, pts.category_id)


def collate_records(records: list[ImageRecord], category_ids: list[int], size: int) -> dict:
    """A training batch from records with decoded images and points.

    Returns ``image`` (B, 3, S, S) float in [0, 1]; ``point_yx`` B tensors
    (P_b, 2) long; ``point_labels`` B tensors (P_b,) long channel indices
    (``category_ids.index``); ``images_uint8`` (list of (S, S, 3)), ``points``
    (list of scaled :class:`Points`) and ``image_ids`` for the pseudo labels.
    """
    channel = {c: i for i, c in enumerate(category_ids)}
    imgs, yx, labels, pts_list = [], [], [], []
    for r in records:
        img, pts = _resize_record(r, size)
        unknown = sorted({int(c) for c in pts.category_id if int(c) not in channel})
        if unknown:
            raise ValueError(f"image {r.image_id}: points.category_id {unknown} not among the {len(channel)} categories")
        imgs.append(img)
        pts_list.append(pts)
        yx.append(torch.from_numpy(pts.pixels(size, size)))
        labels.append(torch.tensor([channel[int(c)] for c in pts.category_id], dtype=torch.long))
    image = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div(255.0)
    return {
        "image": image,
        "point_yx": yx,
        "point_labels": labels,
        "images_uint8": imgs,
        "points": pts_list,
        "image_ids": [r.image_id for r in records],
    }


# ----------------------------------------------------------------------------- one step


def train_step(model: MapNet, batch: dict, optimizer: torch.optim.Optimizer,
               loss_cfg: Point2MaskLossConfig | None = None, max_grad_norm: float | None = None) -> dict[str, float]:
    """One optimisation step on ``batch`` (see :func:`pointseg.losses.point2mask_loss`).

    ``batch`` holds ``image``, ``point_yx``, ``point_labels`` and, when
    ``L_bou`` should be on, ``pseudo_ids`` (B, S, S) long and ``thing_map``
    (B, S, S) bool. Returns the total and the unweighted terms as floats.
    Stateless: a Ray Train worker loop calls it as is.
    """
    model.train()
    outputs = model(batch["image"])
    total, terms = point2mask_loss(outputs, batch, loss_cfg)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    out = {k: float(v) for k, v in terms.items()}
    out["total"] = float(total.detach())
    return out


# ----------------------------------------------------------------------------- pseudo labels


@torch.no_grad()
def _pseudo_labels(model: MapNet, generator, batch: dict, idx: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(pseudo_ids, thing_map)`` (S, S) for batch items ``idx`` from the current maps."""
    was = model.training
    model.eval()
    out = model(batch["image"][idx])
    model.train(was)
    sem = out["sem_logits"].softmax(1).double().numpy()
    bnd = out["boundary"][:, 0].double().numpy()
    res = []
    for j, i in enumerate(idx):
        lab = generator.generate(batch["images_uint8"][i], batch["points"][i], net_maps=(sem[j], bnd[j]))
        things = np.zeros(lab.id_map.shape, bool)
        for s in lab.segments_info:
            if s["isthing"]:
                things |= lab.id_map == s["id"]
        res.append((lab.id_map.astype(np.int64), things))
    return res


# ----------------------------------------------------------------------------- the loop


def _batches(records: list[ImageRecord], batch_size: int, seed: int):
    """Endless seeded shuffled batches of indices into ``records``."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(records))
        for s in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield [int(i) for i in order[s : s + batch_size]]


def save_map_net(path: str | Path, model: MapNet, cfg: MapTrainConfig, category_ids: list[int], step: int) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(
        {
            "state_dict": model.state_dict(),
            "config": {**cfg.model_dump(), "num_classes": len(category_ids)},
            "categories": list(category_ids),
            "step": int(step),
        },
        tmp,
    )
    tmp.replace(path)  # a crash never leaves a half-written checkpoint


def load_map_net(path: str | Path, device: str = "cpu") -> tuple[MapNet, dict]:
    """``(MapNet in eval mode, {config, categories, step})`` from :func:`save_map_net`'s file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"MapNet checkpoint not found: {path}")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    for key in ("state_dict", "config", "categories"):
        if key not in ckpt:
            raise ValueError(f"{path}: not a MapNet checkpoint (missing {key!r})")
    cfg = ckpt["config"]
    net = MapNet(int(cfg["num_classes"]), backbone=cfg["backbone"], pretrained=False, width=int(cfg["width"]))
    net.load_state_dict(ckpt["state_dict"])
    net.to(device).eval()
    return net, {"config": cfg, "categories": list(ckpt["categories"]), "step": int(ckpt.get("step", 0))}


def train_map_net(
    records_or_loader: Iterable[ImageRecord] | list[ImageRecord],
    categories: dict[int, Category],
    cfg: MapTrainConfig | dict | None = None,
    steps: int = 100,
    checkpoint_path: str | Path | None = None,
    resume: bool = True,
) -> dict:
    """Train a MapNet with the Point2Mask losses; save ``checkpoint_path``.

    Parameters
    ----------
    records_or_loader : records with decoded ``image`` and ``points`` (records
        without points are skipped), or an iterable of ready batch dicts (from
        :func:`collate_records` or a Ray Data loader with the same keys),
        cycled until ``steps``.
    categories : the label space; channel ``i`` of ``P^s`` is the ``i``-th
        id of ``sorted(categories)``.
    cfg : :class:`MapTrainConfig` or a dict of its fields.
    steps : optimisation steps in total (a resumed run continues up to it).
    checkpoint_path : where the checkpoint goes (written at the end and every
        ``max(steps // 4, 1)`` steps); with ``resume`` an existing one is
        loaded and training continues from its step.

    Returns
    -------
    dict with ``steps``, ``seconds``, ``history`` (per-step loss terms),
    ``pseudo_refreshes`` and ``checkpoint``.
    """
    cfg = cfg if isinstance(cfg, MapTrainConfig) else MapTrainConfig.model_validate(cfg or {})
    from pointseg.generators.point2mask import Point2MaskGenerator

    torch.manual_seed(cfg.seed)
    category_ids = sorted(int(c) for c in categories)
    model = MapNet(len(category_ids), backbone=cfg.backbone, pretrained=cfg.pretrained, width=cfg.width)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if checkpoint_path is not None and resume and Path(checkpoint_path).exists():
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if list(ckpt["categories"]) != category_ids:
            raise ValueError(f"{checkpoint_path}: checkpoint categories differ from the training categories")
        model.load_state_dict(ckpt["state_dict"])
        start = int(ckpt.get("step", 0))
        log.info("resuming map-net training from step %d", start)
    gen_params = {"maps": "learned", **cfg.generator}
    generator = Point2MaskGenerator(gen_params, categories, net=model, net_categories=category_ids)

    items = list(records_or_loader)
    from_records = bool(items) and isinstance(items[0], ImageRecord)
    if from_records:
        items = [r for r in items if len(r.points)]
        if not items:
            raise ValueError("train_map_net: no record has points")
        batch_ids = _batches(items, min(cfg.batch_size, len(items)), cfg.seed)
    elif not items:
        raise ValueError("train_map_net: no training data")
    cache: dict[Any, tuple[int, np.ndarray, np.ndarray]] = {}
    history, refreshes = [], 0
    t0 = time.perf_counter()
    save_every = max(steps // 4, 1)
    for step in range(start, steps):
        if from_records:
            batch = collate_records([items[i] for i in next(batch_ids)], category_ids, cfg.image_size)
        else:
            batch = dict(items[step % len(items)])
        if cfg.loss.use_boundary and step >= cfg.pseudo_start and "points" in batch:
            keys = batch.get("image_ids", list(range(len(batch["points"]))))
            stale = [i for i, key in enumerate(keys) if key not in cache or step - cache[key][0] >= cfg.pseudo_every]
            if stale:
                for i, (ids, things) in zip(stale, _pseudo_labels(model, generator, batch, stale)):
                    cache[keys[i]] = (step, ids, things)
                refreshes += len(stale)
            batch["pseudo_ids"] = torch.from_numpy(np.stack([cache[k][1] for k in keys]))
            batch["thing_map"] = torch.from_numpy(np.stack([cache[k][2] for k in keys]))
        terms = train_step(model, batch, optimizer, cfg.loss, cfg.max_grad_norm)
        history.append(terms)
        if (step + 1) % cfg.log_every == 0:
            log.info("step %d/%d %s (%.1f s)", step + 1, steps, {k: round(v, 4) for k, v in terms.items()},
                     time.perf_counter() - t0)
        if checkpoint_path is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
            save_map_net(checkpoint_path, model, cfg, category_ids, step + 1)
    model.eval()
    return {
        "steps": steps,
        "start_step": start,
        "seconds": time.perf_counter() - t0,
        "history": history,
        "pseudo_refreshes": refreshes,
        "checkpoint": str(checkpoint_path) if checkpoint_path is not None else None,
        "model": model,
    }
