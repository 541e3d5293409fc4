"""The Point2Mask map network: semantic map ``P^s`` and high-level boundary map ``P^b_high``.

Point2Mask (Sec. 3.3.1) predicts two task-oriented maps from a shared
backbone and neck; the transport costs (Eq. 2-3) are computed on them. This
is a CPU-sized version:

* backbone: timm ``tf_efficientnet_lite0`` (or ``mobilenetv2_100``), features
  at strides 4/8/16/32 (:func:`pointseg.models.backbones.build_timm_backbone`);
* neck: 1x1 lateral convolutions to ``width`` channels (FPN-lite);
* semantic decoder: top-down sum of the laterals, a 3x3 conv + BN + ReLU at
  stride 4 and a 1x1 classifier: ``C`` logits ``P^s``. (The paper uses a
  transformer decoder with one query per class; an FPN head is the small
  stand-in.)
* boundary decoder, as the paper describes it: the multi-level neck features
  are brought to stride 4 and summed, then two 1x1 convolutions with a ReLU
  between them give one channel, and a sigmoid gives ``P^b_high``. As in the
  official code the boundary decoder reads detached neck features by default,
  so ``L_bou`` trains only the decoder (``detach_boundary=False`` changes that).

Both maps are upsampled (bilinear) to the input size; the boundary logits are
upsampled before the sigmoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pointseg.models.backbones import build_timm_backbone, normalization

__all__ = ["MapNet"]


class MapNet(nn.Module):
    """Backbone + FPN-lite semantic decoder + Point2Mask boundary decoder.

    Parameters
    ----------
    num_classes : number of semantic classes ``C`` (things and stuff).
    backbone : ``"efficientnet_lite0"`` (mean/std 0.5) or ``"mobilenet_v2"`` (ImageNet mean/std).
    pretrained : ``True`` for the offline ImageNet weights, a ``str`` checkpoint
        path, or ``False`` for random initialisation.
    width : channels of the neck and decoders.
    detach_boundary : feed the boundary decoder detached neck features.

    ``forward(x)`` takes ``x`` (B, 3, H, W) float RGB in ``[0, 1]`` (normalised
    inside) and returns ``dict(sem_logits=(B, C, H, W), boundary=(B, 1, H, W)
    in [0, 1], boundary_logits=(B, 1, H, W))``.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "efficientnet_lite0",
        pretrained: bool | str = True,
        width: int = 64,
        detach_boundary: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"MapNet: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.detach_boundary = detach_boundary
        self.backbone, channels = build_timm_backbone(backbone, pretrained, out_indices=(1, 2, 3, 4))
        mean, std = normalization(backbone)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.sem_conv = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.sem_classifier = nn.Conv2d(width, num_classes, 1)
        # Point2Mask Sec. 3.3.1: sum of multi-level features, 1x1 conv, ReLU, 1x1 conv, sigmoid.
        self.boundary_head = nn.Sequential(nn.Conv2d(width, width, 1), nn.ReLU(inplace=True), nn.Conv2d(width, 1, 1))

    def neck(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Lateral features at strides 4/8/16/32, each (B, width, H/s, W/s)."""
        feats = self.backbone((x - self.mean) / self.std)
        return [lat(f) for lat, f in zip(self.lateral, feats)]

    def semantic_decoder(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """FPN top-down sum, 3x3 conv and classifier: stride-4 logits (B, C, H/4, W/4)."""
        top = levels[-1]
        for f in reversed(levels[:-1]):
            top = f + F.interpolate(top, size=f.shape[-2:], mode="bilinear", align_corners=False)
        return self.sem_classifier(self.sem_conv(top))

    def boundary_decoder(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """Summed multi-level features -> 1x1, ReLU, 1x1: stride-4 boundary logits (B, 1, H/4, W/4)."""
        size = levels[0].shape[-2:]
        summed = sum(F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in levels)
        if self.detach_boundary:
            summed = summed.detach()
        return self.boundary_head(summed)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"MapNet: input must be (B, 3, H, W) RGB in [0, 1], got {tuple(x.shape)}")
        size = x.shape[-2:]
        levels = self.neck(x)
        sem = F.interpolate(self.semantic_decoder(levels), size=size, mode="bilinear", align_corners=False)
        bnd = F.interpolate(self.boundary_decoder(levels), size=size, mode="bilinear", align_corners=False)
        return {"sem_logits": sem, "boundary": torch.sigmoid(bnd), "boundary_logits": bnd}
