"""Optimal transport from point suppliers to pixel demanders (Point2Mask Sec. 3.3).

``m`` point labels are suppliers, supplier ``i`` holding ``k_i`` units (its
segment size, Point2Mask Eq. 4, ``sum_i k_i = n``); the ``n`` pixels are
demanders, each needing one unit. With the transport cost ``C`` ``(m, n)``
(geodesic costs, Eq. 3, computed by :mod:`pointseg.geodesic`), the transport
problem is (Point2Mask Eq. 1)::

    min_{pi >= 0}  <C, pi> = sum_ij C_ij pi_ij
    s.t.           pi 1_n = k        (row sums: supplier i gives k_i units)
                   pi^T 1_m = 1_n    (column sums: every pixel gets one unit)

and its entropic regularisation, solved by Sinkhorn-Knopp (Point2Mask
Appendix A, Eq. 9-11, with ``eps`` = the paper's lambda)::

    min_{pi >= 0}  <C, pi> + eps * sum_ij pi_ij (log pi_ij - 1)   (same constraints)

A pixel's pseudo label is the supplier that sends it the most mass,
``label_j = argmax_i pi_ij`` (Algorithm 1, line 10).

Solvers (one table, :data:`SOLVERS`; call them through :func:`transport`)
-------------------------------------------------------------------------
``"exact"``        :func:`solve_exact` -- the unregularised problem, solved
                   exactly. Hard labels whose segment sizes equal ``k``; the
                   cost equals ``ot.emd``'s optimum. **Default**: the only solver
                   that meets the marginals *and* the sizes, and it is faster
                   than the paper's T=80 update (``benchmarks/sinkhorn.py``).
``"sinkhorn_log"`` :func:`sinkhorn_log` -- log-domain Sinkhorn with a marginal
                   tolerance, eps-scaling and warm starts. Pick it when a soft
                   (entropic) plan is wanted, e.g. as a differentiable target.
``"reference"``    :func:`sinkhorn_reference` -- the paper's update exactly:
                   T=80 fixed iterations at the given eps. For comparison only:
                   at the public code's eps=1e-3 it is far from converged.

What eps means
--------------
``eps`` is in the units of ``C``. The paper does not normalise the cost and does
not state lambda; the authors' public code runs 80 log-domain iterations with
``eps = 1e-3`` on *unnormalised* geodesic costs (path sums of per-edge
differences of softmax maps and boundary maps, typically 0 to ~20 on their
1/16-resolution grid), i.e. eps is ~1e-4 of the cost range. At that ratio
Sinkhorn needs thousands of iterations; 80 leave column sums far from 1
(``benchmarks/sinkhorn.py``). Costs in LAB units (tens to hundreds) need a
proportionally larger eps for the same plan; costs normalised to ``[0, 1]`` a
smaller one. Float32 resolves the exponent ``(f_i + g_j - C_ij) / eps`` only to
about ``max|C| * 1.2e-7 / eps``; below ``eps ~ 1e-6 * max|C|`` use float64.

Marginal errors (:class:`OTResult`) are in pixel units: the column error is
``max_j |sum_i pi_ij - b_j| / max(b_j, u)`` and the row error
``max_i |sum_j pi_ij - a_i| / max(a_i, u)``, with ``u = mean(b)`` the mass of one
pixel (``u = 1`` in Point2Mask units), i.e. the column error is the largest
missing or surplus fraction of a pixel and the row error the largest relative
error of a segment size.

References
----------
Li et al., "Point2Mask: Point-supervised Panoptic Segmentation via Optimal
Transport", ICCV 2023, Sec. 3.3, Algorithm 1, Appendix A (Eq. 9-11), Table A2.
Cuturi, "Sinkhorn distances", NeurIPS 2013.
Schmitzer, "Stabilized sparse scaling algorithms for entropy regularized
transport problems", SIAM J. Sci. Comput. 2019 (log domain, eps-scaling).
Peyre & Cuturi, "Computational Optimal Transport", 2019, Sec. 4.4, 5.3
(semi-dual; c-transform).
Ahuja, Magnanti & Orlin, "Network Flows", 1993, Ch. 9 (successive shortest
paths with node potentials).
"""

from __future__ import annotations

import heapq
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from pointseg.argmax import first_argmax

__all__ = [
    "OTResult",
    "SinkhornDivergenceError",
    "SOLVERS",
    "DEFAULT_METHOD",
    "transport",
    "sinkhorn_reference",
    "sinkhorn_log",
    "sinkhorn_knopp",
    "solve_exact",
    "decode_argmax",
    "segment_sizes",
    "size_error",
]

#: Fixed iteration count of the paper (Point2Mask Sec. 4.1 and Table A2).
PAPER_N_ITER = 80
#: eps of the authors' public implementation (cost in raw geodesic units).
PAPER_EPS = 1e-3


#: exp() argument floor: exp(-80) is a normal float32; subnormal results
#: (exp(x) for x < -87) take a slow path that made log-sum-exp 6x slower.
_EXP_FLOOR = -80.0


def _lse(Z: torch.Tensor, dim: int) -> torch.Tensor:
    """``log sum exp`` over ``dim``, terms below ``exp(-80)`` of the largest floored.

    Same value as ``torch.logsumexp`` to ``n * exp(-80)`` relative, several
    times faster on CPU for the very negative exponents of small-eps transport.
    NaN or ``+inf`` entries give NaN (divergence is detected, not hidden);
    an all ``-inf`` slice gives ``-inf``.
    """
    mx = Z.amax(dim, keepdim=True)
    empty = mx == -math.inf
    mxs = torch.where(empty, torch.zeros_like(mx), mx)
    s = (Z - mxs).clamp_(min=_EXP_FLOOR).exp_().sum(dim, keepdim=True)
    return torch.where(empty, mx, s.log_() + mxs).squeeze(dim)


class SinkhornDivergenceError(FloatingPointError):
    """Non-finite potentials or plan: eps too small for the floating-point type."""


@dataclass
class OTResult:
    """Solution of one (or a batch of) supplier-to-pixel transport problems.

    Shapes are given for a batch of ``B`` problems; unbatched calls drop ``B``.

    Attributes
    ----------
    labels : (B, n) int64
        Supplier index per pixel (``argmax_i pi_ij``). ``-1`` for every pixel
        of a problem that diverged: a diverged plan is never decoded.
    plan : (B, m, n) float or None
        Transport plan in pixel units (rows sum to ``a``, columns to ``b``).
        ``None`` for the exact solver (its plan is the one-hot of ``labels``)
        or when ``return_plan=False``.
    f : (B, m) float
        Supplier potentials (dual variables of the row constraints), in cost
        units: ``pi_ij = exp((f_i + g_j - C_ij) / eps)`` for Sinkhorn; for the
        exact solver the weights ``w`` of the assignment ``argmin_i C_ij - f_i``.
        ``-inf`` for suppliers with zero supply.
    g : (B, n) float
        Pixel potentials (dual variables of the column constraints).
    n_iter : int
        Iterations run (Sinkhorn sweeps; Newton steps plus repair moves for the
        exact solver).
    marginal_error_row, marginal_error_col : (B,) float
        Marginal errors in pixel units (see the module docstring).
    entropy : (B,) float
        ``-sum_ij pi_ij log pi_ij`` (pixel units); 0 for a hard plan.
    cost : (B,) float
        Transport cost ``<C, pi>`` (without the entropy term).
    converged : (B,) bool
        Both marginal errors within the tolerance.
    diverged : (B,) bool
        Non-finite potentials or plan (see ``on_diverge``).
    method : str
    eps : float
        Final regularisation (0 for the exact solver).
    """

    labels: torch.Tensor
    plan: torch.Tensor | None
    f: torch.Tensor
    g: torch.Tensor
    n_iter: int
    marginal_error_row: torch.Tensor
    marginal_error_col: torch.Tensor
    entropy: torch.Tensor
    cost: torch.Tensor
    converged: torch.Tensor
    diverged: torch.Tensor
    method: str = ""
    eps: float = 0.0


# ----------------------------------------------------------------------------
# input checks


def _as_batch(C, a, b=None, dtype=None):
    """Validate and lift to a batch: C (B, m, n), a (B, m), b (B, n)."""
    C = torch.as_tensor(C)
    if dtype is None:
        dtype = C.dtype if C.dtype in (torch.float32, torch.float64) else torch.float32
    C = C.to(dtype)
    if C.ndim not in (2, 3):
        raise ValueError(f"C: expected shape (m, n) or (B, m, n), got {tuple(C.shape)}")
    batched = C.ndim == 3
    if not batched:
        C = C[None]
    B, m, n = C.shape
    nan = torch.isnan(C)
    if nan.any():
        raise ValueError(f"C: {int(nan.sum())} NaN entries in the cost matrix")
    if not torch.isfinite(C).all():
        raise ValueError("C: cost matrix has infinite entries (forbid a pair with a large finite cost)")
    a = torch.as_tensor(a, device=C.device).to(dtype)
    a = a.expand(B, m) if a.ndim == 1 else a
    if a.shape != (B, m):
        raise ValueError(f"k: expected shape ({m},) or ({B}, {m}) to match C {tuple(C.shape)}, got {tuple(a.shape)}")
    if b is None:
        b = torch.ones(B, n, dtype=dtype, device=C.device)
    else:
        b = torch.as_tensor(b, device=C.device).to(dtype)
        b = b.expand(B, n) if b.ndim == 1 else b
        if b.shape != (B, n):
            raise ValueError(f"b: expected shape ({n},) or ({B}, {n}), got {tuple(b.shape)}")
    for name, v in (("k", a), ("b", b)):
        if not torch.isfinite(v).all():
            raise ValueError(f"{name}: non-finite entries")
        if (v < 0).any():
            raise ValueError(f"{name}: negative entries {v[v < 0][:5].tolist()}; supplies and demands must be >= 0")
    return C, a, b, batched


def _check_balance(a, b, rescale_supply):
    """sum(a) must equal sum(b) per problem, or be rescaled when asked."""
    sa, sb = a.sum(-1), b.sum(-1)
    bad = (sa - sb).abs() > 1e-6 * sb.clamp_min(1) + 1e-3
    if bad.any():
        if not rescale_supply:
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"k: sum(k)={float(sa[i]):.6g} != total demand {float(sb[i]):.6g} (problem {i}); "
                "pass rescale_supply=True to rescale k to the number of pixels"
            )
        a = a * (sb / sa.clamp_min(torch.finfo(a.dtype).tiny))[:, None]
    if (sa <= 0).any():
        raise ValueError("k: all supplies are zero")
    return a


def integer_supply(k, n: int) -> torch.Tensor:
    """Round supplies ``k`` (m,) to integers summing to ``n`` (largest remainder).

    ``k`` is first rescaled to sum to ``n``. A supplier whose share rounds to
    zero gets no pixel (its segment is empty).
    """
    k = torch.as_tensor(k, dtype=torch.float64)
    scaled = k * (n / k.sum())
    base = torch.floor(scaled)
    short = int(n - base.sum().item())
    if short > 0:
        order = torch.argsort(scaled - base, descending=True, stable=True)
        base[order[:short]] += 1
    return base.to(torch.int64)


# ----------------------------------------------------------------------------
# diagnostics shared by the solvers


def _marginal_errors(row, col, a, b):
    unit = b.mean(-1, keepdim=True)
    er = ((row - a).abs() / torch.maximum(a, unit)).amax(-1)
    ec = ((col - b).abs() / torch.maximum(b, unit)).amax(-1)
    return er, ec


def decode_argmax(plan: torch.Tensor) -> torch.Tensor:
    """Pseudo labels from a plan: ``label_j = argmax_i pi_ij`` (Algorithm 1, line 10).

    ``plan`` is ``(..., m, n)`` (a plan or a log-plan: the argmax is the same);
    returns ``(..., n)`` int64 supplier indices. Raises ``ValueError`` on a plan
    with NaN entries: a diverged plan must not be decoded.
    """
    if torch.isnan(plan).any():
        raise ValueError("plan: NaN entries (diverged solve); refusing to decode")
    return first_argmax(plan, -2)


def segment_sizes(labels: torch.Tensor, m: int) -> torch.Tensor:
    """Pixels per supplier, ``(..., m)`` int64, from labels ``(..., n)`` (``-1`` ignored)."""
    lab = labels.reshape(-1, labels.shape[-1])
    out = torch.zeros(lab.shape[0], m + 1, dtype=torch.int64, device=labels.device)
    out.scatter_add_(1, (lab + 1).clamp_min(0), torch.ones_like(lab))
    return out[:, 1:].reshape(*labels.shape[:-1], m)


def size_error(labels: torch.Tensor, k) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded segment-size error: ``max_i |size_i - k_i|`` and ``max_i |size_i - k_i| / max(k_i, 1)``."""
    k = torch.as_tensor(k, device=labels.device)
    d = (segment_sizes(labels, k.shape[-1]).to(torch.float64) - k.to(torch.float64)).abs()
    return d.amax(-1), (d / k.to(torch.float64).clamp_min(1)).amax(-1)


def _handle_divergence(diverged, on_diverge, method, eps, dtype):
    if not bool(diverged.any()):
        return
    idx = diverged.nonzero().flatten().tolist()
    msg = (
        f"{method}: non-finite potentials or plan for problem(s) {idx} at eps={eps:g} in {dtype}; "
        "eps is too small for this floating-point type (use float64, a larger eps, or method='exact'). "
        "Labels of these problems are set to -1."
    )
    if on_diverge == "raise":
        raise SinkhornDivergenceError(msg)
    if on_diverge != "flag":
        raise ValueError(f"on_diverge: expected 'raise' or 'flag', got {on_diverge!r}")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _precision_warning(C, eps):
    resolution = float(C.abs().max()) * torch.finfo(C.dtype).eps / eps
    if resolution > 0.1:
        warnings.warn(
            f"eps={eps:g} is below the resolution of {C.dtype} for costs up to {float(C.abs().max()):.3g}: "
            f"plan exponents carry errors of ~{resolution:.2g}; "
            + ("use float64 or a larger eps" if C.dtype != torch.float64 else "use a larger eps"),
            RuntimeWarning,
            stacklevel=3,
        )


def _sinkhorn_result(C, logK_eps, F, G, a, b, eps, n_iter, tol, method, on_diverge, return_plan, batched):
    """Assemble an OTResult from scaled potentials F = f/eps, G = g/eps."""
    log_plan = logK_eps + F[:, :, None] + G[:, None, :]
    plan = log_plan.exp()
    diverged = ~(torch.isfinite(F) | (a == 0)).all(-1) | ~(torch.isfinite(G) | (b == 0)).all(-1)
    diverged |= torch.isnan(plan).flatten(1).any(-1)
    _handle_divergence(diverged, on_diverge, method, eps, C.dtype)
    er, ec = _marginal_errors(plan.sum(-1), plan.sum(-2), a, b)
    plogp = torch.where(plan > 0, plan * log_plan, torch.zeros_like(plan))
    entropy = -plogp.sum((-2, -1))
    cost = (plan * C).sum((-2, -1))
    labels = first_argmax(plan, -2)
    labels[diverged] = -1
    res = OTResult(
        labels=labels,
        plan=plan if return_plan else None,
        f=F * eps,
        g=G * eps,
        n_iter=n_iter,
        marginal_error_row=er,
        marginal_error_col=ec,
        entropy=entropy,
        cost=cost,
        converged=(er <= tol) & (ec <= tol) & ~diverged,
        diverged=diverged,
        method=method,
        eps=float(eps),
    )
    return res if batched else _unbatch(res)


def _unbatch(res: OTResult) -> OTResult:
    for name in ("labels", "plan", "f", "g", "marginal_error_row", "marginal_error_col",
                 "entropy", "cost", "converged", "diverged"):
        v = getattr(res, name)
        if v is not None:
            setattr(res, name, v[0])
    return res


# ----------------------------------------------------------------------------
# solvers


def sinkhorn_reference(C, k, eps: float = PAPER_EPS, n_iter: int = PAPER_N_ITER, *, b=None,
                       dtype=None, on_diverge: str = "raise", return_plan: bool = True,
                       tol: float = 1e-3) -> OTResult:
    r"""The paper's Sinkhorn-Knopp update, exactly as published (for comparison).

    Solves, approximately, the entropic problem (Point2Mask Eq. 9)::

        min_{pi >= 0} <C, pi> + eps sum_ij pi_ij (log pi_ij - 1)
        s.t. pi 1 = k, pi^T 1 = b (= 1)

    by ``n_iter`` = T alternations of Eq. 10 from ``u = v = 1``: first the
    pixel (column) scaling, then the supplier (row) scaling, and the plan of
    Eq. 11, ``pi = diag(v) K diag(u)`` with ``K = exp(-C / eps)``. As in the
    authors' code the scalings are kept as log-potentials ``f = eps log v``,
    ``g = eps log u``::

        g_j <- eps log b_j - eps log sum_i exp((f_i - C_ij) / eps)
        f_i <- eps log k_i - eps log sum_j exp((g_j - C_ij) / eps)

    No tolerance, no eps-scaling: after T sweeps the row sums are exact and the
    column sums are whatever they are. Use it to reproduce the paper; use
    :func:`transport` for labels.

    Parameters
    ----------
    C : (m, n) or (B, m, n) float tensor
        Cost, in cost units (see the module docstring for the meaning of eps).
    k : (m,) or (B, m)
        Supplier sizes, ``sum(k) = n`` (pixels).
    eps : float
        Regularisation lambda of Eq. 9; the public code uses 1e-3.
    n_iter : int
        T (80 in the paper, Table A2).
    tol : float
        Only used to fill ``converged`` in the result.

    Returns
    -------
    OTResult with the plan, potentials and marginal errors.
    """
    C, a, b, batched = _as_batch(C, k, b, dtype)
    a = _check_balance(a, b, rescale_supply=False)
    logK = -C / eps
    log_a, log_b = a.log(), b.log()
    F = torch.zeros_like(a)  # u^0 = v^0 = 1 (Algorithm 1, line 6)
    G = torch.zeros_like(b)
    for _ in range(n_iter):
        G = log_b - _lse(logK + F[:, :, None], -2)  # Eq. 10, u_j
        F = log_a - _lse(logK + G[:, None, :], -1)  # Eq. 10, v_i
    return _sinkhorn_result(C, logK, F, G, a, b, eps, n_iter, tol, "reference", on_diverge,
                            return_plan, batched)


def sinkhorn_log(C, a, b=None, eps: float = PAPER_EPS, n_iter: int = 2000, tol: float = 1e-3, *,
                 warm_start: tuple | None = None, eps_scaling: float | None = None,
                 check_every: int = 5, dtype=None, on_diverge: str = "raise",
                 return_plan: bool = True, rescale_supply: bool = False) -> OTResult:
    r"""Log-domain Sinkhorn with a marginal tolerance, eps-scaling and warm starts.

    Solves the entropic transport problem (Point2Mask Eq. 9)::

        min_{pi >= 0} <C, pi> + eps sum_ij pi_ij (log pi_ij - 1)
        s.t. pi 1_n = a, pi^T 1_m = b

    by alternating the exact dual maximisations over ``g`` and ``f``
    (the log-domain form of Eq. 10; plan ``pi_ij = exp((f_i + g_j - C_ij)/eps)``)::

        g_j <- eps log b_j - eps LSE_i((f_i - C_ij) / eps)
        f_i <- eps log a_i - eps LSE_j((g_j - C_ij) / eps)

    After each ``f`` update the row sums are exact; the loop stops when the
    column error (pixel units, see the module docstring) is ``<= tol``.

    When to pick it: when a soft plan is wanted (entropic, differentiable). In
    the log domain any eps is safe from under/overflow down to the float type's
    resolution. For sharp plans (eps << cost range) pass ``eps_scaling``: eps
    starts at the cost range and is divided by ``eps_scaling`` per stage down to
    ``eps``, each stage warm-starting the next (Schmitzer 2019), which needs far
    fewer iterations than starting cold at the small eps. For hard labels use
    :func:`solve_exact`.

    Parameters
    ----------
    C : (m, n) or (B, m, n) float tensor
    a : (m,) or (B, m) supplies (``k``); ``b`` : (n,) or (B, n) demands, default 1.
        Zero supplies (demands) give ``-inf`` potentials and an empty row (column).
    eps : float
        Target regularisation, in cost units.
    n_iter : int
        Budget of sweeps over all stages.
    tol : float
        Marginal tolerance (pixel units).
    warm_start : (f, g) or None
        Initial potentials in cost units, e.g. ``(res.f, res.g)`` of a previous
        solve on a similar cost (the next training step).
    eps_scaling : float > 1 or None
        Divide eps by this factor per stage, from the cost spread down to
        ``eps``; intermediate stages stop at a column error of 0.1. If the
        budget runs out before the last stage, the result is the plan at that
        stage's eps (``res.eps``) with ``converged=False``. Measured on
        geodesic costs it helps at a fixed budget on large problems
        (``benchmarks/sinkhorn.py``) but not always on small ones.
    check_every : int
        Sweeps between convergence/divergence checks (the check is nearly free:
        it reuses the next sweep's log-sum-exp).
    on_diverge : "raise" | "flag"
        Non-finite potentials raise :class:`SinkhornDivergenceError`, or give a
        warning with ``diverged=True`` and labels ``-1``.
    rescale_supply : bool
        Rescale ``a`` to ``sum(b)`` instead of raising when they differ.

    Returns
    -------
    OTResult
    """
    C, a, b, batched = _as_batch(C, a, b, dtype)
    a = _check_balance(a, b, rescale_supply)
    _precision_warning(C, eps)
    log_a, log_b = a.log(), b.log()
    if warm_start is None:
        f = torch.zeros_like(a)
        g = torch.zeros_like(b)
    else:
        f, g = (torch.as_tensor(x, device=C.device).to(C.dtype) for x in warm_start)
        f = f.expand_as(a).clone()
        g = g.expand_as(b).clone()
    f = torch.where(a > 0, torch.nan_to_num(f, neginf=0.0), f)
    schedule = [eps]
    if eps_scaling:
        if eps_scaling <= 1:
            raise ValueError(f"eps_scaling: expected a factor > 1, got {eps_scaling}")
        e = max(float(C.max() - C.min()), eps)
        schedule = []
        while e > eps * eps_scaling:
            schedule.append(e)
            e /= eps_scaling
        schedule.append(eps)
    it = 0
    for stage, e in enumerate(schedule):
        last = stage == len(schedule) - 1
        stol = tol if last else max(tol, 0.1)
        logK = -C / e
        F, G = f / e, g / e
        while it < n_iter:
            lse_col = _lse(logK + F[:, :, None], -2)
            if it % check_every == 0:
                # column sums of the current plan, exp(G + lse_col), for free
                col = (G + lse_col).exp()
                unit = b.mean(-1, keepdim=True)
                ec = ((col - b).abs() / torch.maximum(b, unit)).amax(-1)
                bad = ~(torch.isfinite(F) | (a == 0)).all(-1) | torch.isnan(ec)
                if it > 0 and (bool(bad.any()) or bool((ec <= stol).all())):
                    break
            G = log_b - lse_col
            F = log_a - _lse(logK + G[:, None, :], -1)
            it += 1
        f, g = F * e, G * e
        if it >= n_iter:
            break  # budget spent: report the plan at this stage's eps
    eps = e
    return _sinkhorn_result(C, logK, F, G, a, b, eps, it, tol, "sinkhorn_log", on_diverge,
                            return_plan, batched)


def _semi_dual_newton(C, k, w, eps_start, eps_final, tol=0.5, stage_tol=None, max_steps=200):
    """Maximise the entropic semi-dual over supplier weights ``w`` with eps annealing.

    ``F(w) = k.w - eps sum_j LSE_i((w_i - C_ij)/eps)`` (Peyre & Cuturi Sec. 5.3):
    concave, gradient ``k - P 1`` with ``P = softmax_i((w_i - C_ij)/eps)``,
    Hessian ``-(diag(P 1) - P P^T)/eps`` -- only ``m x m``, so Newton is cheap.
    eps goes from ``eps_start`` down to ``eps_final`` by factors of 10; each stage
    takes damped (backtracking) Newton steps until the soft sizes ``P 1`` are
    within ``tol`` pixels of ``k`` (``stage_tol`` before the last stage).
    """
    kd = k.to(torch.float64)
    stage_tol = tol if stage_tol is None else stage_tol
    eye = torch.eye(len(k), dtype=torch.float64, device=C.device)

    def evaluate(w, eps):
        # E = exp(Z - max_i Z), Z = (w_i - C_ij)/eps; softmax P = E / E.sum(0)
        Z = torch.add((w / eps).to(C.dtype)[:, None], C, alpha=-1.0 / eps)
        mx = Z.amax(0)
        E = Z.sub_(mx).clamp_(min=_EXP_FLOOR).exp_()
        s = E.sum(0)
        lse_sum = float(mx.sum(dtype=torch.float64)) + float(s.log().sum(dtype=torch.float64))
        return E, s, float(kd @ w) - eps * lse_sum

    eps = max(eps_start, eps_final)
    E, s, val = evaluate(w, eps)
    steps = 0
    while steps < max_steps:
        P = E.div_(s)
        soft = P.sum(1, dtype=torch.float64)
        grad = kd - soft
        if float(grad.abs().max()) < (tol if eps <= eps_final else stage_tol):
            if eps <= eps_final:
                break
            eps = max(eps / 10, eps_final)
            E, s, val = evaluate(w, eps)
            continue
        steps += 1
        H = (torch.diag(soft) - (P @ P.T).to(torch.float64)) / eps
        ridge = 1e-9 * float(H.diagonal().max()) + 1e-30
        d = torch.linalg.solve(H + ridge * eye, grad)
        d -= d.mean()  # w is defined up to a constant
        slope = float(grad @ d)
        t = 1.0
        for _ in range(40):
            wt = w + t * d
            E, s, vt = evaluate(wt, eps)
            if vt >= val + 1e-4 * t * slope:
                break
            t *= 0.5
        w, val = wt, vt
    return w, steps


def _repair_sizes(C, k, w, labels, max_moves):
    """Successive shortest paths on the supplier graph: make sizes exactly ``k``.

    Invariant (complementary slackness): every pixel's supplier minimises the
    reduced cost ``C_ij - w_i``. Moving pixel ``j`` from supplier ``a`` to ``b``
    costs ``r = (C_bj - w_b) - (C_aj - w_a) >= 0``; the edge ``a -> b`` of the
    ``m``-node graph carries the cheapest such move. Dijkstra from the suppliers
    with surplus to the nearest one with deficit, then ``w_i += min(d_i, d_t)``
    (node potentials, Ahuja et al. Ch. 9) keeps all reduced costs >= 0 and
    makes the path's moves free. Along the path as many pixels move as are tied
    at the cheapest move of every edge (geodesic costs have large tied groups:
    pixels behind a common gateway), at least one. When sizes equal ``k`` the
    labelling is optimal for the transport LP (up to ties within rounding).
    """
    m = len(k)
    moves = 0
    tie = 16 * torch.finfo(C.dtype).eps * float(C.abs().max() + w.abs().max())
    while moves < max_moves:
        excess = (torch.bincount(labels, minlength=m) - k).tolist()
        if not any(excess):
            break
        R = C - w.to(C.dtype)[:, None]
        R -= R.gather(0, labels[None])  # (m, n) cost of moving pixel j to supplier i
        E = torch.full((m, m), math.inf, dtype=C.dtype, device=C.device)
        E = E.scatter_reduce(1, labels[None].expand(m, -1), R, reduce="amin").T  # E[a, b]: a -> b
        En = E.clamp_min(0).tolist()
        dist, prev = [math.inf] * m, [-1] * m
        heap = [(0.0, i) for i in range(m) if excess[i] > 0]
        for _, i in heap:
            dist[i] = 0.0
        heapq.heapify(heap)
        done, target = [False] * m, -1
        while heap:
            d, i = heapq.heappop(heap)
            if done[i]:
                continue
            done[i] = True
            if excess[i] < 0:
                target = i
                break
            for j in range(m):
                nd = d + En[i][j]
                if nd < dist[j]:
                    dist[j], prev[j] = nd, i
                    heapq.heappush(heap, (nd, j))
        if target < 0:
            raise RuntimeError("exact solver: no augmenting path (inconsistent supplies)")
        dt = dist[target]
        w = w + torch.tensor([min(d, dt) for d in dist], dtype=torch.float64, device=C.device)
        path, node = [], target
        while prev[node] >= 0:
            path.append((prev[node], node))
            node = prev[node]
        q = min(excess[node], -excess[target])
        cands = []
        for a, b in path:
            r = torch.where(labels == a, R[b], torch.full_like(R[b], math.inf))
            idx = (r <= E[a, b] + tie).nonzero().flatten()
            cands.append((b, idx, r[idx]))
            q = min(q, len(idx))
        labels = labels.clone()
        for b, idx, r in cands:
            labels[idx[torch.topk(r, q, largest=False).indices]] = b
        moves += 1
    return w, labels, moves


def solve_exact(C, k, *, warm_start=None, dtype=None, eps_final: float | None = None,
                max_moves: int | None = None, rescale_supply: bool = False,
                on_diverge: str = "raise") -> OTResult:
    r"""Exact transport with integer supplies: hard labels with sizes exactly ``k``.

    Solves the unregularised problem (Point2Mask Eq. 1)::

        min_{pi >= 0} <C, pi>   s.t.  pi 1_n = k,  pi^T 1_m = 1_n

    through its dual over the ``m`` supplier weights ``w`` (a power / Laguerre
    assignment)::

        max_w  sum_i k_i w_i + sum_j min_i (C_ij - w_i)

    whose optimal labelling is ``label_j = argmin_i (C_ij - w_i)`` with exactly
    ``k_i`` pixels per supplier. ``w`` is found in two steps:

    1. Newton on the entropic semi-dual with eps annealed from the cost spread
       to ``eps_final`` (an ``m x m`` linear solve per step);
    2. the few pixels still off are moved by successive shortest paths on the
       ``m``-node supplier graph, which keeps every pixel at a minimiser of
       ``C_ij - w_i`` (complementary slackness), so the result is LP-optimal:
       its cost equals ``ot.emd``'s and ``sum k.f + sum g`` (the dual
       objective) equals it too.

    When to pick it: whenever hard pseudo labels are the goal (Algorithm 1's
    argmax of a converged plan tends to this labelling as eps -> 0). It is the
    default of :func:`transport`.

    Parameters
    ----------
    C : (m, n) or (B, m, n) float tensor
    k : (m,) or (B, m)
        Supplies; rounded to integers summing to ``n`` (largest remainder) --
        exactly integer ``k`` summing to ``n`` is left unchanged. A supplier with
        ``k_i = 0`` gets no pixel and ``f_i = -inf``.
    warm_start : (m,) or (B, m) weights ``w`` (``res.f``) of a previous solve.
    eps_final : float
        Last eps of the Newton stage; default ``1e-4`` of the cost spread.
    max_moves : int
        Cap on repair moves (default ``n``); unreached sizes leave ``converged=False``.

    Returns
    -------
    OTResult with ``plan=None``; ``f = w``, ``g_j = min_i (C_ij - w_i)``.
    """
    C, a, b, batched = _as_batch(C, k, None, dtype)
    a = _check_balance(a, b, rescale_supply)
    B, m, n = C.shape
    out = {key: [] for key in ("labels", "f", "g", "er", "ec", "cost", "conv", "div")}
    total_steps = 0
    for bi in range(B):
        Cb = C[bi]
        kb = a[bi]
        if not bool((kb == kb.round()).all()) or int(kb.sum()) != n:
            kb = integer_supply(kb, n).to(C.device)
        kb = kb.to(torch.int64)
        active = (kb > 0).nonzero().flatten()
        Ca, ka = Cb[active], kb[active]
        spread = float(Ca.max() - Ca.min()) or 1.0
        if warm_start is None:
            w = torch.zeros(len(active), dtype=torch.float64, device=C.device)
        else:
            w0 = torch.as_tensor(warm_start, device=C.device).to(torch.float64)
            w = (w0[bi] if w0.ndim == 2 else w0)[active]
            w = torch.nan_to_num(w - w.mean(), neginf=0.0)
        steps = 0
        if len(active) > 1:
            e_final = eps_final or 1e-4 * spread
            # a warm start is already near the optimum: skip the coarse stages
            e_start = e_final if warm_start is not None else spread / 4
            n_coarse = min(8192, n // 4)
            if warm_start is None and n >= 16384:
                # coarse stages on a fixed random subset of pixels: at large eps
                # the soft sizes are smooth and a subset estimates them well
                gen = torch.Generator().manual_seed(0)
                sub = torch.randperm(n, generator=gen)[:n_coarse].to(C.device)
                k_sub = ka.to(torch.float64) * (n_coarse / n)
                e_start = 1e-2 * spread
                w, steps = _semi_dual_newton(Ca[:, sub], k_sub, w, spread / 4, e_start,
                                             tol=0.01 * float(k_sub.mean()))
            mean_k = float(ka.to(torch.float64).mean())
            w, more = _semi_dual_newton(Ca, ka, w, e_start, e_final, tol=0.5, stage_tol=max(0.5, 1e-3 * mean_k))
            steps += more
        lab = (Ca - w.to(Ca.dtype)[:, None]).argmin(0)
        moves = 0
        if len(active) > 1:
            w, lab, moves = _repair_sizes(Ca, ka, w, lab, max_moves if max_moves is not None else n)
        total_steps = max(total_steps, steps + moves)
        diverged = not bool(torch.isfinite(w).all())
        f = torch.full((m,), -math.inf, dtype=torch.float64, device=C.device)
        f[active] = w
        labels = active[lab]
        g = (Cb.to(torch.float64) - f[:, None]).amin(0)
        sizes = torch.bincount(labels, minlength=m)
        er, ec = _marginal_errors(sizes.to(C.dtype)[None], torch.ones(1, n, dtype=C.dtype), kb.to(C.dtype)[None],
                                  torch.ones(1, n, dtype=C.dtype))
        out["labels"].append(torch.full_like(labels, -1) if diverged else labels)
        out["f"].append(f)
        out["g"].append(g)
        out["er"].append(er[0])
        out["ec"].append(ec[0])
        out["cost"].append(Cb.to(torch.float64).gather(0, labels[None]).sum())
        out["conv"].append(bool((sizes == kb).all()) and not diverged)
        out["div"].append(diverged)
    diverged = torch.tensor(out["div"])
    _handle_divergence(diverged, on_diverge, "exact", 0.0, C.dtype)
    res = OTResult(
        labels=torch.stack(out["labels"]),
        plan=None,
        f=torch.stack(out["f"]).to(C.dtype),
        g=torch.stack(out["g"]).to(C.dtype),
        n_iter=total_steps,
        marginal_error_row=torch.stack(out["er"]),
        marginal_error_col=torch.stack(out["ec"]),
        entropy=torch.zeros(B, dtype=C.dtype),
        cost=torch.stack(out["cost"]).to(C.dtype),
        converged=torch.tensor(out["conv"]),
        diverged=diverged,
        method="exact",
        eps=0.0,
    )
    return res if batched else _unbatch(res)


def _sinkhorn_for_transport(C, k, **kw):
    return sinkhorn_log(C, k, kw.pop("b", None), **kw)


#: Solver table: name -> callable(C, k, **kw) -> OTResult.
SOLVERS: dict[str, Callable[..., OTResult]] = {
    "exact": solve_exact,
    "sinkhorn_log": _sinkhorn_for_transport,
    "reference": sinkhorn_reference,
}

#: Chosen by ``benchmarks/sinkhorn.py``: the only solver meeting marginals 1e-3
#: and sizes 0.5% within the time of the paper's T=80 update.
DEFAULT_METHOD = "exact"


def transport(C, k, method: str = DEFAULT_METHOD, **kw) -> OTResult:
    """Transport ``k`` units per point supplier to one unit per pixel; labels per pixel.

    ``C`` ``(m, n)`` or ``(B, m, n)`` is the transport cost (Point2Mask Eq. 3),
    ``k`` ``(m,)`` or ``(B, m)`` the supplier sizes (Eq. 4) with ``sum(k) = n``
    (``rescale_supply=True`` rescales instead of raising). ``method`` names a
    solver in :data:`SOLVERS`; ``kw`` goes to it (``eps``, ``n_iter``, ``tol``,
    ``warm_start``, ``on_diverge``, ``dtype``, ...). Pixels that should not
    take part (e.g. stuff pixels) are dropped by slicing ``C[..., keep]``.

    Batching problems of different ``m``: pad suppliers with ``k = 0`` (they
    receive no pixel).
    """
    try:
        solver = SOLVERS[method]
    except KeyError:
        raise ValueError(f"method: unknown solver {method!r}; choose from {sorted(SOLVERS)}") from None
    return solver(C, k, **kw)


# ----------------------------------------------------------------------------
# matrix scaling


def sinkhorn_knopp(K, n_iter: int = 1000, tol: float = 1e-9, check_every: int = 10) -> torch.Tensor:
    r"""Sinkhorn-Knopp matrix scaling: the doubly stochastic ``A = diag(u) K diag(v)`` of a positive ``K``.

    Solves, for a square ``K > 0`` ``(n, n)`` or ``(B, n, n)``::

        find u, v > 0  s.t.  A = diag(u) K diag(v),  A 1 = 1,  A^T 1 = 1

    by alternating ``v <- 1 / (K^T u)`` and ``u <- 1 / (K v)`` (Sinkhorn &
    Knopp 1967; Knight 2008). After each sweep the row sums are exact; the
    loop stops when every column sum is within ``tol`` of 1 (checked every
    ``check_every`` sweeps) or after ``n_iter`` sweeps. It is the entropic
    transport problem with cost ``-log K``, ``eps = 1`` and unit marginals, so
    :func:`sinkhorn_log` gives the same ``A``; this scaling form needs two
    matrix-vector products per sweep instead of two log-sum-exps over the
    matrix, which makes it the one to pick for a kernel whose entries stay
    within float64's range (``K >= 1e-300``). EXITS (Eq. 2) normalises
    attention matrices with it.

    Returns ``A`` in float64 (batched like ``K``).
    """
    K = torch.as_tensor(K).double()
    batched = K.ndim == 3
    if K.ndim not in (2, 3) or K.shape[-1] != K.shape[-2]:
        raise ValueError(f"K: expected a square (n, n) or (B, n, n) matrix, got {tuple(K.shape)}")
    if not batched:
        K = K[None]
    if not torch.isfinite(K).all() or (K <= 0).any():
        raise ValueError("K: entries must be finite and > 0 (floor them, e.g. K.clamp_min(1e-30))")
    u = torch.ones(K.shape[:2], dtype=K.dtype, device=K.device)
    Kt = K.transpose(1, 2)
    for it in range(int(n_iter)):
        v = 1.0 / torch.bmm(Kt, u[..., None])[..., 0]
        u = 1.0 / torch.bmm(K, v[..., None])[..., 0]
        if (it + 1) % check_every == 0:
            col = v * torch.bmm(Kt, u[..., None])[..., 0]
            if float((col - 1).abs().max()) <= tol:
                break
    A = u[..., None] * K * v[:, None, :]
    return A if batched else A[0]
