"""A binary CRF with a local colour + position kernel, inferred by mean field in torch (EXITS Eq. 9).

EXITS refines the averaged student/teacher mask with a CRF (Lafferty et al.
2001) by mean field (Krahenbuhl & Koltun 2011). Here the kernel is local: a
pixel ``i`` is connected to the 8 pixels ``j = i + o`` of a 3 x 3 window with
dilation ``d`` (``o in {-d, 0, d}^2 \\ {0}``), with the dense-CRF weights::

    w_ij = w_app exp(-|p_i - p_j|^2 / 2 theta_pos^2 - |I_i - I_j|^2 / 2 theta_color^2)
         + w_smooth exp(-|p_i - p_j|^2 / 2 theta_pos^2)

(one ``theta_pos`` for both terms). For foreground probability ``q`` and the
unaries ``U_1 = -log p``, ``U_0 = -log(1 - p)`` of the input mask ``p``, mean
field minimises the free energy (KL(Q || P) up to a constant)::

    E(q) = sum_i [q_i U_1(i) + (1 - q_i) U_0(i)]
           - 1/2 sum_i sum_j w_ij [q_i q_j + (1 - q_i)(1 - q_j)]
           + sum_i [q_i log q_i + (1 - q_i) log(1 - q_i)]

(the Potts model's pairwise term, up to a constant). Minimising over one
``q_i`` with the others fixed gives the mean-field update::

    q_i <- sigmoid(logit p_i + sum_j w_ij (2 q_j - 1))

Schedule: updating every pixel at once (``"parallel"``, the usual dense-CRF
loop) can oscillate. ``"blocked"`` (default) updates four colour classes in
turn, ``((row // d) mod 2, (col // d) mod 2)``: no two pixels of a class are
neighbours (an offset of ``d`` flips ``row // d``'s parity), so each class
update is an exact block-coordinate minimisation and ``E`` never increases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["crf_weights", "crf_energy", "mean_field_crf"]

_EPS = 1e-6


def _offsets(dilation: int) -> list[tuple[int, int]]:
    d = int(dilation)
    return [(dy, dx) for dy in (-d, 0, d) for dx in (-d, 0, d) if (dy, dx) != (0, 0)]


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[..., r, c] = x[..., r + dy, c + dx]``, zero outside."""
    H, W = x.shape[-2:]
    p = max(abs(dy), abs(dx))
    xp = F.pad(x, (p, p, p, p))
    return xp[..., p + dy : p + dy + H, p + dx : p + dx + W]


def crf_weights(image: torch.Tensor, dilation: int = 1, theta_color: float = 0.1, theta_pos: float = 3.0,
                w_appearance: float = 1.0, w_smooth: float = 0.5) -> torch.Tensor:
    """``w_ij`` for the 8 window offsets: (B, 8, H, W) from a (B, 3, H, W) image in ``[0, 1]``; 0 off the image."""
    H, W = image.shape[-2:]
    inside = torch.ones(1, 1, H, W, dtype=image.dtype, device=image.device)
    out = []
    for dy, dx in _offsets(dilation):
        pos = torch.exp(torch.tensor(-(dy * dy + dx * dx) / (2 * theta_pos**2), dtype=image.dtype))
        col = ((image - _shift(image, dy, dx)) ** 2).sum(1, keepdim=True)
        w = w_appearance * pos * torch.exp(-col / (2 * theta_color**2)) + w_smooth * pos
        out.append(w * _shift(inside, dy, dx))
    return torch.cat(out, 1)


def _message(q: torch.Tensor, weights: torch.Tensor, dilation: int) -> torch.Tensor:
    """``sum_j w_ij (2 q_j - 1)`` for (B, 1, H, W) q."""
    s = 2 * q - 1
    return sum(weights[:, k : k + 1] * _shift(s, dy, dx) for k, (dy, dx) in enumerate(_offsets(dilation)))


def crf_energy(q: torch.Tensor, prob: torch.Tensor, weights: torch.Tensor, dilation: int) -> torch.Tensor:
    """Mean-field free energy ``E(q)`` (module docstring) per image: (B,)."""
    p = prob.clamp(_EPS, 1 - _EPS)
    qc = q.clamp(_EPS, 1 - _EPS)
    unary = -(q * p.log() + (1 - q) * (1 - p).log())
    pair = sum(weights[:, k : k + 1] * (q * _shift(q, dy, dx) + (1 - q) * _shift(1 - q, dy, dx))
               for k, (dy, dx) in enumerate(_offsets(dilation)))
    # neighbours off the image have w = 0, so their shifted zeros do not matter
    entropy = qc * qc.log() + (1 - qc) * (1 - qc).log()
    return (unary - 0.5 * pair + entropy).flatten(1).sum(1)


def mean_field_crf(prob: torch.Tensor, image: torch.Tensor, iters: int = 5, dilation: int = 1,
                   theta_color: float = 0.1, theta_pos: float = 3.0, w_appearance: float = 1.0,
                   w_smooth: float = 0.5, schedule: str = "blocked", return_energy: bool = False):
    """CRF-refined foreground probability (B, 1, H, W) of a mask ``prob`` (B, 1, H, W) on ``image`` (B, 3, H, W).

    ``iters`` sweeps of the ``schedule`` (module docstring). With
    ``return_energy`` also returns the (iters + 1, B) energies, first the
    input's (``q = p``). No gradient flows (the result is a target).
    """
    if schedule not in ("blocked", "parallel"):
        raise ValueError(f"schedule: 'blocked' or 'parallel', got {schedule!r}")
    with torch.no_grad():
        prob = prob.clamp(_EPS, 1 - _EPS)
        weights = crf_weights(image, dilation, theta_color, theta_pos, w_appearance, w_smooth)
        logit = prob.log() - (1 - prob).log()
        q = prob.clone()
        energies = [crf_energy(q, prob, weights, dilation)] if return_energy else []
        H, W = prob.shape[-2:]
        d = int(dilation)
        rows = (torch.arange(H) // d % 2)[:, None]
        cols = (torch.arange(W) // d % 2)[None, :]
        classes = [((rows == a) & (cols == b)).to(prob.device) for a in (0, 1) for b in (0, 1)]
        for _ in range(int(iters)):
            if schedule == "parallel":
                q = torch.sigmoid(logit + _message(q, weights, d))
            else:
                for cls in classes:
                    q = torch.where(cls, torch.sigmoid(logit + _message(q, weights, d)), q)
            if return_energy:
                energies.append(crf_energy(q, prob, weights, dilation))
    return (q, torch.stack(energies)) if return_energy else q
