"""Transport solvers on geodesic-like costs: time, marginal errors, segment sizes.

Prints one table per problem size (20 points x 128x128 and 256x256 pixels):
every solver of ``pointseg.sinkhorn.SOLVERS`` (plus a few eps / budget
variants) and POT's exact ``ot.emd`` for reference. Not a timed test.

Problem (Point2Mask Sec. 3.3): 8-connected grid, edge length
``|P(k) - P(l)| + beta * max(Pb(k), Pb(l)) + 0.01 * step`` (Eq. 2-3 shape) on a
smooth random "semantic" map P with sharp region borders and a random
"boundary" map Pb; ``C`` = geodesic distances from 20 random points (Dijkstra);
``k`` = centroid-based sizes (Eq. 4): geodesic Voronoi cells of the points, their
centroids, then the Voronoi sizes of the centroids. Costs range ~0-20, the units
in which the authors' code uses eps = 1e-3.

Run: ``.venv/bin/python benchmarks/sinkhorn.py [--sizes 128 256] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.ndimage as ndi
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import dijkstra

from pointseg.sinkhorn import (
    DEFAULT_METHOD, PAPER_EPS, PAPER_N_ITER, segment_sizes, sinkhorn_log, sinkhorn_reference, solve_exact,
)


def grid_graph(height: int, width: int, rng: np.random.Generator, beta: float = 0.1) -> sp.csr_matrix:
    """8-connected grid with Point2Mask-like edge lengths (Eq. 2-3)."""
    noise = ndi.gaussian_filter(rng.standard_normal((height, width)), sigma=max(height, width) / 16)
    regions = np.floor(4 * (noise - noise.min()) / (np.ptp(noise) + 1e-12))  # piecewise "classes"
    sem = 0.5 * regions + ndi.gaussian_filter(rng.standard_normal((height, width)), 3) * 0.2
    bnd = ndi.gaussian_filter(rng.random((height, width)), 2)
    bnd = (bnd - bnd.min()) / (np.ptp(bnd) + 1e-12)
    idx = np.arange(height * width).reshape(height, width)
    rows, cols, vals = [], [], []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        ys = slice(0, height - dy)
        xs = slice(max(0, -dx), width - max(0, dx))
        ys2 = slice(dy, height)
        xs2 = slice(max(0, dx), width - max(0, -dx))
        length = (np.abs(sem[ys, xs] - sem[ys2, xs2]) + beta * np.maximum(bnd[ys, xs], bnd[ys2, xs2])
                  + 0.01 * np.hypot(dy, dx))
        rows.append(idx[ys, xs].ravel())
        cols.append(idx[ys2, xs2].ravel())
        vals.append(length.ravel())
    r, c, v = (np.concatenate(x) for x in (rows, cols, vals))
    n = height * width
    return sp.csr_matrix((np.r_[v, v], (np.r_[r, c], np.r_[c, r])), shape=(n, n))


def make_problem(height: int, width: int, m: int = 20, seed: int = 0):
    """Geodesic cost ``C`` (m, H*W) float32 and centroid-based sizes ``k`` (m,) int64."""
    rng = np.random.default_rng(seed)
    graph = grid_graph(height, width, rng)
    pts = rng.choice(height * width, size=m, replace=False)
    d0 = dijkstra(graph, indices=pts)
    cells = d0.argmin(0)
    ys, xs = np.divmod(np.arange(height * width), width)
    cents = []
    for i in range(m):
        sel = cells == i
        cy, cx = int(round(ys[sel].mean())), int(round(xs[sel].mean()))
        c = cy * width + cx
        cents.append(c if cells[c] == i else pts[i])  # Eq. 4: keep the point if the centroid left its cell
    dc = dijkstra(graph, indices=np.array(cents))
    k = np.bincount(dc.argmin(0), minlength=m)
    return torch.from_numpy(d0.astype(np.float32)), torch.from_numpy(k.astype(np.int64))


def timed(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best * 1e3


def row(name, res, k, ms, emd_cost):
    sizes = segment_sizes(res.labels, len(k))
    d = (sizes - k).abs()
    rel = (d.double() / k.double().clamp_min(1)).max().item()
    gap = (float(res.cost) - emd_cost) / emd_cost if emd_cost else float("nan")
    print(f"{name:<34s} {ms:9.1f} {float(res.marginal_error_row):10.2e} {float(res.marginal_error_col):10.2e} "
          f"{int(d.max()):8d} {rel:9.2%} {res.n_iter:6d} {gap:+10.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-emd", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared box)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; default method: {DEFAULT_METHOD!r}")
    for side in args.sizes:
        C, k = make_problem(side, side, args.points, seed=side)
        m, n = C.shape
        print(f"\n== {m} points x {n} pixels ({side}x{side}); cost range [{float(C.min()):.2f}, {float(C.max()):.2f}],"
              f" k in [{int(k.min())}, {int(k.max())}]")
        emd_cost, emd_ms = float("nan"), float("nan")
        if not args.no_emd:
            import ot

            Cd = C.double().numpy()
            plan, emd_ms = timed(lambda: ot.emd(k.double().numpy(), np.ones(n), Cd, numItermax=10_000_000), 1)
            emd_cost = float((plan * Cd).sum())
        print(f"{'solver':<34s} {'ms':>9s} {'row err':>10s} {'col err':>10s} {'max|s-k|':>8s} {'rel size':>9s}"
              f" {'iters':>6s} {'cost gap':>10s}")
        runs = {
            f"reference eps={PAPER_EPS:g} T={PAPER_N_ITER}": lambda: sinkhorn_reference(C, k, PAPER_EPS, PAPER_N_ITER),
            "reference eps=1e-2 T=80": lambda: sinkhorn_reference(C, k, 1e-2, 80),
            "sinkhorn_log eps=1e-3 tol=1e-3": lambda: sinkhorn_log(C, k, eps=1e-3, tol=1e-3, n_iter=400),
            "sinkhorn_log +eps_scaling 4": lambda: sinkhorn_log(C, k, eps=1e-3, tol=1e-3, n_iter=400, eps_scaling=4.0),
            "exact (default)": lambda: solve_exact(C, k),
        }
        results = {name: (None, float("inf")) for name in runs}
        for _ in range(args.repeat):  # interleaved, best of: the box is shared
            for name, fn in runs.items():
                res, ms = timed(fn, 1)
                results[name] = (res, min(ms, results[name][1]))
        for name, (res, ms) in results.items():
            row(name, res, k, ms, emd_cost)
        warm = solve_exact(C, k)
        res, ms = timed(lambda: solve_exact(C, k, warm_start=warm.f), args.repeat)
        row("exact, warm start", res, k, ms, emd_cost)
        print(f"{'POT ot.emd (float64)':<34s} {emd_ms:9.1f}   cost {emd_cost:.6g}")


if __name__ == "__main__":
    main()
