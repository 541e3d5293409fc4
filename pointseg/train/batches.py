"""Stage-2 batches and losses: shard rows -> Mask2Former / Mask R-CNN inputs, with no Ray in sight.

A batch of shard rows arrives as Ray Data gives it, a dict of column name ->
numpy array (the shard columns of README "Output layout", plus either ``image``
with encoded image bytes or ``file_name`` to read through fsspec); a list of
row dicts works too. A collate decodes, validates, augments and turns the rows
into model inputs; the losses are what :mod:`pointseg.train.stage2`'s
trainables hand to the engine::

    collate = PanopticCollate(categories, "efficientnet_lite0", AugmentConfig(crop_size=256), seed=0)
    losses = panoptic_losses(model, collate(rows))

Images are decoded by :func:`pointseg.data.images.read_image_as_annotated`, the
same decoder and EXIF rule as the labelling stage. Rows that fail validation
(:class:`~pointseg.train.targets.BadShardRow`) are logged, counted in
``collate.skipped`` / ``collate.skip_reasons`` and left out.

Augmentation randomness is drawn from ``default_rng([seed, epoch, image_id])``
per row, so a row's crop does not depend on batch composition or worker count;
call :meth:`set_epoch` each epoch.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from pointseg.data.images import decode_image_bytes, read_image_as_annotated
from pointseg.models.backbones import normalization
from pointseg.models.instance import image_to_tensor, thing_categories
from pointseg.models.panoptic import category_table
from pointseg.train.augment import PAD_ID, AugmentConfig, augment
from pointseg.train.engine import RowCollate, iter_rows, unwrap
from pointseg.train.targets import BadShardRow, decode_label, instance_targets, panoptic_targets

log = logging.getLogger(__name__)


def row_image(row: dict) -> np.ndarray:
    """``(H, W, 3) uint8`` RGB of a row: its ``image`` array or encoded bytes, else ``file_name``
    (any fsspec URI) in the pixel grid of the row's ``height`` x ``width``."""
    data = row.get("image")
    if isinstance(data, np.ndarray) and data.ndim == 3:
        return data.astype(np.uint8, copy=False)
    try:
        if data is not None and len(data) > 0:
            return decode_image_bytes(bytes(data), str(row.get("file_name", "<image bytes>")))
        file_name = row.get("file_name")
        if not file_name:
            raise BadShardRow("image: no 'image' bytes and no 'file_name'", row.get("image_id"))
        return read_image_as_annotated(str(file_name), int(row.get("height", 0) or 0), int(row.get("width", 0) or 0))
    except BadShardRow:
        raise
    except Exception as e:
        raise BadShardRow(f"image: cannot read {row.get('file_name', '')!r} ({type(e).__name__}: {e})",
                          row.get("image_id")) from None


class _RowCollate(RowCollate):
    """Shared decoding/augmentation; subclasses turn prepared rows into model inputs."""

    def __init__(
        self,
        categories,
        augment_config: AugmentConfig | dict | None = None,
        seed: int = 0,
        train: bool = True,
    ):
        super().__init__()
        self.categories = category_table(categories)
        aug = augment_config if isinstance(augment_config, AugmentConfig) else AugmentConfig.model_validate(augment_config or {})
        if not train:  # evaluation: fit the longest side into the crop, pad, no flip
            aug = aug.model_copy(update={"scale_range": (1.0, 1.0), "hflip_prob": 0.0})
        self.augment_config = aug
        self.seed = int(seed)

    def prepare(self, batch) -> list[tuple[int, np.ndarray, np.ndarray, list[dict]]]:
        """``(image_id, image (S, S, 3) uint8, id_map (S, S) int32, segments_info)`` per good row."""
        out = []
        for row in iter_rows(batch):
            image_id = int(np.asarray(row.get("image_id", -1)).item())
            try:
                id_map, info = decode_label(row)
                image = row_image(row)
                if image.shape[:2] != id_map.shape:
                    raise BadShardRow(f"image: size {image.shape[:2]} differs from label_png {id_map.shape}", image_id)
                rng = np.random.default_rng([self.seed, self.epoch, image_id & 0xFFFFFFFF])
                image, id_map = augment(image, id_map, rng, self.augment_config)
            except BadShardRow as e:
                self.skip(image_id, e.reason)
                continue
            out.append((image_id, image, id_map, info))
        return out


class PanopticCollate(_RowCollate):
    """Rows -> Mask2Former inputs.

    Returns a dict: ``pixel_values (B, 3, S, S) float32`` normalised for
    ``backbone``; ``pixel_mask (B, S, S) int64`` (0 on padding);
    ``mask_labels`` list of ``(N_i, S, S) float32``; ``class_labels`` list of
    ``(N_i,) int64`` contiguous class indices; ``image_ids`` (list of int).
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
                self.skip(image_id, f"segments_info: {e.reason}")
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
            "image_ids": ids,
        }


class InstanceCollate(_RowCollate):
    """Rows -> Mask R-CNN inputs.

    Returns a dict: ``images`` list of ``(3, S, S) float32`` in ``[0, 1]``;
    ``targets`` list of ``{boxes, labels, masks}`` (labels ``1..T``);
    ``image_ids`` (list of int).
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
        return {"images": images, "targets": targets, "image_ids": ids}


def panoptic_losses(model, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Mask2Former's weighted losses (``loss_cross_entropy``, ``loss_mask``, ``loss_dice``,
    and ``*_i`` for the auxiliary decoder layers) and their sum ``loss``.

    ``model`` may be DDP-wrapped: the forward pass goes through the wrapper
    (gradient hooks), ``get_loss_dict`` comes from the module."""
    out = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], output_auxiliary_logits=True)
    losses = unwrap(model).get_loss_dict(
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
