"""Point2Mask's settings: every ablation knob of Tables 3-7 and A2-A3 (labelling), and stage 1.

:class:`Point2MaskConfig` is ``generator.params``; ``checkpoint`` / ``device``
come from :class:`~pointseg.generators.base.TrainableGeneratorConfig` (the
MapNet of ``maps="learned"``). :class:`Point2MaskTrainConfig` is
``generator.train``: the map network and its training (Sec. 3.4.1).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pointseg.generators.base import TrainableGeneratorConfig
from pointseg.losses.point2mask import Point2MaskLossConfig
from pointseg.sinkhorn import SOLVERS
from pointseg.train.engine import EngineConfig


class Point2MaskConfig(TrainableGeneratorConfig):
    """Every ablation knob of Point2Mask Tables 3-7 and A2-A3 is a key here."""

    maps: Literal["lowlevel", "learned"] = Field("lowlevel", description="training-free LAB/Sobel maps or a MapNet checkpoint")
    input_max_side: int | None = Field(None, ge=32, description="square MapNet input size; default: the checkpoint's training image_size")
    boundary_maps: Literal["low", "high", "both"] = Field("both", description="P^b terms with learned maps (Table 3); lowlevel uses 'low'")
    assignment: Literal["ot", "mincost"] = Field("ot", description="optimal transport or minimum cost (Table 7)")
    supplier_scheme: Literal["equal", "nearest_point", "nearest_centroid"] = Field("nearest_centroid", description="k of Eq. 4 (Table 5)")
    centroid_iters: int = Field(1, ge=0, description="centroid updates of the nearest-centroid scheme (Table 6)")
    centroid_core: float = Field(
        1.0, gt=0, le=1, description="centroid of the cheapest fraction of each initial mask (1: the whole mask, Eq. 4)")
    thing_competition: Literal["things", "class"] = Field("things", description="things compete per class, or all things at once")
    solver: str = Field("exact", description="pointseg.sinkhorn solver: exact | sinkhorn_log | reference")
    n_iter: int = Field(80, ge=1, description="Sinkhorn iterations T (Table A2; sinkhorn_log: budget)")
    eps: float = Field(1e-3, gt=0, description="entropic regularisation lambda, in units of the (normalised) cost")
    ot_dtype: Literal["float64", "float32"] = Field("float64", description="float type of the transport solve")
    normalize_cost: bool = Field(True, description="divide each problem's cost by its max, so eps is relative")
    on_diverge: Literal["fallback", "raise"] = Field("fallback", description="diverged solve: keep MinCost labels (counted) or raise")
    beta: float = Field(0.1, ge=0, description="boundary weight of Eq. 3 (Table A3)")
    downscale: float = Field(0.5, gt=0, le=1, description="maps, costs and transport at this fraction of the size")
    blur_sigma: float = Field(0.5, ge=0, description="Gaussian blur before LAB (low-level maps), scaled-image pixels")
    use_semantic: bool = Field(True, description="the d^s term (P^s or its LAB substitute), Table 3")
    use_boundary: bool = Field(True, description="the d^b term (P^b), Table 3")
    semantic_distance: Literal["class", "l1"] = Field(
        "class", description="d^s on the supplier's class channel of P^s, or the L1 norm over all channels (authors' code)")
    min_supply: int = Field(1, ge=1, description="smallest k of a supplier (zero-k fallback)")
    feature_weight: float = Field(
        0.0, ge=0, description="learned maps: adds feature_weight * ||LAB(k) - LAB(l)|| to every edge (the authors' "
        "code adds lambda_feat * an instance-feature difference; LAB colour stands in for that embedding). 0: Eq. 2 alone")
    semantic_classes: Literal["present", "all"] = Field(
        "present", description="learned P^s: softmax over the classes among the image's points (image-level labels, "
        "the authors' code masks P^s with them) or over all classes")
    uncertainty: bool = Field(
        True, description="per-pixel uncertainty of the label (pointseg.uncertainty.assigned_cost_ratio of the "
        "group costs, Eq. 3): the review page's worst-first order and next-click suggestions")

    @field_validator("solver")
    @classmethod
    def _known_solver(cls, v: str) -> str:
        if v not in SOLVERS:
            raise ValueError(f"unknown solver {v!r}; choose from {sorted(SOLVERS)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Point2MaskConfig":
        if not (self.use_semantic or self.use_boundary):
            raise ValueError("use_semantic and use_boundary are both false: every cost would be zero")
        return self


class Point2MaskTrainConfig(EngineConfig):
    """Stage 1 of ``maps="learned"``: MapNet (``P^s``, ``P^b_high``) trained on the points.

    ``L = L_partial + alpha_1 L_sem^LAB + alpha_2 L_sem^RGB + L_bou`` (Sec. 3.4.1,
    Eq. 5-8 without ``L_full``); ``L_bou`` (Eq. 6-7) is trained against the
    pseudo masks of the current maps, recomputed for an image when they are
    ``pseudo_every`` steps old, from ``pseudo_start`` on. Images are resized to
    ``image_size`` squared (aspect not kept) for training and, by default, for
    labelling. Defaults are CPU-sized.
    """

    steps: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (paper: 1e-4 VOC, 2e-4 COCO on GPUs; 1e-3 trains "
                      "P^s best on a CPU budget, README Measured)")
    max_grad_norm: float | None = Field(5.0, gt=0)
    run_name: str = "point2mask_maps"
    image_size: int = Field(128, ge=32, description="square training (and default labelling) size of the network")
    backbone: Literal["efficientnet_lite0", "mobilenet_v2"] = "efficientnet_lite0"
    pretrained: bool = Field(True, description="offline ImageNet weights (False: random init, explicit)")
    width: int = Field(64, ge=8, description="MapNet neck / decoder channels")
    pseudo_every: int = Field(20, ge=1, description="K: recompute an image's pseudo labels when K steps old")
    pseudo_start: int = Field(40, ge=0, description="first step with L_bou (semantic map warm-up)")
    loss: Point2MaskLossConfig = Field(default_factory=Point2MaskLossConfig)
