"""Step 2 of Point2Mask: geodesic transport costs on the maps (Eq. 2-3)."""

from __future__ import annotations

import numpy as np

from pointseg.generators.base import SeedGroup
from pointseg.generators.point2mask.maps import TransportMaps
from pointseg.geodesic import edge_costs, geodesic_distance

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
        by_class.setdefault(cost_key(maps, g.category_id, semantic_distance), []).append(gi)
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


def cost_key(maps: TransportMaps, category_id: int, semantic_distance: str) -> int:
    """Edge costs are per class only on class channels with ``semantic_distance="class"``."""
    return category_id if maps.channel_of is not None and semantic_distance == "class" else -1
