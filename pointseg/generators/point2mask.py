"""Point2Mask: panoptic pseudo labels by optimal transport from points to pixels.

Li et al., "Point2Mask: Point-supervised Panoptic Segmentation via Optimal
Transport", ICCV 2023, Sec. 3.3 and Algorithm 1. Per image:

1. **Maps** (Sec. 3.3.1), at ``downscale`` of the image:

   * ``maps="lowlevel"`` (training-free): the LAB image (divided by 100) stands
     in for the semantic map ``P^s`` and the normalised LAB Sobel map for the
     boundary map ``P^b`` (``P^b_low``; Structured Edges is not available
     offline, see :mod:`pointseg.lowlevel`). LAB has no class channels, so all
     classes share one edge-cost map.
   * ``maps="learned"``: a trained :class:`~pointseg.models.map_net.MapNet`
     checkpoint (:func:`pointseg.train.point2mask_maps.load_map_net`), loaded
     once in ``__init__``: ``P^s`` = softmax of its semantic logits,
     ``P^b_high`` its boundary map; ``boundary_maps`` picks ``P^b_high``,
     ``P^b_low`` or both (their ``d^b`` terms add, as in the authors' code).
     With ``semantic_classes="present"`` (default) ``P^s`` is the softmax over
     the classes among the image's points only (the image-level labels the
     points give; the authors' code multiplies ``P^s`` by them), which is also
     what the map losses train (:class:`pointseg.losses.Point2MaskLossConfig`
     ``present_classes``). ``feature_weight > 0`` adds the authors' code's
     ``lambda_feat * diff_feat`` edge term with the LAB colour as the feature
     (their learned instance embedding is not reproduced); 0 = Eq. 2 alone.

2. **Cost** (Eq. 2-3): the geodesic cost on the 8-connected graph with edge
   length ``|P^s_c(k) - P^s_c(l)| + beta * max(P^b(k), P^b(l))``, where ``c`` is
   the class of the supplier: one edge-cost map per distinct class among the
   points, one :func:`pointseg.geodesic.geodesic_distance` call per class with
   all that class's points as sources. A segment with several points (P10)
   costs the minimum over its points. ``semantic_distance="l1"`` uses instead
   ``sum_c |P^s_c(k) - P^s_c(l)|`` over all class channels, one edge-cost map
   for every class, as the authors' code does (``neighbour_diff(probs, 'l1')``);
   on the synthetic set with learned maps ``"class"`` scores higher (MinCost
   PQ_th 45.7 against 40.1, ``benchmarks/point2mask_ablation.py``).

3. **Things and stuff** (the rule of the authors' code, where stuff pixels are
   decided by the semantic prediction and only thing instances enter the
   transport): first every pixel takes the segment of minimum cost (MinCost,
   PSPS). Pixels whose minimum-cost segment is **stuff** keep it: stuff
   segments are MinCost segments. Pixels whose minimum-cost segment is a
   **thing** are the demanders; the thing segments compete for them by OT:
   with ``thing_competition="things"`` (default, the authors' code) all thing
   segments compete for all thing pixels in one problem; with ``"class"`` the
   things of each class compete for the pixels MinCost gave to things of that
   class (one problem per class: the ambiguous pixels of Point2Mask's Fig. 2
   lie between same-class instances). ``"things"`` measured 0.5-0.9 PQ_th
   higher on the synthetic set (``benchmarks/point2mask_ablation.py``).

4. **Supplier units** ``k`` (Eq. 4, Table 5), per transport problem over its
   ``n`` pixels: ``"equal"`` -- ``n / m``; ``"nearest_point"`` -- the sizes of
   the MinCost masks; ``"nearest_centroid"`` -- ``centroid_iters`` times: move
   each supplier to the centroid of its current mask, recompute the geodesic
   costs from the centroids and reassign the problem's pixels by minimum cost;
   ``k`` are the final mask sizes. ``centroid_core < 1`` (our extension, not
   the paper's) takes each centroid over the cheapest ``centroid_core``
   fraction of the mask's pixels, so a mask that floods a large region does
   not drag its centroid out of the object. A centroid that lies outside its own mask
   (non-convex or split masks) falls back to the segment's point(s) (the
   authors' code crashes there); counted in ``diagnostics["centroid_fallbacks"]``.
   The transport cost stays the cost from the points (Eq. 3).

5. **Transport** (Eq. 1, Appendix A) with :func:`pointseg.sinkhorn.transport`
   (``solver``: ``"exact"`` default, ``"sinkhorn_log"``, or ``"reference"``,
   the paper's T = ``n_iter`` = 80 update with ``eps``), decoded by argmax
   (Algorithm 1, line 10). With ``normalize_cost`` the costs of a problem are
   divided by their maximum, so ``eps`` is relative to the cost range.
   ``assignment="mincost"`` skips the transport (Table 7's MC baseline on the
   same costs).

Bad input, per image (a ``ValueError`` names the field; otherwise a documented
fallback, counted in ``diagnostics``):

* a point with a non-finite coordinate or whose pixel ``(round(y), round(x))``
  is outside the image -- it reaches no pixel of the image: error (the
  pipeline drops such points first, :func:`pointseg.data.points.validate_points`);
* an unreachable pixel (infinite geodesic cost; cannot happen with finite
  maps, guarded anyway): its cost is set to ``10 * max finite cost + 1``
  (``unreachable_costs``);
* a supplier whose ``k`` rounds to zero: raised to ``min_supply`` pixels taken
  from the largest supplier (``zero_supply_raised``); a problem with more
  suppliers than pixels keeps its MinCost labels (``ot_skipped``);
* a seed pixel that the transport gives to another segment is given back to
  its segment (``seed_pixels_restored``): a point label is ground truth;
* all points on one pixel of the working grid with two or more segments:
  retried at full resolution (``fullres_retry``); if they still share one pixel
  the segments cannot be told apart: error;
* NaN / inf in a map (learned maps): filled from the nearest finite pixel
  (``nonfinite_map_pixels``); a map with more than half its pixels non-finite
  is an error;
* a diverged solve (eps too small for ``ot_dtype``, e.g. 1e-40 in float32): never decoded; the problem
  keeps its MinCost labels and ``ot_diverged`` counts it (``on_diverge="raise"``
  makes it an error).

Diagnostics per image: ``marginal_error_row`` / ``marginal_error_col`` (max over
the image's transport problems, pixel units), ``ot_iterations`` (max),
``plan_entropy`` (sum), ``diverged``, ``converged``, ``solver``,
``supplier_units`` and the counters above.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from scipy import ndimage

from pointseg.data.record import Points
from pointseg.generators.base import GeneratorConfig, PseudoLabel, PseudoLabelGenerator, SeedGroup, assemble, seed_groups
from pointseg.generators.psps import low_level_maps, scaled_points, scaled_size, upsample_labels
from pointseg.geodesic import edge_costs, geodesic_distance
from pointseg.sinkhorn import SOLVERS, transport

__all__ = [
    "Point2MaskConfig",
    "Point2MaskGenerator",
    "TransportMaps",
    "class_edge_costs",
    "group_costs",
    "supplier_units",
    "point2mask_assignment",
]


class Point2MaskConfig(GeneratorConfig):
    """Every ablation knob of Point2Mask Tables 3-7 and A2-A3 is a key here."""

    maps: Literal["lowlevel", "learned"] = Field("lowlevel", description="training-free LAB/Sobel maps or a MapNet checkpoint")
    checkpoint: str | None = Field(None, description="MapNet checkpoint (maps='learned'), from train_map_net")
    device: str = Field("cpu", description="torch device of the map network")
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


@dataclass
class TransportMaps:
    """The task-oriented maps of one image at the working resolution ``(h, w)``.

    semantic : (S, h, w) float -- ``P^s`` (S = number of classes, class channels)
        or, for low-level maps, the LAB image (S = 3, one shared "channel").
    boundary : (h, w) float >= 0 -- ``P^b`` (sum of the chosen boundary maps'
        ``max`` terms is formed in :func:`class_edge_costs`), or ``None``.
    boundary_extra : (h, w) or None -- a second boundary map whose ``d^b`` term adds.
    channel_of : category id -> channel index of ``semantic``; ``None`` means
        every class uses all channels (the Euclidean norm over LAB).
    feature, feature_weight : (F, h, w) or None -- a feature map whose Euclidean
        neighbour difference, times ``feature_weight``, adds to every edge (the
        authors' code's ``lambda_feat * diff_feat`` term; LAB colour here).
    """

    semantic: np.ndarray
    boundary: np.ndarray | None
    boundary_extra: np.ndarray | None = None
    channel_of: dict[int, int] | None = None
    feature: np.ndarray | None = None
    feature_weight: float = 0.0


def _fill_nonfinite(a: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """Replace NaN / inf pixels of a ``(..., h, w)`` map by their nearest finite pixel."""
    a = np.asarray(a, dtype=np.float64)
    bad = ~np.isfinite(a)
    if a.ndim == 3:
        bad_px = bad.any(0)
    else:
        bad_px = bad
    n_bad = int(bad_px.sum())
    if n_bad == 0:
        return a, 0
    if n_bad * 2 > bad_px.size:
        raise ValueError(f"{name}: {n_bad} of {bad_px.size} pixels are NaN or inf; the map is unusable")
    _, (ri, ci) = ndimage.distance_transform_edt(bad_px, return_indices=True)
    return a[..., ri, ci], n_bad


def _finite_maps(maps: TransportMaps) -> tuple[TransportMaps, int]:
    """``maps`` with NaN / inf pixels filled from the nearest finite pixel, and their count."""
    sem, n = _fill_nonfinite(maps.semantic, "P^s (semantic map)")
    out = [sem]
    for name, b in (("P^b (boundary map)", maps.boundary), ("second boundary map", maps.boundary_extra)):
        if b is None:
            out.append(None)
            continue
        b, nb = _fill_nonfinite(b, name)
        n += nb
        out.append(np.clip(b, 0.0, None))
    return TransportMaps(out[0], out[1], out[2], maps.channel_of, maps.feature, maps.feature_weight), n


def class_edge_costs(maps: TransportMaps, category_id: int, beta: float, use_semantic: bool = True,
                     use_boundary: bool = True, semantic_distance: str = "class") -> np.ndarray:
    """Edge lengths for suppliers of class ``category_id`` (Point2Mask Eq. 2).

    ``cost[d, k] = |P^s_c(k) - P^s_c(l)| + beta * max(P^b(k), P^b(l))`` for the
    neighbour ``l`` of ``k`` in direction ``d`` (plus ``beta * max`` of
    ``boundary_extra`` when given). Returns ``(8, h, w)`` float64, see
    :func:`pointseg.geodesic.edge_costs`.

    ``semantic_distance="l1"`` replaces the class channel by the L1 norm over
    all channels, ``sum_c |P^s_c(k) - P^s_c(l)|``, the same for every class
    (the authors' code, ``neighbour_diff(probs, 'l1')``); it needs class
    channels (learned maps). LAB maps always use the Euclidean norm.
    """
    if maps.channel_of is not None and semantic_distance == "l1":
        zeros = np.zeros(maps.semantic.shape[-2:])
        cost = sum(edge_costs(ch) for ch in maps.semantic) if use_semantic else edge_costs(zeros)
        if use_boundary:
            for b in (maps.boundary, maps.boundary_extra):
                if b is not None:
                    cost = cost + edge_costs(zeros, b, beta=beta)
        return _with_feature(cost, maps)
    if maps.channel_of is None:
        feats = maps.semantic
    else:
        if category_id not in maps.channel_of:
            raise ValueError(f"category {category_id} has no channel in the semantic map (checkpoint categories)")
        feats = maps.semantic[maps.channel_of[category_id]]
    if not use_semantic:
        feats = np.zeros(maps.semantic.shape[-2:])
    b = maps.boundary if use_boundary else None
    cost = edge_costs(feats, b, beta=beta if b is not None else 0.0)
    if use_boundary and maps.boundary_extra is not None:
        # Point2Mask Eq. 2 with P^b_high and P^b_low: the two d^b terms add
        cost = cost + edge_costs(np.zeros(maps.semantic.shape[-2:]), maps.boundary_extra, beta=beta)
    return _with_feature(cost, maps)


def _with_feature(cost: np.ndarray, maps: TransportMaps) -> np.ndarray:
    """``cost + feature_weight * ||f(k) - f(l)||`` when the maps carry a feature map."""
    if maps.feature is None or maps.feature_weight <= 0:
        return cost
    return cost + maps.feature_weight * edge_costs(maps.feature)


def group_costs(maps: TransportMaps, sources: np.ndarray, groups: list[SeedGroup], beta: float,
                use_semantic: bool = True, use_boundary: bool = True, semantic_distance: str = "class") -> np.ndarray:
    """Geodesic cost ``c_ij`` of every segment to every pixel (Point2Mask Eq. 3).

    sources : (P, 2) int (row, col) of the points on the working grid.
    Returns ``(G, h, w)`` float64: ``min`` over the segment's points of the
    geodesic distance on the edge costs of the segment's class. One
    :func:`~pointseg.geodesic.geodesic_distance` call per class (one in all
    when the edge costs do not depend on the class, :func:`_cost_key`).
    """
    h, w = maps.semantic.shape[-2:]
    out = np.full((len(groups), h, w), np.inf)
    by_class: dict[int, list[int]] = {}
    for gi, g in enumerate(groups):
        by_class.setdefault(_cost_key(maps, g.category_id, semantic_distance), []).append(gi)
    for cat, gis in by_class.items():
        cost = class_edge_costs(maps, groups[gis[0]].category_id, beta, use_semantic, use_boundary, semantic_distance)
        pidx = np.concatenate([groups[gi].point_index for gi in gis])
        dist = geodesic_distance(cost, sources[pidx])
        start = 0
        for gi in gis:
            n = len(groups[gi].point_index)
            out[gi] = dist[start : start + n].min(0)
            start += n
    return out


def _cost_key(maps: TransportMaps, category_id: int, semantic_distance: str) -> int:
    """Edge costs are per class only on class channels with ``semantic_distance="class"``."""
    return category_id if maps.channel_of is not None and semantic_distance == "class" else -1


def _centroid_sources(masks_of: np.ndarray, members: np.ndarray, point_rc: list[np.ndarray],
                      cost_of=None, core: float = 1.0) -> tuple[list[np.ndarray], int]:
    """Centroid pixel of each member's mask; its point(s) when the centroid is outside the mask.

    ``core < 1``: the centroid of the mask's ``core`` fraction of pixels with the
    lowest cost from the member's current source(s) (``cost_of(slot)`` (h, w)).
    """
    out, fallbacks = [], 0
    for slot, gi in enumerate(members):
        ys, xs = np.nonzero(masks_of == slot)
        if len(ys) and core < 1.0 and cost_of is not None:
            c = cost_of(slot)[ys, xs]
            keep = c <= np.quantile(c, core)
            ys, xs = ys[keep], xs[keep]
        if len(ys):
            r, c = int(round(ys.mean())), int(round(xs.mean()))
            if masks_of[r, c] == slot:
                out.append(np.array([[r, c]]))
                continue
        fallbacks += 1
        out.append(point_rc[gi])
    return out, fallbacks


def supplier_units(scheme: str, costs: np.ndarray, scope: np.ndarray, members: np.ndarray,
                   recompute_costs, point_rc: list[np.ndarray], centroid_iters: int = 1,
                   centroid_core: float = 1.0) -> tuple[np.ndarray, int]:
    """Supplier sizes ``k`` of one transport problem (Point2Mask Eq. 4, Table 5).

    costs : (G, h, w) segment costs from the points; scope : (h, w) bool, the
    problem's pixels; members : (m,) segment indices competing for them.
    ``recompute_costs(gi, sources)`` returns the ``(h, w)`` cost of segment
    ``gi`` from other source pixels (for the centroid scheme).

    Returns ``k`` (m,) int64 summing to ``scope.sum()``, and the number of
    centroid fallbacks.
    """
    n = int(scope.sum())
    m = len(members)
    if scheme == "equal":
        k = np.full(m, n // m, np.int64)
        k[: n - k.sum()] += 1
        return k, 0
    sub = costs[members][:, scope]  # (m, n)
    lab = sub.argmin(0)  # Eq. 4: N_ij = 1 if argmin_i c_ij = i
    fallbacks = 0
    if scheme == "nearest_centroid":
        for _ in range(centroid_iters):
            masks_of = np.full(scope.shape, -1, np.int64)
            masks_of[scope] = lab
            full = np.full(scope.shape, np.inf)

            def cost_of(slot: int, sub=sub, full=full) -> np.ndarray:
                full[scope] = sub[slot]
                return full

            cent, fb = _centroid_sources(masks_of, members, point_rc, cost_of, centroid_core)
            fallbacks += fb
            sub = np.stack([recompute_costs(gi, src)[scope] for gi, src in zip(members, cent)])
            lab = sub.argmin(0)
    elif scheme != "nearest_point":
        raise ValueError(f"supplier_scheme: unknown scheme {scheme!r}")
    return np.bincount(lab, minlength=m).astype(np.int64), fallbacks


@dataclass
class _Counters:
    unreachable_costs: int = 0
    zero_supply_raised: int = 0
    ot_skipped: int = 0
    ot_diverged: int = 0
    centroid_fallbacks: int = 0
    seed_pixels_restored: int = 0
    nonfinite_map_pixels: int = 0
    problems: list = field(default_factory=list)


def _raise_min_supply(k: np.ndarray, min_supply: int, c: _Counters) -> np.ndarray:
    k = k.copy()
    for i in np.flatnonzero(k < min_supply):
        need = min_supply - k[i]
        donor = int(np.argmax(k))
        if k[donor] - need < min_supply:
            break
        k[donor] -= need
        k[i] += need
        c.zero_supply_raised += 1
    return k


def point2mask_assignment(maps: TransportMaps, sources: np.ndarray, groups: list[SeedGroup],
                          cfg: Point2MaskConfig) -> tuple[np.ndarray, dict]:
    """Segment index per pixel of the working grid, and the diagnostics.

    maps : the image's :class:`TransportMaps` at ``(h, w)``; sources : (P, 2)
    int (row, col) of the points on that grid; groups : the image's
    :func:`~pointseg.generators.base.seed_groups`.

    Returns ``assignment`` (h, w) int64 (index into ``groups``) and a JSON-able
    dict of diagnostics (module docstring). Things / stuff rule, supplier units
    and fallbacks: see the module docstring.
    """
    counters = _Counters()
    maps, counters.nonfinite_map_pixels = _finite_maps(maps)
    costs = group_costs(maps, sources, groups, cfg.beta, cfg.use_semantic, cfg.use_boundary, cfg.semantic_distance)
    unreachable = ~np.isfinite(costs)
    if unreachable.any():
        counters.unreachable_costs = int(unreachable.sum())
        finite_max = float(costs[~unreachable].max()) if (~unreachable).any() else 0.0
        costs = np.where(unreachable, 10.0 * finite_max + 1.0, costs)
    mincost = costs.argmin(0)  # MinCost / PSPS (Table 7 "MC")
    assignment = mincost.copy()
    point_rc = [sources[g.point_index] for g in groups]
    isthing = np.array([g.isthing for g in groups])
    if cfg.assignment == "ot" and isthing.any():
        thing_px = isthing[mincost]
        if cfg.thing_competition == "class":
            problems = []
            for cat in sorted({g.category_id for g in groups if g.isthing}):
                members = np.array([gi for gi, g in enumerate(groups) if g.isthing and g.category_id == cat])
                problems.append((members, thing_px & np.isin(mincost, members)))
        else:
            problems = [(np.flatnonzero(isthing), thing_px)]
        cost_cache: dict[int, np.ndarray] = {}

        def recompute(gi: int, src: np.ndarray) -> np.ndarray:
            key = _cost_key(maps, groups[gi].category_id, cfg.semantic_distance)
            if key not in cost_cache:
                cost_cache[key] = class_edge_costs(maps, groups[gi].category_id, cfg.beta, cfg.use_semantic,
                                                   cfg.use_boundary, cfg.semantic_distance)
            return geodesic_distance(cost_cache[key], src).min(0)

        for members, scope in problems:
            _solve_problem(costs, scope, members, recompute, point_rc, cfg, counters, assignment)
        # Seed pixels are ground truth: give them back to their segment.
        for gi, rc in enumerate(point_rc):
            wrong = assignment[rc[:, 0], rc[:, 1]] != gi
            if wrong.any() and groups[gi].isthing:
                counters.seed_pixels_restored += int(wrong.sum())
                assignment[rc[wrong, 0], rc[wrong, 1]] = gi
    diag = _diagnostics(counters, cfg)
    return assignment, diag


def _solve_problem(costs, scope, members, recompute, point_rc, cfg, counters, assignment) -> None:
    """One transport problem: ``members`` compete for the pixels ``scope``; writes ``assignment``."""
    m, n = len(members), int(scope.sum())
    if m < 2 or n == 0:
        return  # a single supplier takes its MinCost pixels: nothing to transport
    if m > n:
        counters.ot_skipped += 1
        return
    k, fb = supplier_units(cfg.supplier_scheme, costs, scope, members, recompute, point_rc, cfg.centroid_iters,
                           cfg.centroid_core)
    counters.centroid_fallbacks += fb
    k = _raise_min_supply(k, cfg.min_supply, counters)
    C = costs[members][:, scope]
    if cfg.normalize_cost:
        C = C / max(float(C.max()), 1e-12)
    kw: dict = {"on_diverge": "flag"}
    if cfg.solver != "exact":
        kw.update(eps=cfg.eps, n_iter=cfg.n_iter, return_plan=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # divergence is counted below, not warned
        dtype = torch.float64 if cfg.ot_dtype == "float64" else torch.float32
        res = transport(torch.from_numpy(C).to(dtype), torch.from_numpy(k.astype(np.float64)).to(dtype), method=cfg.solver, **kw)
    diverged = bool(res.diverged)
    counters.problems.append(
        {
            "m": m,
            "n": n,
            "k": k.tolist(),
            "marginal_error_row": float(res.marginal_error_row),
            "marginal_error_col": float(res.marginal_error_col),
            "iterations": int(res.n_iter),
            "entropy": float(res.entropy),
            "converged": bool(res.converged),
            "diverged": diverged,
        }
    )
    if diverged:
        if cfg.on_diverge == "raise":
            raise FloatingPointError(
                f"transport ({cfg.solver}, eps={cfg.eps:g}) diverged on a problem of {m} suppliers x {n} pixels"
            )
        counters.ot_diverged += 1
        return  # keep the MinCost labels: a diverged plan is never decoded
    labels = res.labels.numpy()
    assignment[scope] = members[labels]


def _diagnostics(c: _Counters, cfg: Point2MaskConfig) -> dict:
    probs = c.problems
    return {
        "solver": cfg.solver if cfg.assignment == "ot" else "mincost",
        "ot_problems": len(probs),
        "marginal_error_row": max((p["marginal_error_row"] for p in probs), default=0.0),
        "marginal_error_col": max((p["marginal_error_col"] for p in probs), default=0.0),
        "ot_iterations": max((p["iterations"] for p in probs), default=0),
        "plan_entropy": float(sum(p["entropy"] for p in probs)),
        "converged": all(p["converged"] for p in probs),
        "diverged": any(p["diverged"] for p in probs),
        "supplier_units": [p["k"] for p in probs],
        "unreachable_costs": c.unreachable_costs,
        "zero_supply_raised": c.zero_supply_raised,
        "ot_skipped": c.ot_skipped,
        "ot_diverged": c.ot_diverged,
        "centroid_fallbacks": c.centroid_fallbacks,
        "seed_pixels_restored": c.seed_pixels_restored,
        "nonfinite_map_pixels": c.nonfinite_map_pixels,
    }


def _check_points(points: Points, height: int, width: int) -> None:
    xy = points.xy
    bad = ~np.isfinite(xy).all(1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"points.xy[{i}] = {xy[i].tolist()} is not finite ({int(bad.sum())} such points)")
    rc = np.rint(xy[:, ::-1])  # the pixel rule of Points.pixels / validate_points
    out = (rc[:, 0] < 0) | (rc[:, 0] >= height) | (rc[:, 1] < 0) | (rc[:, 1] >= width)
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise ValueError(
            f"points.xy[{i}] = {xy[i].tolist()} lies outside the {height}x{width} image and reaches no pixel "
            f"({int(out.sum())} such points)"
        )


class Point2MaskGenerator(PseudoLabelGenerator):
    """Point2Mask pseudo labels (module docstring): maps -> geodesic costs -> OT -> argmax."""

    name = "point2mask"
    Config = Point2MaskConfig

    def __init__(self, config, categories, net=None, net_categories: list[int] | None = None):
        """``net`` / ``net_categories``: an in-memory MapNet instead of ``checkpoint``
        (used while training it, :mod:`pointseg.train.point2mask_maps`)."""
        super().__init__(config, categories)
        cfg = self.config
        self.net = net
        self.net_categories = list(net_categories or [])
        self.net_size: int | None = cfg.input_max_side
        if cfg.maps == "learned" and net is None:
            if not cfg.checkpoint:
                raise ValueError("checkpoint: maps='learned' needs a MapNet checkpoint path")
            from pointseg.train.point2mask_maps import load_map_net

            self.net, meta = load_map_net(cfg.checkpoint, device=cfg.device)
            self.net_categories = list(meta["categories"])
            self.net_size = cfg.input_max_side or meta["config"].get("image_size")
        if cfg.maps == "learned":
            missing = sorted(set(categories) - set(self.net_categories))
            if missing:
                raise ValueError(f"checkpoint {cfg.checkpoint}: no semantic channel for category id(s) {missing}")

    # ------------------------------------------------------------------ maps
    def maps(self, image: np.ndarray, size: tuple[int, int], net_maps=None, present=None) -> TransportMaps:
        """The task-oriented maps of ``image`` at ``size = (h, w)``.

        ``present``: the category ids among the image's points; with
        ``semantic_classes="present"`` (learned maps) ``P^s`` is renormalised
        over their channels.

        ``net_maps``: optional precomputed ``(P^s (C, H', W'), P^b_high (H', W'))``
        (softmax probabilities and boundary at any resolution) instead of a
        forward pass of the network.
        """
        cfg = self.config
        lab, low = low_level_maps(image, size, cfg.blur_sigma)
        if cfg.maps == "lowlevel":
            return TransportMaps(lab, low)
        if net_maps is None:
            net_maps = self._net_maps(image)
        sem, high = (np.asarray(m, dtype=np.float64) for m in net_maps)
        channel_of = {c: i for i, c in enumerate(self.net_categories)}
        if cfg.semantic_classes == "present" and present is not None:
            # P^s over the image-level classes (those among the points): the
            # softmax restricted to them, i.e. the probabilities renormalised.
            keep = sorted({channel_of[int(c)] for c in present if int(c) in channel_of})
            if keep:
                sub = sem[keep]
                sem = sub / np.maximum(sub.sum(0, keepdims=True), 1e-12)
                channel_of = {c: keep.index(i) for c, i in channel_of.items() if i in keep}
        h, w = size
        sem = np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) for c in sem])
        high = cv2.resize(high, (w, h), interpolation=cv2.INTER_LINEAR)
        boundary, extra = {"low": (low, None), "high": (high, None), "both": (high, low)}[cfg.boundary_maps]
        feature = lab if cfg.feature_weight > 0 else None
        return TransportMaps(sem, boundary, extra, channel_of, feature, cfg.feature_weight)

    @torch.no_grad()
    def _net_maps(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Softmax ``P^s`` (C, S, S) and ``P^b_high`` (S, S) at the network's square input size S."""
        inp = image
        if self.net_size and image.shape[:2] != (self.net_size, self.net_size):
            inp = cv2.resize(image, (self.net_size, self.net_size), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(np.ascontiguousarray(inp)).permute(2, 0, 1)[None].float().div(255).to(self.config.device)
        out = self.net(x)
        return out["sem_logits"].softmax(1)[0].cpu().double().numpy(), out["boundary"][0, 0].cpu().double().numpy()

    # -------------------------------------------------------------- generate
    def generate(self, image: np.ndarray, points: Points, net_maps=None) -> PseudoLabel:
        """Label one image (``net_maps``: see :meth:`maps`)."""
        cfg = self.config
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
        height, width = image.shape[:2]
        groups = seed_groups(points, self.categories)
        if not groups:
            raise ValueError("image has no points")
        _check_points(points, height, width)
        t0 = time.perf_counter()
        h, w = scaled_size(height, width, cfg.downscale)
        sources = scaled_points(points, height, width, h, w)
        fullres_retry = 0
        if len(groups) > 1 and (sources == sources[0]).all():
            # all points on one working pixel: retry at full resolution
            h, w = height, width
            sources = scaled_points(points, height, width, h, w)
            fullres_retry = 1
            if (sources == sources[0]).all():
                raise ValueError(
                    f"all {len(points)} points of {len(groups)} segments lie on pixel "
                    f"{tuple(sources[0].tolist())}: the segments cannot be told apart"
                )
        maps = self.maps(image, (h, w), net_maps, present=sorted({g.category_id for g in groups}))
        assignment, diag = point2mask_assignment(maps, sources, groups, cfg)
        diag.update(
            {
                "fullres_retry": fullres_retry,
                "scaled_size": [h, w],
                "seconds": time.perf_counter() - t0,
            }
        )
        return assemble(upsample_labels(assignment, height, width), groups, diag)
