"""The P2Seg network: class map ``C``, offset map ``O`` and instance affinity ``Â`` (Sec. 3, Fig. 3).

The paper uses HRNet-48 with BESTIE's heads. This CPU-sized version:

* backbone: timm ``tf_efficientnet_lite0`` with the offline ImageNet weights
  (or ``mobilenetv2_100``), features at strides 8 / 16 / 32 (and 4 with
  ``stride=4``);
* neck: 1x1 laterals to ``width`` channels, top-down sum to the head stride
  (8, or 4: the output stride of the paper's HRNet), a 3x3 conv + BN + ReLU;
* three heads at that stride (3x3 conv + BN + ReLU, then 1x1):
  ``class_logits`` (c + 1 channels, 0 = background);
  ``offsets`` (2 channels ``(dy, dx)``): the head predicts them as fractions of
  the input height / width and they are returned in input pixels (so the same
  weights predict proportional offsets at any input size);
  ``embedding`` (``embed_dim`` channels);
* affinity: the embedding is average-pooled to an ``affinity_grid`` square
  grid and ``Â_ij = <e_i, e_j> / sqrt(embed_dim)`` (:func:`~.i2s.pixel_cell_affinity`)
  over all cell pairs, ``(B, N, N)`` logits with ``N = affinity_grid²`` (a
  dot-product affinity, as in the authors' code; the paper does not say how
  ``Â`` is formed); or, with ``affinity="window"``, every pixel of the
  head's map against its ``window x window`` neighbours (dilation
  ``dilation``), ``(B, window², H/s · W/s)`` logits (:func:`~.i2s.window_affinity`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pointseg.generators.p2seg.i2s import pixel_cell_affinity, window_affinity
from pointseg.models.backbones import build_timm_backbone, normalization

__all__ = ["P2SegNet"]

#: Output strides a head can have: 8, or 4 (HRNet's, the paper's backbone) for a class map of twice the side.
STRIDES = (4, 8)


def _head(width: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(inplace=True), nn.Conv2d(width, out, 1))


class P2SegNet(nn.Module):
    """Backbone + FPN-lite to stride 8 (or 4) + class / offset / embedding heads + grid affinity.

    Parameters
    ----------
    num_classes : channels of the class map, ``c + 1`` (background first).
    backbone : ``"efficientnet_lite0"`` or ``"mobilenet_v2"``.
    pretrained : offline ImageNet weights (True), a local checkpoint path, or False.
    width : neck and head channels; embed_dim : affinity embedding channels;
    affinity_grid : side of the affinity grid; stride : output stride of the heads (``STRIDES``);
    affinity : ``"grid"`` or ``"window"``; window, dilation : the window's side and dilation.

    ``forward(x)`` takes ``(B, 3, H, W)`` RGB in ``[0, 1]`` and returns, with
    ``s = stride``, ``class_logits`` (B, c+1, H/s, W/s), ``offsets`` (B, 2, H/s,
    W/s) in input pixels, ``embedding`` (B, D, H/s, W/s) and ``affinity_logits``
    (B, N, N) (grid) or (B, window², H/s · W/s) (window).
    """

    def __init__(self, num_classes: int, backbone: str = "efficientnet_lite0", pretrained: bool | str = True,
                 width: int = 64, embed_dim: int = 32, affinity_grid: int = 32, stride: int = 8,
                 affinity: str = "grid", window: int = 7, dilation: int = 2) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"P2SegNet: num_classes is c + 1 >= 2 (background and a thing class), got {num_classes}")
        if stride not in STRIDES:
            raise ValueError(f"P2SegNet: stride must be one of {STRIDES}, got {stride}")
        if affinity not in ("grid", "window"):
            raise ValueError(f"P2SegNet: affinity must be 'grid' or 'window', got {affinity!r}")
        self.num_classes = num_classes
        self.affinity_grid = affinity_grid
        self.affinity_kind, self.window, self.dilation = affinity, window, dilation
        self.embed_dim = embed_dim
        levels = (1, 2, 3, 4) if stride == 4 else (2, 3, 4)  # level i has stride 2 ** (i + 1)
        self.backbone, channels = build_timm_backbone(backbone, pretrained, out_indices=levels)
        mean, std = normalization(backbone)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.fuse = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.class_head = _head(width, num_classes)
        self.offset_head = _head(width, 2)
        self.embed_head = _head(width, embed_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Fused features at the head stride ``s``: (B, width, H/s, W/s)."""
        levels = [lat(f) for lat, f in zip(self.lateral, self.backbone((x - self.mean) / self.std))]
        top = levels[-1]
        for f in reversed(levels[:-1]):
            top = f + F.interpolate(top, size=f.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(top)

    def affinity(self, embedding: torch.Tensor) -> torch.Tensor:
        """``Â`` logits from a (B, D, h, w) embedding: (B, N, N) on the ``affinity_grid`` grid, or (B, k², h w)."""
        if self.affinity_kind == "window":
            return window_affinity(embedding, self.window, self.dilation)
        g = self.affinity_grid
        return pixel_cell_affinity(F.adaptive_avg_pool2d(embedding, g), g)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"P2SegNet: input must be (B, 3, H, W) RGB in [0, 1], got {tuple(x.shape)}")
        feat = self.features(x)
        size = torch.tensor([x.shape[-2], x.shape[-1]], dtype=feat.dtype, device=feat.device).view(1, 2, 1, 1)
        embedding = self.embed_head(feat)
        return {
            "class_logits": self.class_head(feat),
            "offsets": self.offset_head(feat) * size,
            "embedding": embedding,
            "affinity_logits": self.affinity(embedding),
        }
