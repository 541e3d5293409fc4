"""Steps 3 and 5 of Point2Mask on one image: things/stuff rule, transport, decoding.

:func:`point2mask_assignment` works on an image's maps at the working
resolution; :func:`label_image` wraps it into a :class:`PseudoLabel`, given a
function that makes the maps (training-free or from the network).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from pointseg.data.record import Category, Points
from pointseg.generators.base import PseudoLabel, SeedGroup, assemble, seed_groups
from pointseg.generators.point2mask.config import Point2MaskConfig
from pointseg.generators.point2mask.costs import class_edge_costs, cost_key, group_costs
from pointseg.generators.point2mask.maps import TransportMaps, finite_maps
from pointseg.generators.point2mask.supply import supplier_units
from pointseg.generators.psps import scaled_points, scaled_size, upsample_labels, upsample_map
from pointseg.geodesic import geodesic_distance
from pointseg.sinkhorn import transport
from pointseg.uncertainty import assigned_cost_ratio


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
                          cfg: Point2MaskConfig, costs_out: list | None = None) -> tuple[np.ndarray, dict]:
    """Segment index per pixel of the working grid, and the diagnostics.

    maps : the image's :class:`TransportMaps` at ``(h, w)``; sources : (P, 2)
    int (row, col) of the points on that grid; groups : the image's
    :func:`~pointseg.generators.base.seed_groups`.

    Returns ``assignment`` (h, w) int64 (index into ``groups``) and a JSON-able
    dict of diagnostics (module docstring). Things / stuff rule, supplier units
    and fallbacks: see the module docstring. ``costs_out``: a list that
    receives the (G, h, w) group cost volume of Eq. 3 (unreachable pixels at
    the finite fallback cost), for the uncertainty map.
    """
    counters = _Counters()
    maps, counters.nonfinite_map_pixels = finite_maps(maps)
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
            key = cost_key(maps, groups[gi].category_id, cfg.semantic_distance)
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
    if costs_out is not None:
        costs_out.append(costs)
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


def label_image(image: np.ndarray, points: Points, cfg: Point2MaskConfig, categories: dict[int, Category],
                make_maps: Callable[[np.ndarray, tuple[int, int], list[int]], TransportMaps]) -> PseudoLabel:
    """Point2Mask's pseudo label of one ``(H, W, 3) uint8`` image.

    ``make_maps(image, (h, w), present_category_ids)`` gives the maps at the
    working size ``(h, w) = downscale * (H, W)``. Bad input: package docstring.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    height, width = image.shape[:2]
    groups = seed_groups(points, categories)
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
    maps = make_maps(image, (h, w), sorted({g.category_id for g in groups}))
    costs: list = []
    assignment, diag = point2mask_assignment(maps, sources, groups, cfg, costs_out=costs)
    uncertainty = None
    if cfg.uncertainty:
        uncertainty = upsample_map(assigned_cost_ratio(costs[0], assignment), height, width)
    diag.update({"fullres_retry": fullres_retry, "scaled_size": [h, w], "seconds": time.perf_counter() - t0})
    return assemble(upsample_labels(assignment, height, width), groups, diag, uncertainty)
