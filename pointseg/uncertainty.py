"""How sure a pseudo label is, pixel by pixel, without ground truth; and where the next click helps.

Every score is a map ``u`` of shape ``(H, W)`` with values in ``[0, 1]``: 0 where
the method had one clear answer, 1 where two answers tied (or where it had none).
Each generator fills :attr:`~pointseg.generators.base.PseudoLabel.uncertainty`
with the score that fits how it decides:

=======================  =============================================  ==========================
score                    equation (per pixel ``p``)                     generators
=======================  =============================================  ==========================
:func:`distance_ratio`   ``u = D_1 / D_2 = 1 - (D_2 - D_1) / D_2``      PSPS, Voronoi (nearest
                         (one minus the relative gap between the         source by a distance)
                         nearest and second-nearest label's distance)
:func:`cost_gap`         the same on a cost volume ``C[i, p]``: best    (supplier costs)
                         and second-best supplier cost
:func:`assigned_cost_ratio`  ``min(1, C[a(p), p] / min_{i!=a} C[i, p])``   Point2Mask (default: the
                         for the supplier ``a(p)`` the pixel was given  group costs of Eq. 3)
:func:`transport_entropy`  ``u = -sum_i q_i log q_i / log N``,          (a transport plan)
                         ``q_i = T[i, p] / sum_j T[j, p]``
:func:`margin_uncertainty`  ``u = 1 - (P_(1) - P_(2))``, top-two mask   EPLD, P2Seg, EXITS
                         probabilities
=======================  =============================================  ==========================

Summaries (:func:`segment_summary`, :func:`image_summary`): the mean of ``u``
and the *uncertain fraction*, the share of pixels with ``u > threshold``
(default :data:`UNCERTAIN_THRESHOLD`); every generator's ``diagnostics`` carry
them (:func:`uncertainty_diagnostics`, added by
:func:`pointseg.generators.base.assemble`).

Next clicks (:func:`suggest_clicks`): the ``k`` places where one more point is
expected to change the label most, each with the segment it would most likely
join, written in the point-label JSON Lines format
(:func:`pointseg.data.points.write_points_jsonl`) so that a person can correct
them and feed them back as ``points.file``.

Storage: the shard column ``uncertainty_png`` holds ``u`` as an 8-bit
grayscale PNG (:func:`pointseg.data.shards.encode_uncertainty`).
"""

from __future__ import annotations

import cv2
import numpy as np

from pointseg.data.record import VOID

__all__ = [
    "NUM_SUGGESTIONS",
    "SUGGESTION_RADIUS",
    "SUGGESTION_SEPARATION",
    "UNCERTAIN_THRESHOLD",
    "assigned_cost_ratio",
    "cost_gap",
    "distance_ratio",
    "image_summary",
    "margin_uncertainty",
    "runner_up_segments",
    "segment_summary",
    "suggest_clicks",
    "transport_entropy",
    "uncertainty_diagnostics",
]

#: ``u > UNCERTAIN_THRESHOLD`` counts a pixel as uncertain. 0.5 reads the same
#: for every score: the second-nearest label is less than twice as far as the
#: nearest (distance ratio), the two best masks' probabilities differ by less
#: than one half (margin), the plan spreads over more than ``sqrt(N)`` suppliers'
#: worth of entropy (transport).
UNCERTAIN_THRESHOLD = 0.5
#: Next-click suggestions per image.
NUM_SUGGESTIONS = 3
#: Radius of the window a suggestion's score averages over, as a fraction of
#: the image's long side. Chosen on the first 40 coco-mini images (both
#: background protocols) among 0.01, 0.02, 0.03, 0.05, 0.08, 0.15
#: (``benchmarks/next_click.py``).
SUGGESTION_RADIUS = 0.03
#: Least distance between two suggestions of one image, as a fraction of the
#: long side (at least two window radii): k suggestions point at k places.
SUGGESTION_SEPARATION = 0.15


# --------------------------------------------------------------------------- scores


def distance_ratio(nearest: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Uncertainty of a nearest-label decision: one minus the relative gap.

    With ``D_1 <= D_2`` the distances (geodesic, Euclidean, any cost) from a
    pixel to the nearest label and to the nearest *other* label::

        u = 1 - (D_2 - D_1) / D_2 = D_1 / D_2

    0 on a clicked pixel (``D_1 = 0 < D_2``) and where only one label reaches
    the pixel (``D_2 = inf``); 1 on the decision boundary (``D_1 = D_2``, also
    ``0 = 0``: two labels clicked on one pixel) and where no label reaches it
    (``D_1 = inf``). Scale-free: multiplying every edge cost by a constant
    leaves ``u`` unchanged.

    Parameters
    ----------
    nearest, second : (H, W) float, ``0 <= nearest <= second``, ``inf`` allowed
        E.g. ``distance[0]`` and ``distance[1]`` of
        :func:`pointseg.geodesic.nearest_two_sources`.

    Returns
    -------
    u : (H, W) float32 in [0, 1]
    """
    d1 = np.asarray(nearest, np.float64)
    d2 = np.asarray(second, np.float64)
    if d1.shape != d2.shape:
        raise ValueError(f"nearest {d1.shape} and second {d2.shape} distances differ in shape")
    if np.isnan(d1).any() or np.isnan(d2).any():
        raise ValueError("distances contain NaN")
    if (d1 < 0).any() or (d2 < d1).any():
        raise ValueError("distances must satisfy 0 <= nearest <= second")
    with np.errstate(invalid="ignore", divide="ignore"):
        u = np.where(np.isinf(d2), 0.0, np.where(d2 > 0, d1 / np.where(d2 > 0, d2, 1.0), 1.0))
    u[np.isinf(d1)] = 1.0
    return u.astype(np.float32)


def cost_gap(costs: np.ndarray, axis: int = 0) -> np.ndarray:
    """Uncertainty from the gap between the best and second-best supplier cost.

    For a cost volume ``C[i, p]`` (supplier ``i``, e.g. a Point2Mask point's
    geodesic cost to pixel ``p``), ``C_(1) <= C_(2)`` its two smallest values
    along ``axis``, ``u = C_(1) / C_(2)`` (:func:`distance_ratio`). One
    supplier: ``u = 0``. Costs must be ``>= 0`` (shift them first otherwise).

    Returns ``u`` with ``axis`` removed, float32 in [0, 1].
    """
    c = np.moveaxis(np.asarray(costs, np.float64), axis, 0)
    if c.shape[0] == 0:
        raise ValueError("cost volume has no supplier along axis")
    if c.shape[0] == 1:
        return np.zeros(c.shape[1:], np.float32)
    two = np.partition(c, 1, axis=0)[:2]
    return distance_ratio(two[0], two[1])


def assigned_cost_ratio(costs: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """Uncertainty of an assignment that may differ from the cheapest supplier (Point2Mask).

    For a cost volume ``C[i, p] >= 0`` (``G`` suppliers) and the supplier
    ``a(p)`` each pixel was given::

        u(p) = min(1, C[a(p), p] / min_{i != a(p)} C[i, p])

    Where ``a(p)`` is the cheapest supplier this is :func:`cost_gap`'s
    ``C_(1) / C_(2)``; where optimal transport moved ``p`` away from its cheapest
    supplier the ratio exceeds 1 and ``u = 1``: the cost itself disagrees with
    the label. One supplier: 0. Pixels with ``a(p) < 0`` (unlabelled): 1.

    Returns (H, W) float32 in [0, 1].
    """
    c = np.asarray(costs, np.float64)
    a = np.asarray(assignment)
    if c.ndim != 3 or a.shape != c.shape[1:]:
        raise ValueError(f"costs {c.shape} must be (G, H, W) and assignment {a.shape} (H, W)")
    if np.isnan(c).any() or (c < 0).any():
        raise ValueError("costs must be >= 0 and not NaN")
    if c.shape[0] == 1:
        return np.where(a >= 0, 0.0, 1.0).astype(np.float32)
    idx = np.clip(a, 0, c.shape[0] - 1)
    own = np.take_along_axis(c, idx[None], 0)[0]
    others = c.copy()
    np.put_along_axis(others, idx[None], np.inf, 0)
    rival = others.min(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        u = np.where(rival > 0, own / np.where(rival > 0, rival, 1.0), 1.0)  # rival cost 0: a tie at best
    u = np.where(np.isinf(rival), 0.0, u)
    u = np.where(a >= 0, np.clip(u, 0.0, 1.0), 1.0)
    return u.astype(np.float32)


def transport_entropy(plan: np.ndarray, axis: int = 0) -> np.ndarray:
    """Normalised entropy of a transport plan per pixel (Point2Mask).

    For a plan ``T[i, p] >= 0`` moving mass from supplier ``i`` (a point) to
    pixel ``p`` (``axis`` indexes the ``N`` suppliers)::

        q_i(p) = T[i, p] / sum_j T[j, p]
        u(p)   = -sum_i q_i(p) log q_i(p) / log N        (0 log 0 = 0)

    0 when one supplier sends all of ``p``'s mass, 1 when all ``N`` send
    equal shares. ``N = 1``: 0. A pixel that receives no mass: 1.

    Returns ``u`` with ``axis`` removed, float32 in [0, 1].
    """
    t = np.moveaxis(np.asarray(plan, np.float64), axis, 0)
    if (t < 0).any() or not np.isfinite(t).all():
        raise ValueError("transport plan must be finite and >= 0")
    n = t.shape[0]
    if n <= 1:
        return np.zeros(t.shape[1:], np.float32)
    mass = t.sum(0)
    q = t / np.where(mass > 0, mass, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0).sum(0) / np.log(n)
    h = np.where(mass > 0, h, 1.0)
    return np.clip(h, 0.0, 1.0).astype(np.float32)


def margin_uncertainty(probs: np.ndarray, axis: int = 0) -> np.ndarray:
    """One minus the margin between the two most probable masks (EPLD, P2Seg, EXITS).

    For per-pixel probabilities ``P[k, p]`` in [0, 1] of ``K`` candidate
    masks (softmax or independent sigmoids), ``P_(1) >= P_(2)`` the two
    largest along ``axis``::

        u = 1 - (P_(1) - P_(2))

    With ``K = 1``, ``P_(2) = 0`` (``u = 1 - P_(1)``). Values are clipped to
    [0, 1] first.

    Returns ``u`` with ``axis`` removed, float32 in [0, 1].
    """
    p = np.clip(np.moveaxis(np.asarray(probs, np.float64), axis, 0), 0.0, 1.0)
    if p.shape[0] == 0:
        raise ValueError("probabilities have no mask along axis")
    if np.isnan(p).any():
        raise ValueError("probabilities contain NaN")
    if p.shape[0] == 1:
        return (1.0 - p[0]).astype(np.float32)
    top = np.partition(p, p.shape[0] - 2, axis=0)[-2:]
    return (1.0 - (top[1] - top[0])).astype(np.float32)


# --------------------------------------------------------------------------- summaries


def _check_map(uncertainty: np.ndarray) -> np.ndarray:
    u = np.asarray(uncertainty)
    if u.ndim != 2 or u.size == 0:
        raise ValueError(f"uncertainty must be a non-empty (H, W) map, got shape {u.shape}")
    if not (u.min() >= 0 and u.max() <= 1):  # NaN fails both comparisons
        raise ValueError("uncertainty values must lie in [0, 1]")
    return u


def image_summary(uncertainty: np.ndarray, threshold: float = UNCERTAIN_THRESHOLD) -> dict:
    """``{"uncertainty_mean": mean(u), "uncertain_fraction": mean(u > threshold)}`` over all pixels.

    All pixels count, labelled or not: a pixel a method left VOID is part of
    what a reviewer has to check.
    """
    u = _check_map(uncertainty)
    return {"uncertainty_mean": float(u.mean(dtype=np.float64)), "uncertain_fraction": float((u > threshold).mean())}


def segment_summary(uncertainty: np.ndarray, id_map: np.ndarray,
                    threshold: float = UNCERTAIN_THRESHOLD) -> dict[int, dict]:
    """Per segment ``s`` of ``id_map`` (VOID left out), over its pixels ``S``::

        mean(s)               = sum_{p in S} u(p) / |S|
        uncertain_fraction(s) = |{p in S : u(p) > threshold}| / |S|

    Returns ``{segment id: {"area", "uncertainty_mean", "uncertain_fraction"}}``.
    """
    u = _check_map(uncertainty)
    ids = np.asarray(id_map)
    if ids.shape != u.shape:
        raise ValueError(f"id_map {ids.shape} and uncertainty {u.shape} differ in shape")
    flat = ids.ravel()
    if flat.min() >= 0 and flat.max() <= 4 * flat.size:  # segment ids are small: count them directly
        inv, uniq = flat, None
    else:
        uniq, inv = np.unique(flat, return_inverse=True)
    area = np.bincount(inv)
    total = np.bincount(inv, weights=u.ravel())
    high = np.bincount(inv[u.ravel() > threshold], minlength=len(area))
    present = np.flatnonzero(area)
    names = present if uniq is None else uniq[present]
    return {int(s): {"area": int(area[i]), "uncertainty_mean": float(total[i] / area[i]),
                     "uncertain_fraction": float(high[i] / area[i])}
            for s, i in zip(names.tolist(), present.tolist()) if s != VOID}


def uncertainty_diagnostics(uncertainty: np.ndarray, id_map: np.ndarray,
                            threshold: float = UNCERTAIN_THRESHOLD) -> dict:
    """The summaries a generator adds to its per-image ``diagnostics`` (JSON-able)::

        {"uncertainty_mean": float, "uncertain_fraction": float,
         "segment_uncertainty": {"<segment id>": [mean, uncertain_fraction], ...}}
    """
    segs = segment_summary(uncertainty, id_map, threshold)
    return {**image_summary(uncertainty, threshold),
            "segment_uncertainty": {str(k): [v["uncertainty_mean"], v["uncertain_fraction"]] for k, v in segs.items()}}


# --------------------------------------------------------------------------- next clicks


def suggest_clicks(uncertainty: np.ndarray, k: int = NUM_SUGGESTIONS, radius: float = SUGGESTION_RADIUS,
                   separation: float = SUGGESTION_SEPARATION) -> list[dict]:
    """The ``k`` pixels where one more click is expected to change the label most.

    A click relabels a region, not a pixel, so a pixel's score is the mean
    uncertainty in the square window of half-width ``r`` around it (``r =
    max(1, round(radius * max(H, W)))`` pixels)::

        s(p) = mean_{|q - p|_inf <= r} u(q)

    which ranks a broad uncertain region (two labels far from their clicks
    and nothing between them) above a thin uncertain line (a decision boundary
    on a strong edge, where a click changes little). Non-maximum suppression
    then takes the highest ``s`` and removes every pixel within Euclidean
    distance ``max(2 r, separation * max(H, W))`` of it (two windows never
    overlap), ``k`` times or until no pixel with ``s > 0`` is left. Ties go to
    the first pixel in raster order.

    Returns ``[{"row", "col", "score": s(p), "uncertainty": u(p)}, ...]``,
    best first (at most ``k``).
    """
    u = _check_map(uncertainty).astype(np.float32)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    for name, v in (("radius", radius), ("separation", separation)):
        if not 0 <= v <= 1:
            raise ValueError(f"{name} is a fraction of the long side in [0, 1], got {v}")
    h, w = u.shape
    r = max(1, int(round(radius * max(h, w))))
    apart = max(2 * r, separation * max(h, w))
    score = cv2.boxFilter(u, -1, (2 * r + 1, 2 * r + 1), normalize=True, borderType=cv2.BORDER_REFLECT)
    yy, xx = np.mgrid[:h, :w]
    out = []
    alive = np.ones((h, w), bool)
    for _ in range(k):
        masked = np.where(alive, score, -1.0)
        flat = int(np.argmax(masked))
        row, col = divmod(flat, w)
        if masked[row, col] <= 0:
            break
        out.append({"row": row, "col": col, "score": float(score[row, col]), "uncertainty": float(u[row, col])})
        alive &= (yy - row) ** 2 + (xx - col) ** 2 > apart ** 2
    return out


def runner_up_segments(id_map: np.ndarray, rows, cols) -> list[int]:
    """For each pixel ``(rows[i], cols[i])``, the segment it would most likely join instead of its own.

    The nearest (Euclidean) labelled pixel whose segment differs from the
    pixel's own: where the score is high, a nearest-label method's
    second-nearest label is the neighbouring segment across the decision
    boundary. The pixel's own segment when no other exists; VOID (0) when
    the image has no labelled pixel.
    """
    ids = np.asarray(id_map)
    out = []
    for r, c in zip(np.atleast_1d(rows).tolist(), np.atleast_1d(cols).tolist()):
        own = int(ids[r, c])
        ys, xs = np.nonzero((ids != own) & (ids != VOID))
        if len(ys) == 0:
            out.append(own)
            continue
        i = int(np.argmin((ys - r) ** 2 + (xs - c) ** 2))
        out.append(int(ids[ys[i], xs[i]]))
    return out
