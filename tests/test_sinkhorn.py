"""Tests for pointseg.sinkhorn against independent oracles (POT, scipy linprog)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import linprog
from scipy.sparse.csgraph import dijkstra

from pointseg.sinkhorn import (
    DEFAULT_METHOD, SOLVERS, OTResult, SinkhornDivergenceError, decode_argmax, integer_supply, segment_sizes,
    sinkhorn_log, sinkhorn_reference, solve_exact, transport,
)

ot = pytest.importorskip("ot")


def geodesic_problem(side=20, m=5, seed=0, dtype=torch.float64):
    """Geodesic costs from m random points on a side x side 4-connected grid with random
    edge lengths; k = sizes of the *Euclidean* nearest-point cells (so the optimum is not
    simply the geodesic Voronoi partition)."""
    rng = np.random.default_rng(seed)
    n = side * side
    idx = np.arange(n).reshape(side, side)
    w = 0.05 + rng.random((side, side)) ** 4  # a few expensive pixels act as soft boundaries
    r = np.r_[idx[:, :-1].ravel(), idx[:-1, :].ravel()]
    c = np.r_[idx[:, 1:].ravel(), idx[1:, :].ravel()]
    v = 0.5 * (w.ravel()[r] + w.ravel()[c])
    g = sp.csr_matrix((np.r_[v, v], (np.r_[r, c], np.r_[c, r])), shape=(n, n))
    pts = rng.choice(n, m, replace=False)
    C = dijkstra(g, indices=pts)
    ys, xs = np.divmod(np.arange(n), side)
    py, px = np.divmod(pts, side)
    eu = (ys[None] - py[:, None]) ** 2 + (xs[None] - px[:, None]) ** 2
    k = np.bincount(eu.argmin(0), minlength=m)
    return torch.tensor(C, dtype=dtype), torch.tensor(k, dtype=torch.int64)


@pytest.fixture(scope="module")
def problem():
    return geodesic_problem()


def emd_cost(C, k):
    Cn = C.double().numpy()
    plan = ot.emd(k.double().numpy(), np.ones(C.shape[1]), Cn)
    return float((plan * Cn).sum())


# -- agreement with POT -------------------------------------------------------------------

def test_sinkhorn_log_matches_pot(problem):
    C, k = problem
    eps = 0.05 * float(C.max())
    res = sinkhorn_log(C, k, eps=eps, tol=1e-10, n_iter=20000)
    assert bool(res.converged)
    pot_plan = ot.bregman.sinkhorn_log(k.double().numpy(), np.ones(C.shape[1]), C.numpy(), eps,
                                       numItermax=20000, stopThr=1e-13)
    # both satisfy the marginals to ~1e-10 of a pixel, so the unique entropic optimum is
    # reached by both to that order; 1e-7 leaves room for the stopping rules differing.
    np.testing.assert_allclose(res.plan.numpy(), pot_plan, atol=1e-7)
    assert float(res.cost) == pytest.approx(float((pot_plan * C.numpy()).sum()), rel=1e-9)


def test_reference_is_the_same_fixed_point(problem):
    """Run long enough, the paper's update converges to POT's plan too (same problem, Eq. 9)."""
    C, k = problem
    eps = 0.05 * float(C.max())
    res = sinkhorn_reference(C, k, eps=eps, n_iter=3000)
    pot_plan = ot.bregman.sinkhorn_log(k.double().numpy(), np.ones(C.shape[1]), C.numpy(), eps,
                                       numItermax=20000, stopThr=1e-13)
    np.testing.assert_allclose(res.plan.numpy(), pot_plan, atol=1e-7)


# -- exact solver vs ot.emd / linprog -----------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_matches_emd_cost_and_sizes(seed):
    C, k = geodesic_problem(seed=seed)
    res = solve_exact(C, k)
    assert torch.equal(segment_sizes(res.labels, len(k)), k)
    assert float(res.cost) == pytest.approx(emd_cost(C, k), rel=1e-10, abs=1e-9)
    # LP duality certificate, independent of POT: sum k.f + sum g equals the primal cost
    dual = float((k.double() * res.f.double()).sum() + res.g.double().sum())
    assert dual == pytest.approx(float(res.cost), rel=1e-10)
    assert bool(res.converged) and float(res.marginal_error_col) == 0.0


def test_exact_with_massive_ties():
    """Integer-rounded costs: whole groups of pixels tie; sizes must still equal k exactly."""
    C, k = geodesic_problem(seed=3)
    C = torch.round(C * 2)
    res = solve_exact(C, k)
    assert torch.equal(segment_sizes(res.labels, len(k)), k)
    assert float(res.cost) == pytest.approx(emd_cost(C, k), abs=1e-9)


def test_exact_matches_linprog_tiny():
    rng = np.random.default_rng(5)
    m, n = 3, 12
    C = rng.random((m, n))
    k = np.array([5, 4, 3])
    A_eq = np.vstack([np.kron(np.eye(m), np.ones(n)), np.kron(np.ones(m), np.eye(n))])
    lp = linprog(C.ravel(), A_eq=A_eq, b_eq=np.r_[k, np.ones(n)], bounds=(0, None), method="highs")
    res = solve_exact(torch.tensor(C), torch.tensor(k))
    assert float(res.cost) == pytest.approx(lp.fun, abs=1e-12)
    assert torch.equal(segment_sizes(res.labels, m), torch.tensor(k))


def test_exact_float32(problem):
    C, k = problem
    res = solve_exact(C.float(), k)
    assert res.f.dtype == torch.float32
    assert torch.equal(segment_sizes(res.labels, len(k)), k)
    assert float(res.cost) == pytest.approx(emd_cost(C, k), rel=1e-5)


# -- convergence: the paper's T=80 update vs the default ---------------------------------

def test_reference_does_not_converge_at_small_eps_but_default_does(problem):
    C, k = problem
    ref = sinkhorn_reference(C.float(), k, eps=1e-3, n_iter=80)
    assert float(ref.marginal_error_col) > 1e-2  # column sums far from 1 after T=80
    assert not bool(ref.converged)
    size_off = (segment_sizes(decode_argmax(ref.plan), len(k)) - k).abs().max()
    assert int(size_off) > 0
    res = transport(C.float(), k)
    assert res.method == DEFAULT_METHOD
    assert float(res.marginal_error_row) <= 1e-3 and float(res.marginal_error_col) <= 1e-3
    assert torch.equal(segment_sizes(res.labels, len(k)), k)


def test_eps_scaling_reaches_the_same_plan(problem):
    """The annealed schedule ends at the target eps: same entropic optimum as a cold solve."""
    C, k = problem
    eps = 2e-3 * float(C.max())
    cold = sinkhorn_log(C, k, eps=eps, tol=1e-6, n_iter=20000)
    scaled = sinkhorn_log(C, k, eps=eps, tol=1e-6, n_iter=20000, eps_scaling=4.0)
    assert bool(cold.converged) and bool(scaled.converged) and scaled.eps == eps
    torch.testing.assert_close(scaled.plan, cold.plan, atol=1e-4, rtol=0)


# -- divergence ---------------------------------------------------------------------------

def test_divergence_float32_tiny_eps_raises(problem):
    C, k = problem
    # 1e-40 is subnormal in float32: C / eps overflows to inf and the potentials turn NaN
    with pytest.raises(SinkhornDivergenceError), pytest.warns(RuntimeWarning, match="resolution"):
        sinkhorn_log(C.float(), k, eps=1e-40, n_iter=20)
    with pytest.raises(SinkhornDivergenceError):
        sinkhorn_reference(C.float(), k, eps=1e-40, n_iter=5)


def test_divergence_flag_never_decodes(problem):
    C, k = problem
    with pytest.warns(RuntimeWarning, match="non-finite|resolution"):
        res = sinkhorn_log(C.float(), k, eps=1e-40, n_iter=20, on_diverge="flag")
    assert bool(res.diverged) and not bool(res.converged)
    assert (res.labels == -1).all()
    with pytest.raises(ValueError, match="NaN"):
        decode_argmax(res.plan)
    # the same eps is representable in float64: no divergence there
    with pytest.warns(RuntimeWarning, match="resolution"):
        ok = sinkhorn_log(C, k, eps=1e-40, n_iter=5, on_diverge="raise")
    assert not bool(ok.diverged)


# -- supplies and input checks ------------------------------------------------------------

def test_zero_supply_supplier(problem):
    C, k = problem
    C6 = torch.cat([C, C[:1] * 0.5])  # a sixth, attractive supplier with no supply
    k6 = torch.cat([k, torch.zeros(1, dtype=k.dtype)])
    res = solve_exact(C6, k6)
    assert torch.equal(segment_sizes(res.labels, 6), k6)
    assert res.f[5] == -np.inf
    assert float(res.cost) == pytest.approx(emd_cost(C, k), rel=1e-10)
    sk = sinkhorn_log(C6, k6, eps=0.05 * float(C.max()), tol=1e-6, n_iter=5000)
    assert torch.isfinite(sk.plan).all() and float(sk.plan[5].sum()) == 0.0
    assert not (sk.labels == 5).any() and bool(sk.converged)


def test_supply_that_rounds_to_zero():
    k = integer_supply(torch.tensor([0.2, 199.9, 200.1]), 400)
    assert k.tolist() == [0, 200, 200]
    C, _ = geodesic_problem(m=3, seed=4)
    with pytest.raises(ValueError, match="rescale_supply"):
        transport(C, torch.tensor([0.2, 199.9, 200.1]))
    res = transport(C, torch.tensor([0.2, 199.9, 200.1]), rescale_supply=True)
    assert segment_sizes(res.labels, 3).tolist() == [0, 200, 200]


def test_input_checks(problem):
    C, k = problem
    bad = C.clone()
    bad[1, 7] = float("nan")
    with pytest.raises(ValueError, match="C: 1 NaN"):
        transport(bad, k)
    with pytest.raises(ValueError, match="negative"):
        transport(C, k - k.max())
    with pytest.raises(ValueError, match="sum\\(k\\)"):
        transport(C, k * 2)
    res = transport(C, k * 2, rescale_supply=True)
    assert torch.equal(segment_sizes(res.labels, len(k)), k)
    with pytest.raises(ValueError, match="method"):
        transport(C, k, method="simplex")
    assert set(SOLVERS) == {"exact", "sinkhorn_log", "reference"}


# -- batching and warm starts -------------------------------------------------------------

def test_batched_equals_per_item():
    probs = [geodesic_problem(seed=s) for s in (10, 11, 12)]
    C = torch.stack([p[0] for p in probs])
    k = torch.stack([p[1] for p in probs])
    eps = 0.02 * float(C.max())
    sk = sinkhorn_log(C, k, eps=eps, tol=0.0, n_iter=200)
    ex = solve_exact(C, k)
    for i, (Ci, ki) in enumerate(probs):
        one = sinkhorn_log(Ci, ki, eps=eps, tol=0.0, n_iter=200)
        torch.testing.assert_close(sk.plan[i], one.plan, rtol=1e-9, atol=1e-12)
        e1 = solve_exact(Ci, ki)
        assert float(ex.cost[i]) == pytest.approx(float(e1.cost), rel=1e-12)
        assert torch.equal(segment_sizes(ex.labels[i], len(ki)), ki)
    assert isinstance(sk, OTResult) and sk.labels.shape == (3, C.shape[-1])


def test_warm_start_reduces_iterations(problem):
    C, k = problem
    eps = 0.01 * float(C.max())
    first = sinkhorn_log(C, k, eps=eps, tol=1e-4, n_iter=5000)
    C2 = C * 1.01 + 0.01  # the next training step: a slightly different cost
    cold = sinkhorn_log(C2, k, eps=eps, tol=1e-4, n_iter=5000)
    warm = sinkhorn_log(C2, k, eps=eps, tol=1e-4, n_iter=5000, warm_start=(first.f, first.g))
    assert bool(warm.converged) and warm.n_iter < cold.n_iter
    torch.testing.assert_close(warm.plan, cold.plan, atol=1e-3, rtol=0)
    ex = solve_exact(C, k)
    ex_cold = solve_exact(C2, k)
    ex_warm = solve_exact(C2, k, warm_start=ex.f)
    assert ex_warm.n_iter < ex_cold.n_iter
    assert float(ex_warm.cost) == pytest.approx(float(ex_cold.cost), rel=1e-10)
