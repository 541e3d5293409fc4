"""EXITS point retrieval (Sec. 3.2.1-3.2.2, Eq. 2-5): propagate the extreme points by a random walk.

The crop is an ``N x N`` grid of cells (``n = N^2`` nodes of a fully
connected graph). With a similarity ``S`` ``(n, n)`` between cells (the
head-averaged self-attention of the similarity extractor, or a feature
affinity), the transition matrix is made doubly stochastic and symmetric
(Eq. 2)::

    A = Sinkhorn(S) = diag(u) S diag(v),  A 1 = 1,  A^T 1 = 1
    T = (A + A^T) / 2

Sinkhorn-Knopp (:func:`pointseg.sinkhorn.sinkhorn_knopp`, the matrix-scaling
form of the entropic transport problem with cost ``-log S``, ``eps = 1`` and
unit marginals) finds ``u, v``. The propagation
scores of every cell ``i`` from the initial foreground ``P_FG`` (the extreme
points shifted inward by ``delta``) and background ``P_BG`` (cells outside the
box) are the ``alpha``-hop random-walk probabilities (Eq. 3-4)::

    pi_f(i) = 1/|P_FG| sum_{j in P_FG} T^alpha(j, i)
    pi_b(i) = 1/|P_BG| sum_{j in P_BG} T^alpha(j, i)

computed as ``alpha`` row-vector products (``v <- v T``), never forming
``T^alpha``. Cells in the box are pseudo foreground where ``pi_f - pi_b >=
tau_fg`` and pseudo background where ``pi_f - pi_b <= tau_bg`` (Eq. 5).

The inward shift: the paper prints ``(x_t, y_t - delta)`` and ``(x_b, y_b +
delta)``, which in image coordinates (``y`` down) point *out* of the object;
the text says the shift pushes the points "toward the center", so here the
top point moves down, the bottom point up, the left point right and the
right point left (:func:`inward_points`).
"""

from __future__ import annotations

import torch

from pointseg.sinkhorn import sinkhorn_knopp

__all__ = ["transition_matrix", "random_walk_scores", "retrieve_points", "inward_points", "point_dropout"]

#: Floor of the similarity before ``-log``: attention can underflow to 0, and Sinkhorn needs S > 0.
_S_FLOOR = 1e-30


def transition_matrix(S: torch.Tensor, n_iter: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """Eq. 2: ``T = (A + A^T) / 2`` with ``A = Sinkhorn(S)``.

    S : (B, n, n) or (n, n) non-negative similarity (rows need not be
    normalised; entries are floored at 1e-30, since the scaling needs S > 0).
    Returns T in float64, symmetric, with row and column sums 1 up to the
    Sinkhorn column error (``<= tol`` when converged within ``n_iter`` sweeps;
    the row sums of A are exact after every sweep).
    """
    A = sinkhorn_knopp(S.double().clamp_min(_S_FLOOR), n_iter=n_iter, tol=tol)
    return (A + A.transpose(-1, -2)) / 2


def random_walk_scores(T: torch.Tensor, sources: torch.Tensor, alpha: int) -> torch.Tensor:
    """Eq. 3-4: ``pi(i) = mean_{j in sources} T^alpha(j, i)``.

    T : (B, n, n) transition matrix; sources : (B, n) bool (a row with no
    source gives zeros). Returns (B, n) in T's dtype.
    """
    v = sources.to(T.dtype)
    v = v / v.sum(-1, keepdim=True).clamp_min(1)
    for _ in range(int(alpha)):
        v = torch.bmm(v[:, None, :], T)[:, 0]
    return v


def retrieve_points(T: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, in_box: torch.Tensor, alpha: int,
                    tau_fg: float, tau_bg: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 5: pseudo foreground and background cells in the box.

    T : (B, n, n); fg, bg, in_box : (B, n) bool (``P_FG``, ``P_BG``, ``P_Box``).
    Returns ``(fg_hat, bg_hat, pi_f - pi_b)``: two (B, n) bool masks (cells
    of ``P_FG`` itself are left out of ``fg_hat``) and the score difference.
    """
    diff = random_walk_scores(T, fg, alpha) - random_walk_scores(T, bg, alpha)
    candidates = in_box & ~fg
    return candidates & (diff >= tau_fg), candidates & (diff <= tau_bg), diff


def inward_points(extremes: torch.Tensor, delta: float) -> torch.Tensor:
    """``P_FG``: (B, 4, 2) ``(x, y)`` top, left, bottom, right moved ``delta`` toward the object.

    Top ``(x_t, y_t + delta)``, left ``(x_l + delta, y_l)``, bottom
    ``(x_b, y_b - delta)``, right ``(x_r - delta, y_r)`` (image ``y`` points down;
    the module docstring says why this is not the paper's printed sign).
    """
    shift = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [-1.0, 0.0]], dtype=extremes.dtype,
                         device=extremes.device)
    return extremes + delta * shift


def point_dropout(mask: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Point dropout (Sec. 3.2.2): each ``True`` of ``mask`` survives with probability ``1 - rate``."""
    keep = torch.rand(mask.shape, generator=generator, device=mask.device) >= rate
    return mask & keep
