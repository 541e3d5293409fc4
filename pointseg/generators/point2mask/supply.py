"""Step 4 of Point2Mask: supplier units ``k`` of a transport problem (Eq. 4, Table 5)."""

from __future__ import annotations

import numpy as np

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
