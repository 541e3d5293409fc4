"""EPLD's two configs: labelling (``generator.params``) and stage 1 (``generator.train``).

:class:`EPLDConfig` is what a labelling actor needs: where the trained distance
branch is and which of its layers labels. :class:`EPLDTrainConfig` is the
stage-1 config (a :class:`~pointseg.train.engine.EngineConfig`): the network,
its losses and its batches. Everything that shapes the network is in the
stage-1 config, so a checkpoint rebuilds itself (``load_trained``) and the
labelling run cannot disagree with the training run.

Every ablation of the paper is a key of :class:`EPLDTrainConfig`:

=====================  ===============================================  ==========================
paper                  knob                                             key
=====================  ===============================================  ==========================
Table 4                decoder layers ``L``                             ``layers``
Eq. 2                  erosion on/off, kernel, iterations               ``erosion``, ``erosion_kernel``, ``erosion_iters``
Table 1                query feature ``F^fuse`` / ``E^learn`` / ``E^sin``  ``query_feature``
Table 2                ``E^cls`` (Eq. 5) / ``L_cls`` (Eq. 4)            ``class_embedding``, ``cls_loss``
Table 5                colour prior (Eq. 9) / self-training (Eq. 10)   ``color_prior``, ``self_training``
Eq. 11                 loss weights (all 1 in the paper)                ``*_weight``
=====================  ===============================================  ==========================
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pointseg.generators.base import TrainableGeneratorConfig
from pointseg.train.engine import EngineConfig

__all__ = ["EPLDConfig", "EPLDTrainConfig"]


class EPLDConfig(TrainableGeneratorConfig):
    """Labelling with a trained EPLD distance branch (``checkpoint``, ``device`` from the base).

    The network runs at the checkpoint's square ``input_size`` (or
    ``input_size`` here); each image is resized to it and the chosen layer's
    ``M^l`` logits are resized back to the image (bilinear) before Eq. 7.
    """

    input_size: int | None = Field(
        None, ge=32, description="square network input for labelling (a multiple of 32); null: the training "
        "input_size. Larger gives finer M^l (the network is convolutional + attention with normalised sine positions; "
        "not with query_feature=learned)")

    backbone_chunk: int | None = Field(
        None, ge=1, description="images per backbone pass when labelling a batch (the decoder still sees the whole "
        "batch); null: 4 on a CPU, faster per image than 2 or the whole batch of 8 at 256 px since the TF-SAME "
        "convolutions pad inside the convolution (pad_same_inside; benchmarks/epld_speed.py), the whole batch on a GPU")
    postprocess_threads: int | None = Field(
        None, ge=1, description="threads sharing the per-image work after the network (resize of M^l to the image, "
        "Eq. 7, the uncertainty, the thing split, the segments) when labelling a batch; null: torch's thread count "
        "(the CPUs the labelling actor was given); 1: one image after the other")
    layer: int = Field(-1, description="decoder layer whose M^l labels (Eq. 7): 1..L, or -1 for the last, M^L")
    connected_things: bool = Field(
        False, description="our extension: drop the parts of a thing's mask not connected to its clicks (they go "
        "to their next-best instance), on M^l's grid; false: Eq. 7 alone")
    restore_points: bool = Field(
        False, description="give each click's pixel back to its instance after Eq. 7 (counted in diagnostics); "
        "false: Eq. 7 alone, as in the paper")
    thing_split: Literal["network", "geodesic", "learned_geodesic"] = Field(
        "network", description="our extension: 'network' splits the foreground among things by Eq. 7 (the paper); "
        "'geodesic' keeps EPLD's foreground / stuff decision and gives every foreground pixel to the thing whose "
        "clicks are nearest in PSPS's geodesic cost (LAB colour + split_beta * Sobel boundary); "
        "'learned_geodesic' adds split_gamma * X_n (Eq. 6, the learned distance to thing n) to every step "
        "of thing n's paths")
    split_gamma: float = Field(1.0, ge=0, description="thing_split learned_geodesic: weight of X_n = 1 - M_n per "
                               "step (0: the plain geodesic)")
    split_beta: float = Field(0.1, ge=0, description="thing_split geodesic: boundary weight of the edge cost (PSPS beta)")
    split_features: float = Field(
        0.0, ge=0, description="our extension, thing_split geodesic / learned_geodesic: every edge of the split's "
        "cost also pays this weight times the distance ||F(k) - F(l)|| of the network's own F^fuse (Sec. 3.2; each "
        "pixel's vector L2-normalised after a bilinear resize to the working grid), so a path that crosses what the "
        "trained features separate costs more; 0: PSPS's cost alone (README 'Measured': the void protocol)")
    split_downscale: float = Field(0.5, gt=0, le=1, description="thing_split geodesic: working fraction of the size")
    split_within: Literal["image", "foreground"] = Field(
        "image", description="thing_split geodesic / learned_geodesic, our extension: 'image' lets the paths cross "
        "any pixel (stuff included); 'foreground' keeps them inside EPLD's own foreground (pixels it gives to a "
        "thing), so one thing cannot reach another across the background (a foreground part no thing's path "
        "reaches keeps the 'image' split)")
    foreground_band: int = Field(
        0, ge=0, description="our extension: before the thing split, redraw EPLD's foreground / stuff boundary "
        "inside a band of this many pixels (at split_downscale) on either side of it: the band's pixels go to "
        "whichever side, the foreground inside the band or the stuff outside it, is nearest in PSPS's geodesic cost "
        "(LAB colour + split_beta * Sobel boundary), so the boundary moves to colour edges finer than M^l's grid; "
        "0: EPLD's own decision")
    band_step: float = Field(
        0.01, ge=0, description="foreground_band: length added to every step of the band's paths (x sqrt 2 for "
        "diagonal steps), so that where colour does not decide, the boundary stays where EPLD put it (the middle "
        "of the band)")

    @model_validator(mode="after")
    def _multiple_of_32(self) -> "EPLDConfig":
        if self.input_size is not None and self.input_size % 32:
            raise ValueError(f"input_size={self.input_size}: must be a multiple of 32 (strides 8/16/32)")
        if self.split_features > 0 and self.thing_split == "network":
            raise ValueError(f"split_features={self.split_features} weighs the geodesic thing split: it needs "
                             "thing_split: geodesic or learned_geodesic (thing_split: network has no split to weigh)")
        return self


class EPLDTrainConfig(EngineConfig):
    """Stage 1: the distance branch trained from the dataset's points (Eq. 11).

    Network (Sec. 3.2-3.3, with CPU-sized substitutes):

    * ``backbone`` at strides 8/16/32 and a small FPN give ``F^1, F^2, F^3``
      (``hidden_dim`` channels): the substitute for R50 + MSDeformAttn;
    * the fusion module sums ``F^1`` with the upsampled ``F^2``, ``F^3`` and
      applies two 3x3 convs: ``F^fuse`` (Sec. 3.2);
    * ``layers`` decoder layers (Sec. 3.3), each with ``decoder_blocks``
      blocks of query self-attention and cross-attention over ``F^1..F^3``
      (``num_heads`` heads); ``M^l`` comes from the blocks' attention logits.

    Batches: every image is resized to ``input_size`` x ``input_size``
    (aspect not kept; the generator does the same) and its points are scaled
    onto it. ``hflip`` flips half the images per epoch (seeded by
    ``seed``, epoch, image id).

    CPU choices (see the package docstring): ``freeze_backbone`` keeps the
    ImageNet backbone fixed, so its features can be cached per image and
    flip (``feature_cache``, entries per worker; 0 = off).
    """

    # EngineConfig defaults sized for stage 1 on a CPU (the paper: AdamW, lr 1.4e-4, wd 1e-4 on GPUs).
    steps: int = Field(1500, ge=1, description="optimisation steps in total")
    batch_size: int = Field(4, ge=1, description="images per worker per step")
    lr: float = Field(5e-4, gt=0, description="AdamW learning rate (paper 1.4e-4, GPU schedule)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay (the paper's 1e-4)")
    run_name: str = Field("epld", description="Ray Train run name; rerunning with it resumes")

    # network
    backbone: Literal["efficientnet_lite0", "mobilenet_v2"] = Field(
        "efficientnet_lite0", description="offline ImageNet backbone (pointseg.models.backbones)")
    pretrained: bool = Field(True, description="offline ImageNet weights (false: random init)")
    freeze_backbone: bool = Field(True, description="keep the backbone's ImageNet weights fixed (BN in eval mode)")
    backbone_lr_mult: float = Field(0.1, gt=0, description="backbone lr = lr * this, when it is trained")
    feature_cache: int = Field(
        512, ge=0, description="frozen backbone: cache its features for this many (image, flip) pairs per worker")
    input_size: int = Field(320, ge=32, description="square network input size (a multiple of 32)")
    hidden_dim: int = Field(128, ge=8, description="D, channels of F^1..F^3, F^fuse and the queries")
    num_heads: int = Field(4, ge=1, description="attention heads (D must divide by it)")
    ffn_dim: int = Field(256, ge=8, description="feed-forward width between decoder blocks")
    layers: int = Field(6, ge=1, description="L, decoder layers of the distance branch (Table 4)")
    decoder_blocks: int = Field(
        1, ge=1, description="self+cross-attention blocks per decoder layer; M^l from all their attention logits")
    mask_stride: Literal[8, 4] = Field(
        8, description="resolution of M^l: 8, the F^1 grid of the paper; 4 adds a stride-4 pixel embedding whose "
        "dot product with each query is added to the attention-map logits (Mask2Former's mask head)")
    query_feature: Literal["fuse", "learned", "sine"] = Field(
        "fuse", description="what the queries aggregate: F^fuse, E^learn or E^sin (Table 1)")
    query_position: bool = Field(
        True, description="add the aggregated sine position of the query's pixels to it (our substitute for the "
        "position the paper's deformable-attention neck mixes into F)")
    spatial_prior: float = Field(
        0.0, ge=0, description="our extension: subtract spatial_prior * (distance to the instance's nearest click, in "
        "image sides) from every thing instance's M^l logits: a fixed Voronoi prior the learnt logits override where "
        "the image says so; stuff instances get none. 0: off (the paper)")
    class_embedding: bool = Field(True, description="E^cls: Q^ = Q + E^cls[class] (Eq. 5, Table 2)")
    cls_loss: bool = Field(True, description="L_cls: focal loss on an FC classifier of Q (Eq. 4, Table 2)")
    erosion: bool = Field(True, description="erode the previous layer's masks before aggregation (Eq. 2)")
    erosion_kernel: int = Field(3, ge=1, description="square all-ones erosion kernel (odd; the paper's 3)")
    erosion_iters: int = Field(3, ge=1, description="erosions applied (the paper's 3)")

    # losses (Eq. 8-11)
    partial_weight: float = Field(1.0, ge=0, description="L_partial weight (Eq. 8, 11)")
    color_prior: bool = Field(True, description="L_col, the LAB colour prior (Eq. 9, Table 5)")
    color_weight: float = Field(1.0, ge=0, description="L_col weight (Eq. 11: 1)")
    color_tau: float = Field(0.3, ge=0, le=1, description="affinity threshold tau (not given by EPLD: BoxInst's 0.3)")
    color_theta: float = Field(2.0, gt=0, description="LAB similarity scale, S = exp(-||dLAB|| / theta) (BoxInst: 2)")
    color_dilation: int = Field(2, ge=1, description="neighbours: 3x3 at this dilation (not given by EPLD: BoxInst's 2)")
    self_training: bool = Field(True, description="L_self against the last layer's labels (Eq. 10, Table 5)")
    self_weight: float = Field(1.0, ge=0, description="L_self weight (Eq. 11: 1)")
    self_training_start: int = Field(0, ge=0, description="first step with L_self (0: from the start, as Eq. 11)")
    cls_weight: float = Field(1.0, ge=0, description="L_cls weight (Eq. 11: 1)")
    focal_alpha: float = Field(0.25, ge=0, le=1, description="focal loss alpha (Eq. 4)")
    focal_gamma: float = Field(2.0, ge=0, description="focal loss gamma (Eq. 4)")
    loss_stride: Literal[1, 2, 4, 8] = Field(
        4, description="L_partial, L_col and L_self on M^l upsampled to input_size / loss_stride (8: M^l's own grid)")

    # batches
    hflip: bool = Field(True, description="random horizontal flips")

    @model_validator(mode="after")
    def _consistent(self) -> "EPLDTrainConfig":
        if self.input_size % 32:
            raise ValueError(f"input_size={self.input_size}: must be a multiple of 32 (strides 8/16/32)")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim={self.hidden_dim} does not divide into num_heads={self.num_heads}")
        if self.hidden_dim % 4:
            raise ValueError(f"hidden_dim={self.hidden_dim}: must be a multiple of 4 (2-D sine position embedding)")
        if self.erosion_kernel % 2 == 0:
            raise ValueError(f"erosion_kernel={self.erosion_kernel}: must be odd (centred on the pixel)")
        return self
