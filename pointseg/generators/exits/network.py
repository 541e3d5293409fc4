"""EXITS networks: the pseudo-label generator (encoder + mask decoder) and the similarity extractor.

Mask decoder (supplement A, Eq. a1), on encoder features ``F`` ``(B, D, N, N)``:

* pixel head: conv3x3 - ReLU - conv3x3 - ReLU - bilinear x``upsample`` -
  conv3x3 - ReLU - conv3x3, giving ``F_pixel`` ``(B, D/3, N u, N u)``;
* prototype head: spatial average of ``F`` - FC(D, D/3) - ReLU - FC(D/3, D/3),
  giving ``F_proto`` ``(B, D/3)``;
* ``M = sigmoid(F_pixel . F_proto)`` (Eq. a1), returned as logits.

Encoders: the paper's MAE ViT-B has no offline weights here, so the generator
encodes with ImageNet EfficientNet-Lite0 (stride-8 and stride-16 features,
each projected to ``D`` and summed at stride 8), or with the small ViT below
trained from scratch. The similarity extractor (option a) is that small ViT
(no class token, as in supplement A) with its own mask decoder, trained with
the MIL loss (Eq. 1) during warm-up and frozen after; its head-averaged
self-attention of one layer is ``S`` (Sec. 3.2.1, Table a1). Option (b)
takes ``S = softmax_j(cos(f_i, f_j) / temperature)`` of the frozen ImageNet
EfficientNet-Lite0 features (:class:`FeatureAffinity`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pointseg.models.backbones import build_timm_backbone, normalization

__all__ = ["MaskDecoder", "ViT", "EffNetEncoder", "MaskNet", "SimilarityExtractor", "FeatureAffinity", "ExitsNet"]

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _normalise(x: torch.Tensor, stats) -> torch.Tensor:
    mean = torch.tensor(stats[0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(stats[1], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class MaskDecoder(nn.Module):
    """Supplement A: pixel head (4 convs, upsampling after the 2nd) and prototype head (2 FC); Eq. a1 logits."""

    def __init__(self, dim: int, upsample: int):
        super().__init__()
        d3 = max(dim // 3, 1)
        self.upsample = int(upsample)
        self.pixel_a = nn.Sequential(nn.Conv2d(dim, d3, 3, padding=1), nn.ReLU(inplace=True),
                                     nn.Conv2d(d3, d3, 3, padding=1), nn.ReLU(inplace=True))
        self.pixel_b = nn.Sequential(nn.Conv2d(d3, d3, 3, padding=1), nn.ReLU(inplace=True),
                                     nn.Conv2d(d3, d3, 3, padding=1))
        self.proto = nn.Sequential(nn.Linear(dim, d3), nn.ReLU(inplace=True), nn.Linear(d3, d3))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, D, N, N) -> (B, 1, N u, N u) mask logits ``F_pixel . F_proto``."""
        pixel = self.pixel_a(feats)
        if self.upsample > 1:
            pixel = F.interpolate(pixel, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        pixel = self.pixel_b(pixel)
        proto = self.proto(feats.mean((2, 3)))
        return torch.einsum("bchw,bc->bhw", pixel, proto)[:, None] / pixel.shape[1] ** 0.5


class _Block(nn.Module):
    """Pre-norm transformer block whose attention matrix is kept for the similarity."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5).softmax(-1)  # (B, heads, n, n)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(B, n, d))
        return x + self.mlp(self.norm2(x)), attn


class ViT(nn.Module):
    """A small ViT without class token: ``(B, 3, S, S)`` in ``[0, 1]`` -> features and per-layer attention."""

    def __init__(self, size: int, patch: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.grid = size // patch
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, self.grid * self.grid, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns ``(B, dim, N, N)`` features and the ``(B, heads, N^2, N^2)`` attention of every layer."""
        t = self.embed(_normalise(x, _IMAGENET)).flatten(2).transpose(1, 2) + self.pos
        attentions = []
        for block in self.blocks:
            t, a = block(t)
            attentions.append(a)
        t = self.norm(t)
        B, n, d = t.shape
        return t.transpose(1, 2).reshape(B, d, self.grid, self.grid), attentions


class EffNetEncoder(nn.Module):
    """ImageNet EfficientNet-Lite0, stride-8 + upsampled stride-16 features projected to ``dim``.

    Batch-norm statistics stay frozen (``train()`` keeps them in eval mode):
    a step sees a dozen object crops, too few to re-estimate them. With
    ``train_backbone=False`` the backbone's weights are frozen too and only
    the projections (and the decoder) learn.
    """

    def __init__(self, dim: int, pretrained: bool = True, train_backbone: bool = False):
        super().__init__()
        self.backbone, ch = build_timm_backbone("efficientnet_lite0", pretrained=pretrained, out_indices=(2, 3))
        self.backbone.requires_grad_(train_backbone)
        self.train_backbone = train_backbone
        self.lat8, self.lat16 = nn.Conv2d(ch[0], dim, 1), nn.Conv2d(ch[1], dim, 1)
        self.stats = normalization("efficientnet_lite0")

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def backbone_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            return self.backbone(_normalise(x, self.stats))

    def project(self, feats: list[torch.Tensor]) -> torch.Tensor:
        f8, f16 = feats
        top = F.interpolate(self.lat16(f16), size=f8.shape[-2:], mode="bilinear", align_corners=False)
        return F.relu(self.lat8(f8) + top)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.backbone_features(x))


class MaskNet(nn.Module):
    """The pseudo-label generator: crop ``(B, 3, S, S)`` in ``[0, 1]`` -> mask logits ``(B, 1, N u, N u)``."""

    def __init__(self, cfg, pretrained: bool = True):
        super().__init__()
        if cfg.encoder == "vit":
            self.vit = ViT(cfg.crop_size, cfg.patch, cfg.vit_dim, cfg.vit_depth, cfg.vit_heads)
            self.proj = nn.Conv2d(cfg.vit_dim, cfg.decoder_dim, 1)
        else:
            self.effnet = EffNetEncoder(cfg.decoder_dim, pretrained, cfg.train_backbone)
        self.decoder = MaskDecoder(cfg.decoder_dim, cfg.upsample)

    @property
    def frozen_backbone(self) -> bool:
        """Whether the encoder's trunk is fixed, so that a copy of this net can share its features."""
        return hasattr(self, "effnet") and not self.effnet.train_backbone

    def trunk(self, x: torch.Tensor):
        """The encoder's trunk output: backbone features (EfficientNet) or the crops themselves (ViT)."""
        return self.effnet.backbone_features(x) if hasattr(self, "effnet") else x

    def head(self, trunk) -> torch.Tensor:
        if hasattr(self, "vit"):
            return self.decoder(self.proj(self.vit(trunk)[0]))
        return self.decoder(self.effnet.project(trunk))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class SimilarityExtractor(nn.Module):
    """Option (a): the small ViT plus a mask decoder for its MIL warm-up (Eq. 1)."""

    def __init__(self, cfg):
        super().__init__()
        self.vit = ViT(cfg.crop_size, cfg.patch, cfg.vit_dim, cfg.vit_depth, cfg.vit_heads)
        self.decoder = MaskDecoder(cfg.vit_dim, cfg.upsample)
        self.layer = cfg.attention_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.vit(x)[0])

    @torch.no_grad()
    def similarity(self, x: torch.Tensor) -> torch.Tensor:
        """``S`` (B, N^2, N^2): attention of layer ``attention_layer`` averaged over heads (or over all layers)."""
        _, attentions = self.vit(x)
        if self.layer == "all":
            return torch.stack([a.mean(1) for a in attentions]).mean(0)
        return attentions[int(self.layer) - 1].mean(1)


class FeatureAffinity(nn.Module):
    """Option (b): ``S_ij = softmax_j(cos(f_i, f_j) / temperature)`` on frozen ImageNet EfficientNet-Lite0 features."""

    def __init__(self, temperature: float, pretrained: bool = True):
        super().__init__()
        self.backbone, _ = build_timm_backbone("efficientnet_lite0", pretrained=pretrained, out_indices=(2, 3))
        self.backbone.eval().requires_grad_(False)
        self.temperature = float(temperature)
        self.stats = normalization("efficientnet_lite0")

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def similarity(self, x: torch.Tensor) -> torch.Tensor:
        """S (B, N^2, N^2) of crops (B, 3, S, S) in ``[0, 1]``."""
        return self.similarity_from_features(self.backbone(_normalise(x, self.stats)))

    @torch.no_grad()
    def similarity_from_features(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """S from the backbone's stride-8 and stride-16 maps (a frozen generator trunk computes the same ones)."""
        f8, f16 = feats
        f16 = F.interpolate(f16, size=f8.shape[-2:], mode="bilinear", align_corners=False)
        f = torch.cat([F.normalize(f8, dim=1), F.normalize(f16, dim=1)], 1).flatten(2)  # (B, C, n)
        f = F.normalize(f, dim=1)
        return ((f.transpose(1, 2) @ f) / self.temperature).softmax(-1)


class ExitsNet(nn.Module):
    """What stage 1 trains and the checkpoint holds: ``generator`` and, for option (a), ``extractor``.

    The feature-affinity extractor (option b) has no trained weights; it is
    built by the stage-1 trainable, outside the checkpoint.
    """

    def __init__(self, cfg, pretrained: bool = True):
        super().__init__()
        self.train_config = cfg
        self.generator = MaskNet(cfg, pretrained)
        self.extractor = SimilarityExtractor(cfg) if cfg.similarity == "vit_attention" else None

    def forward(self, x: torch.Tensor, net: str = "generator"):
        """Mask logits of ``net``: one entry point for DDP.

        ``"generator"`` / ``"extractor"``: logits (B, 1, h, w); ``"generator_trunk"``:
        ``(logits, trunk)``, the trunk output for an EMA teacher with the same frozen trunk.
        """
        if net == "extractor":
            return self.extractor(x)
        if net == "generator_trunk":
            trunk = self.generator.trunk(x)
            return self.generator.head(trunk), trunk
        return self.generator(x)
