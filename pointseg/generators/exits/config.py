"""EXITS settings: the labelling config (:class:`ExitsConfig`) and stage 1's (:class:`ExitsTrainConfig`).

Everything that shapes the network or its training lives in the stage-1
config, which is saved with the checkpoint, so a generator always crops the
way its network was trained. Defaults are the paper's where it gives them
(Sec. 4.1, supplement B), scaled to a CPU where it cannot be kept:

==================  ==========================  ===========================================
key                 paper                       here (why)
==================  ==========================  ===========================================
crop_size           512                         128 (CPU); delta scales with it
delta               24 px of 512 on COCO        0.047 of the crop (12 of 512 on VOC: 0.023)
attention_layer     10 of 12 (Table a1)         5 of 6 (same relative depth)
alpha               3 (Table a2)                3
tau_fg, tau_bg      1e-3, -1e-4 at 32x32 nodes  same, rescaled to the node count (see below)
point_dropout       0.9 per epoch               0.9
lambdas             mil 10, point 0.5, crf 0.5  same (COCO / LVIS)
ema_momentum        not given                   0.996 (MAL's)
encoder             MAE ViT-B                   EfficientNet-Lite0, ImageNet (no MAE offline)
similarity          warmed-up MAE ViT-B         cosine affinity of the frozen ImageNet
                                                EfficientNet-Lite0 features (b); or a small
                                                ViT from scratch with the MIL warm-up (a)
mil                 only if nothing retrieved   every object (see below)
==================  ==========================  ===========================================

Similarity options, measured on coco-mini (``benchmarks/exits_quality.py``):
the small ViT trained from scratch on 80 images learns the MIL warm-up but its
attention stays near uniform (``S ~ 1/n``), so option (a) retrieves no point
at the paper's thresholds (730 of 731 objects get none; sharpening the
attention retrieves some, at 60 % foreground and 38 % background precision,
no better than chance) and Eq. 8 falls back to MIL for every object; option
(b) retrieves foreground cells with ~73 % precision and background cells with
~85 %, so it is the default. The paper's Table a4 moves mask AP by 1.5-3.1
points with the extractor's weights alone.

``mil``: with the paper's rule (MIL only for an object with no retrieved
point) and option (b)'s retrievals, the dice on the sparse retrieved cells is
the only shape signal left, and the masks collapse (per-object mIoU 19.2 on
the first 40 coco-mini ids against 62.1 with ``mil: always``). The retrievals of
a CPU-sized extractor are too weak to replace the box tightness prior, so MIL
stays on for every object by default.

``crop_jitter`` is not in the paper: with the box at one fixed place in every
crop the MIL warm-up is solved from position alone. The jitter only widens a
margin (never below ``crop_margin``), so every side keeps cells outside the
box for ``P_BG``.

Thresholds and node count: every row of ``T^alpha`` sums to 1 over ``n``
nodes, so propagation scores are about ``1/n``; the paper's ``tau`` were set
for ``n = 32 x 32 = 1024`` (a 512 crop, 16 px patches). With
``tau_reference_nodes = 1024`` the thresholds are multiplied by ``1024 / n``
so they keep their meaning on another grid; ``null`` uses them as given.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pointseg.generators.base import TrainableGeneratorConfig
from pointseg.train.engine import EngineConfig


class ExitsTrainConfig(EngineConfig):
    """Stage 1 of EXITS: the similarity extractor's warm-up, then the pseudo-label generator."""

    steps: int = Field(250, ge=1, description="optimisation steps in total, warm-up included")
    batch_size: int = Field(4, ge=1, description="images per step (their objects are cropped)")
    lr: float = Field(2e-4, gt=0)
    # crops
    crop_size: int = Field(128, ge=32, description="side of the object crop (the paper: 512)")
    crop_margin: float = Field(0.15, ge=0, description="context around the box on each side, fraction of its size")
    crop_jitter: float = Field(0.25, ge=0, description="training: each side's margin drawn from crop_margin + U(0, this) "
                               "(a fixed box position lets the warm-up learn the box from position alone; "
                               "never below crop_margin, so every side keeps background cells)")
    max_objects_per_step: int = Field(16, ge=1, description="objects cropped per step (a seeded draw)")
    min_object_px: int = Field(4, ge=1, description="objects narrower or lower than this are not trained on")
    flip: bool = Field(True, description="random horizontal flips of the crops (seeded per epoch)")
    # networks
    encoder: Literal["efficientnet_lite0", "vit"] = Field(
        "efficientnet_lite0", description="generator encoder: ImageNet EfficientNet-Lite0 or the small ViT")
    train_backbone: bool = Field(False, description="fine-tune EfficientNet-Lite0 too (else only its projections)")
    decoder_dim: int = Field(96, ge=6, description="D of supplement A; the pixel and prototype heads use D/3")
    upsample: int = Field(4, ge=1, description="bilinear upsampling between the pixel head's 2nd and 3rd conv")
    patch: int = Field(8, ge=4, description="grid cell of the point retrieval (ViT patch, feature stride)")
    similarity: Literal["vit_attention", "feature_cosine"] = Field(
        "feature_cosine", description="(a) attention of a small ViT warmed up with MIL; (b) cosine affinity "
        "of the frozen ImageNet EfficientNet-Lite0 features")
    vit_dim: int = Field(96, ge=8)
    vit_depth: int = Field(6, ge=1)
    vit_heads: int = Field(4, ge=1)
    attention_layer: int | Literal["all"] = Field(
        5, description="1-based ViT layer whose head-averaged attention is S (Table a1); 'all': mean of layers")
    warmup_steps: int = Field(100, ge=0, description="MIL warm-up steps of the ViT similarity extractor (Eq. 1)")
    feature_temperature: float = Field(0.1, gt=0, description="(b): S = softmax(cos / temperature) per row")
    # point retrieval (Eq. 2-5)
    sinkhorn_iters: int = Field(50, ge=1, description="Sinkhorn-Knopp sweeps for A = Sinkhorn(S) (Eq. 2)")
    alpha: int = Field(3, ge=1, description="random-walk hops (Eq. 3-4, Table a2)")
    tau_fg: float = Field(1e-3, description="pi_f - pi_b >= tau_fg: pseudo foreground (Eq. 5)")
    tau_bg: float = Field(-1e-4, description="pi_f - pi_b <= tau_bg: pseudo background (Eq. 5)")
    tau_reference_nodes: int | None = Field(1024, ge=1, description="node count the taus are stated for; null: as is")
    delta: float = Field(24 / 512, ge=0, lt=0.5, description="inward shift of the extreme points, fraction of the crop")
    point_dropout: float = Field(0.9, ge=0, lt=1, description="fraction of retrieved points dropped per epoch")
    use_retrieved_points: bool = Field(True, description="False: only P_FG and P_BG supervise (Table 5, row 2)")
    mil: Literal["fallback", "always"] = Field(
        "always", description="Eq. 8's MIL term: only for objects with no retrieved point (the paper), or for "
        "every object (not in the paper: keeps the box tightness prior beside weak retrievals)")
    # losses (Eq. 8-10)
    lambda_mil: float = Field(10.0, ge=0)
    lambda_point: float = Field(0.5, ge=0)
    lambda_crf: float = Field(0.5, ge=0)
    ema_momentum: float = Field(0.996, ge=0, le=1, description="EMA teacher (not given in the paper; MAL's value)")
    # CRF (Eq. 9), local kernel
    crf_iters: int = Field(5, ge=1)
    crf_dilation: int = Field(2, ge=1, description="3x3 window with this dilation")
    crf_theta_color: float = Field(0.1, gt=0, description="RGB in [0, 1]")
    crf_theta_pos: float = Field(3.0, gt=0, description="pixels of the mask grid")
    crf_w_appearance: float = Field(1.0, ge=0)
    crf_w_smooth: float = Field(0.5, ge=0)

    @model_validator(mode="after")
    def _grid(self):
        if self.crop_size % self.patch:
            raise ValueError(f"crop_size {self.crop_size} must be a multiple of patch {self.patch}")
        if self.patch != 8 and (self.encoder == "efficientnet_lite0" or self.similarity == "feature_cosine"):
            raise ValueError("patch: EfficientNet-Lite0 features are read at stride 8; set patch: 8")
        if isinstance(self.attention_layer, int) and not 1 <= self.attention_layer <= self.vit_depth:
            raise ValueError(f"attention_layer {self.attention_layer} is not in 1..vit_depth={self.vit_depth}")
        if self.vit_dim % self.vit_heads:
            raise ValueError(f"vit_dim {self.vit_dim} must be a multiple of vit_heads {self.vit_heads}")
        return self

    @property
    def grid(self) -> int:
        """N: the retrieval grid is N x N cells of ``patch`` pixels."""
        return self.crop_size // self.patch


class ExitsConfig(TrainableGeneratorConfig):
    """Labelling with a trained EXITS generator (crops as in its checkpoint's stage-1 config)."""

    mask_threshold: float = Field(0.3, gt=0, lt=1, description="a pixel is the object's where M >= this (chosen "
                                  "on the first 40 coco-mini ids: 0.2 / 0.3 / 0.4 / 0.5 -> mIoU 62.0 / 62.1 / 62.0 / "
                                  "61.6)")
    batch_objects: int = Field(32, ge=1, description="object crops per network forward")
    min_object_px: int = Field(4, ge=1, description="objects narrower or lower than this get the filled box")
    overlap: Literal["smallest", "probability"] = Field(
        "smallest", description="a pixel several masks claim: the object with the smallest box (usually in front), "
        "or the highest M")
    clip_to_box: bool = Field(True, description="M = 0 outside the box of the extreme points (it bounds the object)")
