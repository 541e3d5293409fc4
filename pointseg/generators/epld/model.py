"""The EPLD network: backbone + FPN, the fusion module and the distance branch (Sec. 3.2-3.3).

Li, Fan and Zhang, "Point-supervised Panoptic Segmentation via Estimating
Pseudo Labels from Learnable Distance" (EPLD), ECCV 2024.

Shapes: an input of ``S x S`` gives ``F^1, F^2, F^3`` at ``S/8, S/16, S/32``
and ``F^fuse``, ``M^l`` at ``H_1 x W_1 = S/8 x S/8``. ``N`` is the number of
instances of an image (one per thing object, one per stuff class,
:func:`pointseg.generators.base.seed_groups`); a batch pads ``N`` to its
largest image and ``instance_valid`` marks the real ones.

Decoder layer ``l`` (Fig. 3):

1. query aggregation, :func:`aggregation_masks` and :func:`masked_mean`
   (Eq. 1 for ``l = 1``, Eq. 2-3 after);
2. query enhancing: ``Y^l = FC(Q^l)`` (Eq. 4, trained by the focal loss) and
   ``Q^_n = Q_n + E^cls[Y_n]`` (Eq. 5);
3. the decoder layer: ``decoder_blocks`` blocks of query self-attention and
   cross-attention over the tokens of ``F^1..F^3`` (with a sine position
   embedding and a learned level embedding). Like Panoptic SegFormer's mask
   decoder, the mask comes from the cross-attention *maps*: each block's
   per-head attention logits ``q . k / sqrt(d)`` are split by level, upsampled
   to ``H_1 x W_1`` and combined by a learned weight per (block, level, head)
   into one logit per query and pixel; ``M^l`` is their softmax over the
   ``N`` instances, ``X^l = 1 - M^l`` (Eq. 6). With ``mask_stride: 4`` (our
   extension) the logits are upsampled to stride 4 and the dot product of an
   MLP of the updated query with a stride-4 pixel embedding (the backbone's
   stride-4 map plus ``F^fuse``) is added; Eq. 2-3 still aggregate on the
   ``F^fuse`` grid (the logits average-pooled to it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pointseg.argmax import first_argmax
from pointseg.generators.epld.config import EPLDTrainConfig
from pointseg.models.backbones import build_timm_backbone, normalization

__all__ = [
    "EPLDNet",
    "MASKED_LOGIT",
    "aggregation_masks",
    "click_distance",
    "eroded_one_hot",
    "masked_mean",
    "sine_position_embedding",
]

#: Logit of a padded instance slot: softmax gives it probability 0 (finite, so no NaN anywhere).
MASKED_LOGIT = -1.0e4


def eroded_one_hot(label: torch.Tensor, num: int, kernel: int = 3, iters: int = 3) -> torch.Tensor:
    """``one_hot(label)`` eroded ``iters`` times by a ``kernel x kernel`` all-ones element (Eq. 2), from the label map.

    ``eroded[n, i] = min_{j in window(i)} [label[j] = n]``; pixels outside the
    image do not count (the image border does not erode a mask, as ``cv2.erode``
    with its default border). ``iters`` erosions by a square equal one erosion
    by the square of side ``1 + iters (kernel - 1)`` (the in-image pixels of the
    big window are reached by monotone steps of the small one, which stay in
    the image), and a one-hot mask survives at ``i`` exactly where the label is
    constant over that window: two separable max-pools of the ``(B, H, W)``
    label map, instead of ``iters`` pools of the ``(B, N, H, W)`` one-hot.

    label : (B, H, W) int in ``[0, num)``; kernel odd. Returns (B, num, H, W) float in {0, 1}.
    """
    side = 1 + iters * (kernel - 1)
    x = label[:, None].float()  # exact for labels below 2**24

    def window_max(t: torch.Tensor) -> torch.Tensor:  # max_pool pads with -inf: outside pixels never win
        t = F.max_pool2d(t, (1, side), stride=1, padding=(0, side // 2))
        return F.max_pool2d(t, (side, 1), stride=1, padding=(side // 2, 0))

    constant = window_max(x) == -window_max(-x)  # (B, 1, H, W)
    return F.one_hot(label, num).permute(0, 3, 1, 2).float() * constant


def aggregation_masks(mask_logits: torch.Tensor, point_masks: torch.Tensor, instance_valid: torch.Tensor,
                      erosion: bool = True, kernel: int = 3, iters: int = 3) -> torch.Tensor:
    """``M^hat^{l-01}``, the masks that aggregate the queries of layer ``l + 1`` (Eq. 2).

    ``M^l = argmax_n`` of the previous layer's ``mask_logits`` over the valid
    instances (Eq. 7), one-hot ``M^{l-01}``, eroded (``erosion``) to
    ``M~^{l-01}``, and every labelled pixel of ``P^01`` set back to 1.

    mask_logits : (B, N, H, W) float; point_masks : (B, N, H, W) float ``P^01``;
    instance_valid : (B, N) bool. Returns (B, N, H, W) float in {0, 1}, no gradient.
    """
    with torch.no_grad():
        logits = mask_logits.masked_fill(~instance_valid[:, :, None, None], -math.inf)
        label, num = first_argmax(logits, 1), mask_logits.shape[1]
        if erosion:
            hard = eroded_one_hot(label, num, kernel, iters)
        else:
            hard = F.one_hot(label, num).permute(0, 3, 1, 2)
        return torch.maximum(hard.to(point_masks.dtype), point_masks)  # Eq. 2: P^01 = 1 -> 1


def masked_mean(feature: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``Q_n = (1 / Z_n) sum_i mask_n[i] F[i]``, ``Z_n = sum_i mask_n[i]`` (Eq. 1 and 3).

    feature : (B, D, H, W) or (1, D, H, W) (shared by the batch); masks : (B, N, H, W).
    Returns (B, N, D). An empty mask gives 0 (``Z`` is clamped to 1; it
    cannot happen in EPLD, where the points are always restored).
    """
    z = masks.sum((2, 3)).clamp_min(1.0)  # (B, N)
    if feature.shape[0] == 1 and masks.shape[0] != 1:
        summed = torch.einsum("bnhw,dhw->bnd", masks, feature[0])
    else:
        summed = torch.einsum("bnhw,bdhw->bnd", masks, feature)
    return summed / z[..., None]


def click_distance(point_masks: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """Euclidean distance from every cell of an ``out_size`` grid to each instance's nearest labelled cell.

    Distances are in units of the image side (cell centres at ``(i + 0.5) / h``
    on both grids), so they do not depend on the grid. point_masks : (B, N, h', w')
    ``P^01``. Returns (B, N, h, w) float; 0 for an instance without a point.
    """
    b, n, hp, wp = point_masks.shape
    h, w = out_size
    idx = point_masks.nonzero()  # (K, 4): image, instance, row, col
    dev = point_masks.device
    ys = (torch.arange(h, device=dev) + 0.5) / h
    xs = (torch.arange(w, device=dev) + 0.5) / w
    py = (idx[:, 2] + 0.5) / hp
    px = (idx[:, 3] + 0.5) / wp
    d = ((ys[None, :, None] - py[:, None, None]) ** 2 + (xs[None, None, :] - px[:, None, None]) ** 2).sqrt()
    out = torch.full((b * n, h * w), math.inf, device=dev)
    out.scatter_reduce_(0, (idx[:, 0] * n + idx[:, 1])[:, None].expand(-1, h * w), d.flatten(1), "amin")
    return torch.nan_to_num(out, posinf=0.0).view(b, n, h, w)


def sine_position_embedding(height: int, width: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The 2-D sine embedding of DETR, ``E^sin``: (dim, height, width).

    Half the channels encode the row, half the column; within each half,
    ``sin`` and ``cos`` of ``pos / temperature^(2k / (dim/2))`` with ``pos``
    the pixel centre normalised to ``(0, 2 pi)``.
    """
    if dim % 4:
        raise ValueError(f"sine_position_embedding: dim={dim} must be a multiple of 4")
    half = dim // 2
    y = (torch.arange(height, dtype=torch.float32) + 0.5) / height * 2 * math.pi
    x = (torch.arange(width, dtype=torch.float32) + 0.5) / width * 2 * math.pi
    freq = temperature ** (2 * torch.div(torch.arange(half), 2, rounding_mode="floor") / half)
    py = y[:, None] / freq  # (H, half)
    px = x[:, None] / freq
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], 2).flatten(1)
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], 2).flatten(1)
    return torch.cat([py[:, None, :].expand(height, width, half), px[None, :, :].expand(height, width, half)],
                     2).permute(2, 0, 1).contiguous()


def _group_norm(dim: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if dim % 8 == 0 else 4, dim)


class FPNNeck(nn.Module):
    """Lateral 1x1 convs, top-down sums and 3x3 output convs: ``F^1, F^2, F^3`` (D channels)."""

    def __init__(self, channels: list[int], dim: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in channels)
        self.output = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), _group_norm(dim)) for _ in channels)

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral, levels)]
        for i in range(len(lat) - 2, -1, -1):
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="bilinear", align_corners=False)
        return [conv(f) for conv, f in zip(self.output, lat)]


class FusionModule(nn.Module):
    """``F^fuse = conv(conv(F^1 + up(F^2) + up(F^3)))`` (Sec. 3.2, Fig. 2 right)."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, bias=False), _group_norm(dim), nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 3, padding=1))

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        size = levels[0].shape[-2:]
        summed = levels[0] + sum(F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in levels[1:])
        return self.convs(summed)


class CrossAttention(nn.Module):
    """Multi-head cross-attention of the queries over the pixel tokens, exposing its logits.

    ``logits[b, h, n, t] = <W_q (q_n + p_n), W_k (f_t + e_t)>_h / sqrt(D / heads)``.
    With ``update`` the queries are also updated (softmax over the tokens,
    values, output projection, residual, LayerNorm); the last block of a
    decoder layer only needs the logits.
    """

    def __init__(self, dim: int, heads: int, update: bool):
        super().__init__()
        self.heads, self.update = heads, update
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        if update:
            self.v = nn.Linear(dim, dim)
            self.out = nn.Linear(dim, dim)
            self.norm = nn.LayerNorm(dim)

    def forward(self, query, query_pos, memory, memory_pos) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = query.shape
        t = memory.shape[1]
        h, dh = self.heads, d // self.heads
        q = self.q(query + query_pos).view(b, n, h, dh).transpose(1, 2)
        k = self.k(memory + memory_pos).view(b, t, h, dh).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / math.sqrt(dh)  # (B, h, N, T)
        if self.update:
            v = self.v(memory).view(b, t, h, dh).transpose(1, 2)
            out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
            query = self.norm(query + self.out(out))
        return query, logits


class DecoderBlock(nn.Module):
    """Query self-attention, cross-attention and (``update``: when the updated query is read
    afterwards) the attention's value path and a feed-forward layer."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, update: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_norm = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, heads, update=update)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, dim)) if update else None
        self.ffn_norm = nn.LayerNorm(dim) if update else None

    def forward(self, query, query_pos, memory, memory_pos, padding):
        qk = query + query_pos
        query = self.self_norm(query + self.self_attn(qk, qk, query, key_padding_mask=padding, need_weights=False)[0])
        query, logits = self.cross(query, query_pos, memory, memory_pos)
        if self.ffn is not None:
            query = self.ffn_norm(query + self.ffn(query))
        return query, logits


class DistanceLayer(nn.Module):
    """One decoder layer of the distance branch: enhanced queries -> ``M^l`` logits (B, N, h, w).

    The logits are the weighted attention maps (upsampled to ``out_size``);
    with a ``pixel_embedding`` (B, D, h, w) (``mask_stride: 4``) the dot
    product of an MLP of the updated query with it is added, Mask2Former's
    mask head, which carries the stride-4 detail the attention maps lack.
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, blocks: int, num_levels: int, pixel_embedding: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, heads, ffn_dim, update=i < blocks - 1 or pixel_embedding) for i in range(blocks))
        # one weight per (block, level, head) attention map, as Panoptic SegFormer's 1x1 over stacked maps
        self.map_weight = nn.Parameter(torch.full((blocks, num_levels, heads), 1.0 / (blocks * num_levels)))
        self.map_bias = nn.Parameter(torch.zeros(()))
        self.mask_embed = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim)) if pixel_embedding else None

    def forward(self, query, query_pos, memory, memory_pos, padding, level_shapes, out_size,
                pixel_embedding: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = query.shape
        mask = query.new_zeros(b, n, *level_shapes[0]) + self.map_bias
        sizes = [h * w for h, w in level_shapes]
        for bi, block in enumerate(self.blocks):
            query, logits = block(query, query_pos, memory, memory_pos, padding)  # (B, heads, N, T)
            # the weighted sum over heads commutes with the (linear) upsampling: sum first, one weight per
            # (level, head) spread over the level's tokens, head by head (contiguous planes, no transposed copy)
            weight = torch.cat([self.map_weight[bi, li][:, None].expand(-1, t) for li, t in enumerate(sizes)], 1)
            weighted = logits[:, 0] * weight[0]
            for k in range(1, logits.shape[1]):
                weighted = weighted + logits[:, k] * weight[k]  # (B, N, T)
            for (h, w), part in zip(level_shapes, weighted.split(sizes, -1)):
                summed = part.reshape(b, n, h, w)
                if (h, w) != tuple(level_shapes[0]):
                    summed = F.interpolate(summed, size=level_shapes[0], mode="bilinear", align_corners=False)
                mask = mask + summed
        if tuple(out_size) != tuple(level_shapes[0]):
            mask = F.interpolate(mask, size=out_size, mode="bilinear", align_corners=False)
        if self.mask_embed is not None and pixel_embedding is not None:
            mask = mask + torch.einsum("bnd,bdhw->bnhw", self.mask_embed(query), pixel_embedding)
        return mask


class PixelEmbedding(nn.Module):
    """Stride-4 pixel embedding (``mask_stride: 4``): the backbone's stride-4 map plus the
    upsampled ``F^fuse``, a 3x3 conv and a 1x1 conv -> (B, D, S/4, S/4)."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.lateral = nn.Conv2d(in_channels, dim, 1)
        self.convs = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), _group_norm(dim), nn.ReLU(inplace=True),
                                   nn.Conv2d(dim, dim, 1))

    def forward(self, stride4: torch.Tensor, fuse: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(fuse, size=stride4.shape[-2:], mode="bilinear", align_corners=False)
        return self.convs(self.lateral(stride4) + up)


class EPLDNet(nn.Module):
    """Backbone + FPN + fusion module + distance branch (module docstring).

    ``forward(image, point_masks, instance_valid, instance_class, features=None)``:

    * image : (B, 3, S, S) float RGB in [0, 1] (normalised inside);
    * point_masks : (B, N, S/8, S/8) float ``P^01``, 1 at each instance's labelled cells;
    * instance_valid : (B, N) bool; instance_class : (B, N) long class index in [0, C);
    * features : optional precomputed :meth:`backbone_features` (a frozen backbone's cache).

    Returns ``{"mask_logits": [L x (B, N, S/m, S/m)], "class_logits": [L x (B, N, C)] or None,
    "fuse": (B, D, S/8, S/8)}`` with ``m = mask_stride`` (8, or 4 with the
    stride-4 pixel embedding); padded instance slots have logit
    :data:`MASKED_LOGIT`. ``M^l`` is ``mask_logits[l].softmax(1)``; ``fuse`` is
    ``F^fuse`` (the labelling's ``split_features`` reads it).
    """

    def __init__(self, cfg: EPLDTrainConfig, category_ids: list[int], pretrained: bool = True,
                 thing_ids: list[int] | None = None):
        super().__init__()
        self.cfg = cfg
        self.category_ids = [int(c) for c in category_ids]
        num_classes = len(self.category_ids)
        if num_classes < 1:
            raise ValueError("EPLDNet: the label space has no category")
        things = set(self.category_ids if thing_ids is None else (int(c) for c in thing_ids))
        self.register_buffer("class_isthing", torch.tensor([c in things for c in self.category_ids]), persistent=False)
        dim = cfg.hidden_dim
        # strides 8/16/32 for F^1..F^3, and 4 for the pixel embedding of mask_stride 4
        out_indices = (1, 2, 3, 4) if cfg.mask_stride == 4 else (2, 3, 4)
        self.backbone, channels = build_timm_backbone(cfg.backbone, pretrained, out_indices=out_indices)
        self.pixel_embedding = PixelEmbedding(channels[0], dim) if cfg.mask_stride == 4 else None
        if cfg.mask_stride == 4:
            channels = channels[1:]
        if cfg.freeze_backbone:
            self.backbone.requires_grad_(False)
        mean, std = normalization(cfg.backbone)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.neck = FPNNeck(channels, dim)
        self.fusion = FusionModule(dim)
        side = cfg.input_size // 8
        self.level_embed = nn.Parameter(torch.randn(len(channels), dim) * 0.02)
        if cfg.query_feature == "learned":  # E^learn of Table 1
            self.learned_embedding = nn.Parameter(torch.randn(dim, side, side) * 0.02)
        self.classifier = nn.Linear(dim, num_classes) if cfg.cls_loss else None
        if self.classifier is not None:  # focal-loss prior: every class starts at probability 0.01
            nn.init.constant_(self.classifier.bias, -math.log(99.0))
        self.class_embed = nn.Embedding(num_classes, dim) if cfg.class_embedding else None
        self.layers = nn.ModuleList(
            DistanceLayer(dim, cfg.num_heads, cfg.ffn_dim, cfg.decoder_blocks, len(channels), cfg.mask_stride == 4)
            for _ in range(cfg.layers))
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}

    def train(self, mode: bool = True) -> "EPLDNet":
        super().train(mode)
        if self.cfg.freeze_backbone:
            self.backbone.eval()  # frozen means frozen BN statistics too
        return self

    def backbone_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Backbone maps at strides (4,) 8, 16, 32 of a (B, 3, S, S) image in [0, 1]."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"EPLDNet: image must be (B, 3, S, S) RGB in [0, 1], got {tuple(image.shape)}")
        return list(self.backbone((image - self.mean) / self.std))

    def _position(self, h: int, w: int, device) -> torch.Tensor:
        key = (h, w)
        if key not in self._pos_cache:
            self._pos_cache[key] = sine_position_embedding(h, w, self.cfg.hidden_dim)
        return self._pos_cache[key].to(device)

    def forward(self, image, point_masks, instance_valid, instance_class, features=None) -> dict:
        cfg = self.cfg
        backbone = features if features is not None else self.backbone_features(image)
        levels = self.neck(backbone[1:] if self.pixel_embedding is not None else backbone)
        fuse = self.fusion(levels)
        grid = tuple(fuse.shape[-2:])
        if tuple(point_masks.shape[-2:]) != grid:
            raise ValueError(f"EPLDNet: point_masks {tuple(point_masks.shape)} do not match F^fuse {tuple(fuse.shape)}")
        pixel = self.pixel_embedding(backbone[0], fuse) if self.pixel_embedding is not None else None
        out_size = tuple(pixel.shape[-2:]) if pixel is not None else grid
        level_shapes = [tuple(f.shape[-2:]) for f in levels]
        pos = [self._position(h, w, fuse.device) for h, w in level_shapes]
        memory = torch.cat([f.flatten(2).transpose(1, 2) for f in levels], 1)  # (B, T, D)
        memory_pos = torch.cat([(p.flatten(1) + e[:, None]).T for p, e in zip(pos, self.level_embed)], 0)[None]
        source = {"fuse": fuse, "sine": pos[0][None],
                  "learned": getattr(self, "learned_embedding", None)}[cfg.query_feature]
        if cfg.query_feature == "learned":
            source = source[None]
        padding = ~instance_valid
        masks = point_masks
        prior = None
        if cfg.spatial_prior > 0:  # things only: stuff (and the VOC background) may be anywhere
            isthing = self.class_isthing[instance_class] & instance_valid
            prior = cfg.spatial_prior * click_distance(point_masks, out_size) * isthing[:, :, None, None].to(fuse.dtype)
        mask_logits, class_logits = [], []
        for li, layer in enumerate(self.layers):
            if li > 0:  # Eq. 2-3: aggregate from the previous layer's pseudo label, on the F^fuse grid
                prev = mask_logits[-1]
                if tuple(prev.shape[-2:]) != grid:
                    prev = F.adaptive_avg_pool2d(prev, grid)
                masks = aggregation_masks(prev, point_masks, instance_valid, cfg.erosion, cfg.erosion_kernel,
                                          cfg.erosion_iters)
            query = masked_mean(source, masks)  # Eq. 1 / 3
            query_pos = masked_mean(pos[0][None], masks) if cfg.query_position else torch.zeros_like(query)
            if self.classifier is not None:
                class_logits.append(self.classifier(query))  # Y^l, Eq. 4
            if self.class_embed is not None:
                query = query + self.class_embed(instance_class)  # Eq. 5
            logits = layer(query, query_pos, memory, memory_pos, padding, level_shapes, out_size, pixel)
            if prior is not None:
                logits = logits - prior
            mask_logits.append(logits.masked_fill(padding[:, :, None, None], MASKED_LOGIT))
        return {"mask_logits": mask_logits, "class_logits": class_logits or None, "fuse": fuse}
