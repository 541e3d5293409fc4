"""Collates and one optimisation step for the stage-2 models, with no Ray in sight.

A batch of shard rows arrives as Ray Data gives it, a dict of column name ->
numpy array (columns of notes/shard_schema.md plus either ``image`` with
encoded image bytes or ``file_name`` to read through fsspec); a list of row
dicts works too. A collate decodes, validates, augments and turns the rows
into model inputs::

    collate = PanopticCollate(categories, "efficientnet_lite0", AugmentConfig(crop_size=256), seed=0)
    for batch in loader:                      # plain PyTorch or Ray iter_torch_batches
        losses = train_step(model, collate(batch), optimizer)

Rows that fail validation (:class:`~pointseg.train.targets.BadShardRow`) are
logged, counted in ``collate.skipped`` / ``collate.skip_reasons`` and left out.

Augmentation randomness is drawn from ``default_rng([seed, epoch, image_id])``
per row, so a row's crop does not depend on batch composition or worker count;
call :meth:`set_epoch` each epoch.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from pointseg.models.backbones import normalization
from pointseg.models.instance import image_to_tensor, thing_categories
from pointseg.models.panoptic import category_table
from pointseg.train.augment import PAD_ID, AugmentConfig, augment
from pointseg.train.targets import BadShardRow, decode_label, instance_targets, panoptic_targets

log = logging.getLogger(__name__)


def iter_rows(batch: dict[str, Any] | list[dict]) -> Iterator[dict]:
    """Rows of a columnar batch (dict of equal-length arrays) or of a list of row dicts."""
    if isinstance(batch, (list, tuple)):
        yield from batch
        return
    if not batch:
        return
    lengths = {k: len(v) for k, v in batch.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"batch columns differ in length: {lengths}")
    n = next(iter(lengths.values()))
    for i in range(n):
        yield {k: v[i] for k, v in batch.items()}


def read_image(row: dict, storage_options: dict | None = None) -> np.ndarray:
    """``(H, W, 3) uint8`` RGB from the row's ``image`` bytes, else from ``file_name`` (fsspec URI)."""
    data = row.get("image")
    if isinstance(data, np.ndarray) and data.ndim == 3:
        return data.astype(np.uint8, copy=False)
    try:
        if data is None or len(data) == 0:
            import fsspec

            file_name = row.get("file_name")
            if not file_name:
                raise BadShardRow("image: no 'image' bytes and no 'file_name'", row.get("image_id"))
            with fsspec.open(str(file_name), "rb", **(storage_options or {})) as f:
                data = f.read()
        with Image.open(io.BytesIO(bytes(data))) as im:
            return np.asarray(im.convert("RGB"))
    except BadShardRow:
        raise
    except Exception as e:
        raise BadShardRow(f"image: cannot read {row.get('file_name', '')!r} ({type(e).__name__}: {e})", row.get("image_id")) from None


class _RowCollate:
    """Shared decoding/augmentation; subclasses turn prepared rows into model inputs."""

    def __init__(
        self,
        categories,
        augment_config: AugmentConfig | dict | None = None,
        seed: int = 0,
        train: bool = True,
        storage_options: dict | None = None,
    ):
        self.categories = category_table(categories)
        aug = augment_config if isinstance(augment_config, AugmentConfig) else AugmentConfig.model_validate(augment_config or {})
        if not train:  # evaluation: fit the longest side into the crop, pad, no flip
            aug = aug.model_copy(update={"scale_range": (1.0, 1.0), "hflip_prob": 0.0})
        self.augment_config = aug
        self.seed = int(seed)
        self.epoch = 0
        self.storage_options = storage_options
        self.skipped = 0
        self.skip_reasons: Counter[str] = Counter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def prepare(self, batch) -> list[tuple[int, np.ndarray, np.ndarray, list[dict]]]:
        """``(image_id, image (S, S, 3) uint8, id_map (S, S) int32, segments_info)`` per good row."""
        out = []
        for row in iter_rows(batch):
            image_id = int(np.asarray(row.get("image_id", -1)).item())
            try:
                id_map, info = decode_label(row)
                image = read_image(row, self.storage_options)
                if image.shape[:2] != id_map.shape:
                    raise BadShardRow(f"image: size {image.shape[:2]} differs from label_png {id_map.shape}", image_id)
                rng = np.random.default_rng([self.seed, self.epoch, image_id & 0xFFFFFFFF])
                image, id_map = augment(image, id_map, rng, self.augment_config)
            except BadShardRow as e:
                self.skipped += 1
                self.skip_reasons[e.reason.split(":")[0]] += 1
                log.warning("skipping shard row: %s", e)
                continue
            out.append((image_id, image, id_map, info))
        return out


class PanopticCollate(_RowCollate):
    """Rows -> Mask2Former inputs.

    Returns a dict: ``pixel_values (B, 3, S, S) float32`` normalised for
    ``backbone``; ``pixel_mask (B, S, S) int64`` (0 on padding);
    ``mask_labels`` list of ``(N_i, S, S) float32``; ``class_labels`` list of
    ``(N_i,) int64`` contiguous class indices; ``image_ids (B,) int64``.
    """

    def __init__(self, categories, backbone: str = "efficientnet_lite0", augment_config=None, seed: int = 0, **kw):
        super().__init__(categories, augment_config, seed, **kw)
        self.class_index = {c.id: i for i, c in enumerate(self.categories)}
        mean, std = normalization(backbone)
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, batch) -> dict[str, Any]:
        s = self.augment_config.crop_size
        pixel_values, pixel_mask, mask_labels, class_labels, ids = [], [], [], [], []
        for image_id, image, id_map, info in self.prepare(batch):
            try:
                t = panoptic_targets(id_map, info, self.class_index)
            except BadShardRow as e:
                self.skipped += 1
                self.skip_reasons["segments_info"] += 1
                log.warning("skipping shard row: image_id %s: %s", image_id, e)
                continue
            pixel_values.append((image_to_tensor(image) - self.mean) / self.std)
            pixel_mask.append(torch.from_numpy((id_map != PAD_ID).astype(np.int64)))
            mask_labels.append(t["mask_labels"])
            class_labels.append(t["class_labels"])
            ids.append(image_id)
        return {
            "pixel_values": torch.stack(pixel_values) if pixel_values else torch.zeros((0, 3, s, s)),
            "pixel_mask": torch.stack(pixel_mask) if pixel_mask else torch.zeros((0, s, s), dtype=torch.int64),
            "mask_labels": mask_labels,
            "class_labels": class_labels,
            "image_ids": torch.as_tensor(ids, dtype=torch.int64),
        }


class InstanceCollate(_RowCollate):
    """Rows -> Mask R-CNN inputs.

    Returns a dict: ``images`` list of ``(3, S, S) float32`` in ``[0, 1]``;
    ``targets`` list of ``{boxes, labels, masks}`` (labels ``1..T``);
    ``image_ids (B,) int64``.
    """

    def __init__(self, categories, augment_config=None, seed: int = 0, **kw):
        super().__init__(categories, augment_config, seed, **kw)
        self.thing_label = {c.id: k + 1 for k, c in enumerate(thing_categories(self.categories))}

    def __call__(self, batch) -> dict[str, Any]:
        images, targets, ids = [], [], []
        for image_id, image, id_map, info in self.prepare(batch):
            images.append(image_to_tensor(image))
            targets.append(instance_targets(id_map, info, self.thing_label))
            ids.append(image_id)
        return {"images": images, "targets": targets, "image_ids": torch.as_tensor(ids, dtype=torch.int64)}


def panoptic_losses(model, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Mask2Former's weighted losses (``loss_cross_entropy``, ``loss_mask``, ``loss_dice``,
    and ``*_i`` for the auxiliary decoder layers) and their sum ``loss``."""
    out = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], output_auxiliary_logits=True)
    losses = model.get_loss_dict(
        masks_queries_logits=out.masks_queries_logits,
        class_queries_logits=out.class_queries_logits,
        mask_labels=batch["mask_labels"],
        class_labels=batch["class_labels"],
        auxiliary_predictions=out.auxiliary_logits,
    )
    losses["loss"] = sum(losses.values())
    return losses


def instance_losses(model, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Mask R-CNN's losses (``loss_classifier, loss_box_reg, loss_mask, loss_objectness,
    loss_rpn_box_reg``) and their sum ``loss``."""
    losses = dict(model(batch["images"], batch["targets"]))
    losses["loss"] = sum(losses.values())
    return losses


def train_step(model, batch: dict[str, Any], optimizer, max_grad_norm: float | None = None) -> dict[str, float]:
    """One optimisation step on a collated batch; returns the losses as floats.

    The model kind follows from the batch: ``pixel_values`` -> Mask2Former
    (:class:`PanopticCollate`), ``targets`` -> Mask R-CNN
    (:class:`InstanceCollate`). An empty batch (every row skipped) takes no
    step and returns ``{}``.
    """
    if "pixel_values" in batch:
        if len(batch["pixel_values"]) == 0:
            return {}
        compute = panoptic_losses
    elif "targets" in batch:
        if len(batch["targets"]) == 0:
            return {}
        compute = instance_losses
    else:
        raise ValueError(f"batch has neither 'pixel_values' nor 'targets' (keys {sorted(batch)})")
    model.train()
    losses = compute(model, batch)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}
