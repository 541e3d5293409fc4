"""P2Seg's two configs: labelling (:class:`P2SegConfig`) and stage-1 training (:class:`P2SegTrainConfig`).

Pipeline keys: ``generator.params`` is validated by :class:`P2SegConfig` and
``generator.train`` by :class:`P2SegTrainConfig` (a subclass of the engine's
:class:`~pointseg.train.engine.EngineConfig`). The training loss reads the
labelling params too (the stage-1 semantic source, β, rounds, priority), so one
validated :class:`P2SegConfig` drives both stages.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pointseg.generators import generator_class
from pointseg.generators.base import TrainableGenerator, TrainableGeneratorConfig
from pointseg.train.engine import EngineConfig

__all__ = ["P2SegConfig", "P2SegTrainConfig"]


class P2SegConfig(TrainableGeneratorConfig):
    """How P2Seg labels (and what its stage-1 loss distils); every paper knob is a key."""

    semantic_source: Literal["psps", "point2mask", "epld"] = Field(
        "psps", description="generator whose pseudo labels give the stage-1 semantic map (the paper takes SAM's; a "
        "documented substitute): training-free (psps, point2mask), or a trained one given its checkpoint in "
        "semantic_params (epld: a distance branch trained on the same clicks)")
    semantic_params: dict[str, Any] = Field(
        default_factory=dict, description="params of semantic_source (point2mask: low-level maps only)")
    semantic_train: dict[str, Any] | None = Field(
        None, description="stage-1 training config of a trainable semantic_source without a checkpoint (e.g. epld's "
        "generator.train keys, with its own run_name): the pipeline trains the source first on the same points and "
        "hands its checkpoint to semantic_params; null: semantic_params must be training-free or carry a checkpoint")
    use_network: bool = Field(
        True, description="label with the trained network (I2S + S2I); false: S2I on the stage-1 semantic map "
        "alone, training-free (Table 6 setting)")
    source_grid: int | None = Field(
        None, ge=1, description="training-free only (use_network: false): the stage-1 semantic map is seen on a "
        "square grid of this side (the pixel at each cell's centre) before S2I: the ceiling of a network whose "
        "class map has that grid (the default network's is image_size / head_stride = 32); null: full resolution")
    beta: float = Field(2.0, ge=0, description="Hadamard power β of the affinity in S = Â^{∘β} * C (Sec. 3.2; not "
                        "given in the paper, chosen by configs/tune_p2seg.yaml)")
    rounds: int = Field(1, ge=0, description="distillation rounds: times stage 1 regenerates its labels from its own "
                        "network (I2S -> S2I); 0: trains on the stage-1 S2I labels only")
    priority: Literal["points", "semantic"] = Field(
        "points", description="S2I conflicts: 'points' (Points First, the paper) or 'semantic' (Semantic Results "
        "First, Table 6)")
    grouping: Literal["offsets", "nearest_point", "geodesic"] = Field(
        "offsets", description="split of a component shared by several points: by the predicted offsets "
        "(argmin ||e_k - (p + O(p))||), by the pixel itself (Eq. 1), or (geodesic, our extension; labelling only, "
        "stage-1 targets use Eq. 1) by PSPS's geodesic cost from the points (s2i.GeodesicSplit)")
    orphans: Literal["background", "nearest"] = Field(
        "background", description="Points First, components no point lies in: background (the paper) or, pixel by "
        "pixel, the instance of the nearest point of the image (geodesic with grouping geodesic, else Eq. 1; our "
        "extension)")
    split_beta: float = Field(0.1, ge=0, description="grouping geodesic: boundary weight of the edge cost (PSPS beta)")
    split_downscale: float = Field(0.5, gt=0, le=1, description="grouping geodesic: working fraction of the size")
    split_within: Literal["image", "component"] = Field(
        "image", description="grouping geodesic, our extension: 'image' lets the paths cross any pixel (as PSPS's "
        "do); 'component' keeps them inside the component being split, so a point cannot take pixels it reaches "
        "only across the background (pixels no path reaches from inside take the 'image' split)")
    components: Literal["class", "foreground"] = Field(
        "class", description="S2I components of every class region (the paper) or of the whole foreground (the "
        "semantic map then decides foreground/background only; the points decide classes)")
    foreground: Literal["argmax", "mass"] = Field(
        "argmax", description="network semantic map: argmax over background and the image's classes, or "
        "foreground wherever the classes together outweigh background")
    foreground_band: int = Field(
        0, ge=0, description="our extension (network labelling), as EPLD's key: before S2I, redraw the network's "
        "foreground / background boundary inside a band of this many pixels (at split_downscale) on either side "
        "of it: the band's pixels go to whichever side, the foreground inside the band or the background outside "
        "it, is nearest in PSPS's geodesic cost (LAB colour + split_beta * Sobel boundary), so the boundary moves "
        "to colour edges finer than the class map's grid; thing points stay foreground, stuff points background; "
        "a pixel entering the foreground takes its most probable class among the image's thing classes; 0: off")
    band_step: float = Field(
        0.01, ge=0, description="foreground_band: length added to every step of the band's paths (x sqrt 2 for "
        "diagonal steps), so that where colour does not decide, the boundary stays where the network put it")
    i2s: bool = Field(True, description="I2S on (Table 3): semantic map Â^{∘β} * C and L_I2S; off: argmax C, no L_I2S")
    i2s_rows: Literal["grid", "pixels"] = Field(
        "grid", description="rows of Â in the I2S semantic map: the affinity grid's cells (the trained cell-pair "
        "affinity; S on the grid), or every pixel of the class map against the cells (each pixel's embedding "
        "against the cells' pooled ones; S at the class map's resolution, closer to the paper's pixel-pair Â)")
    background_affinity: bool = Field(
        True, description="background cells are one more segment of A (affine to each other); false: every pair "
        "with background is a non-affinity pair")
    default_box: int = Field(16, ge=1, description="side of the default box of a point without a region, in pixels "
                             "of the original image (Sec. 3.1)")
    min_area: int = Field(4, ge=1, description="a Points-First instance with fewer pixels (original image) also "
                          "gets its default box")
    offset_weighting: Literal["uniform", "confidence"] = Field(
        "uniform", description="W of Eq. 3 (undefined in the paper): 1 on every pseudo-instance pixel, or (rounds "
        ">= 1) the network's mean probability of the instance's class over the instance (BESTIE's seg score)")
    uncertainty_temperature: float = Field(
        8.0, gt=0, description="pixels: softness of the point choice in the per-pixel instance probabilities "
        "whose top-two margin gives the uncertainty")
    net_batch: int = Field(8, ge=1, description="images per network forward when labelling a batch")
    input_size: int | None = Field(
        None, ge=32, multiple_of=32, description="side of the square input the network labels at (a multiple of the "
        "backbone's stride 32); null: the stage-1 image_size it was trained at. Larger gives a finer class map "
        "(image_size / head_stride per side) from the same weights (not in the paper; test-time resolution)")

    @model_validator(mode="after")
    def _source_grid_without_network(self) -> "P2SegConfig":
        if self.source_grid is not None and self.use_network:
            raise ValueError("source_grid views the stage-1 semantic map of the training-free labelling: set "
                             "use_network: false with it")
        return self

    @model_validator(mode="after")
    def _band_with_network(self) -> "P2SegConfig":
        if self.foreground_band > 0 and not self.use_network:
            raise ValueError("foreground_band redraws the network's foreground: with use_network: false the labels "
                             "are the semantic source's own map (give the source its own band, e.g. "
                             "semantic_params.foreground_band for epld)")
        return self

    @model_validator(mode="after")
    def _semantic_source_params(self) -> "P2SegConfig":
        source = generator_class(self.semantic_source)
        try:
            cfg = source.Config.model_validate(self.semantic_params)
        except Exception as e:  # noqa: BLE001 - re-raised naming the key
            raise ValueError(f"semantic_params (for semantic_source={self.semantic_source}): {e}") from None
        pending = issubclass(source, TrainableGenerator) and source.trains(cfg)
        if pending and self.semantic_train is None:
            raise ValueError(f"semantic_params: the stage-1 semantic map must come from a training-free generator "
                             f"or a trained checkpoint; {self.semantic_source} with {self.semantic_params} needs "
                             f"training (give semantic_params.checkpoint, or semantic_train to have the pipeline "
                             f"train it first; point2mask: maps: lowlevel)")
        if self.semantic_train is not None:
            if source.stage1 is None:
                raise ValueError(f"semantic_train: semantic_source={self.semantic_source} has no stage 1 to train")
            try:
                source.stage1.Config.model_validate(self.semantic_train)
            except Exception as e:  # noqa: BLE001 - re-raised naming the key
                raise ValueError(f"semantic_train (for semantic_source={self.semantic_source}): {e}") from None
        return self


class P2SegTrainConfig(EngineConfig):
    """Stage 1 of P2Seg: the network and its losses (Sec. 3.3, 4.1), on top of the engine's keys.

    Images are resized to ``image_size`` squared (aspect not kept) for training
    and for labelling, so the network sees the same geometry in both.
    """

    steps: int = Field(1000, ge=1, description="optimisation steps (paper: 50k on VOC, GPU)")
    batch_size: int = Field(4, ge=1, description="images per worker per step (paper: 8)")
    lr: float = Field(5e-4, gt=0, description="AdamW learning rate (paper 5e-5 over 50k steps; higher for CPU runs)")
    backbone: Literal["efficientnet_lite0", "mobilenet_v2"] = Field("efficientnet_lite0")
    pretrained: bool | str = Field(True, description="offline ImageNet weights, a local path, or false")
    class_map: Literal["classes", "agnostic"] = Field(
        "classes", description="class map C with c + 1 channels (the paper), or 2 (background / foreground): on a "
        "dataset with few images per class every click then trains the one foreground channel; the points still "
        "give every instance its class (Points First)")
    backbone_lr_scale: float = Field(
        1.0, ge=0, description="learning rate of the backbone relative to lr; 0 freezes it (weights and BN "
        "statistics: the ImageNet features, which noisy dense targets on a small dataset can only degrade)")
    width: int = Field(64, ge=8, description="neck and head channels")
    embed_dim: int = Field(32, ge=1, description="affinity embedding channels")
    image_size: int = Field(256, ge=32, description="square input side (multiple of 8)")
    head_stride: Literal[4, 8] = Field(
        8, description="output stride of the class, offset and embedding heads: 8, or 4 (the paper's HRNet): a "
        "class map of twice the side (64² at image_size 256), 1.1-1.3x the step time with a 32² affinity grid "
        "(benchmarks/p2seg_speed.py --head-stride 4 --grid 32)")
    affinity_grid: int = Field(32, ge=2, description="side of the affinity grid: N = grid² cells, N² pairs; "
                               "with i2s the semantic map is on this grid")
    affinity: Literal["grid", "window"] = Field(
        "grid", description="pairs of the affinity Â and of I2S: all cell pairs of the affinity_grid (the paper's "
        "all-pairs A, pooled), or every pixel of the head's map with its affinity_window² neighbours (our "
        "extension: hw·k² pairs at the class map's resolution)")
    affinity_window: int = Field(7, ge=3, description="side k of the window (odd) with affinity: window")
    affinity_dilation: int = Field(2, ge=1, description="dilation of the window with affinity: window (2: a "
                                   "7-window reaches ±6 cells, ±24 px at stride 4)")
    loss_stride: int = Field(4, ge=1, description="L_seg and L_off on the grid of this stride of the input")
    seg_weight: float = Field(1.0, ge=0, description="λ of L_seg (paper 1.0)")
    offset_weight: float = Field(0.01, ge=0, description="λ of L_off (paper 0.01)")
    affinity_weight: float = Field(1.0, ge=0, description="λ_I2S of L_I2S (paper 1.0)")
    point_weight: float = Field(
        0.0, ge=0, description="λ of the class-map cross-entropy at the clicks (stuff clicks: background), the "
        "authors' code's annotation loss; not in the paper's equations (0: off)")
    hard_pixel_ratio: float = Field(0.2, gt=0, le=1, description="fraction of hardest pixels in L_seg (Table 5: 0.2)")
    hflip: bool = Field(True, description="random horizontal flip (seeded by seed, epoch and image id)")

    @property
    def affinity_side(self) -> int:
        """Side of the instance-label map the affinity targets come from: the grid, or the head's map."""
        return self.affinity_grid if self.affinity == "grid" else self.image_size // self.head_stride

    @property
    def window(self) -> tuple[int, int] | None:
        """``(k, dilation)`` of the window affinity, None for the grid."""
        return (self.affinity_window, self.affinity_dilation) if self.affinity == "window" else None

    @model_validator(mode="after")
    def _geometry(self) -> "P2SegTrainConfig":
        if self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 (stride-8 heads), got {self.image_size}")
        if self.affinity_grid > self.image_size // self.head_stride:
            raise ValueError(f"affinity_grid={self.affinity_grid} is finer than the stride-{self.head_stride} map "
                             f"({self.image_size // self.head_stride}) of image_size={self.image_size}")
        if self.affinity_window % 2 == 0:
            raise ValueError(f"affinity_window must be odd, got {self.affinity_window}")
        if self.image_size % self.loss_stride:
            raise ValueError(f"loss_stride={self.loss_stride} must divide image_size={self.image_size}")
        return self
