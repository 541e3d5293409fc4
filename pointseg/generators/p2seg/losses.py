"""The P2Seg losses (Sec. 3.3): ``L = λ_I2S L_I2S + λ_S2I L_S2I``, ``L_S2I = L_off + L_seg``.

Weights (Sec. 4.1): semantic 1.0, offset 0.01, affinity 1.0; hard-pixel ratio
0.2 (Table 5). All three functions take batched tensors and return a scalar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["i2s_loss", "offset_loss", "point_loss", "seg_loss"]


def offset_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Eq. 3: ``L_off = 1/|P| sum_{(i,j) in P} W(i,j) · smoothL1(Ô(i,j) - O(i,j))``.

    pred, target : (B, 2, h, w) offsets ``(dy, dx)`` in pixels; weight : (B, h, w)
    ``W`` in [0, 1]; ``P_pseudo`` = the pixels with ``W > 0`` (the instance
    pixels of the pseudo label). The smooth-L1 (beta 1) of the 2-D vector is the
    sum over its two components. The paper leaves ``W`` undefined; pointseg's
    choice (``offset_weighting``, :class:`~.config.P2SegConfig`) is 1 on every
    pseudo-instance pixel, or the network's confidence in the instance.
    Returns 0 when ``P`` is empty.
    """
    valid = weight > 0
    n = valid.sum()
    if n == 0:
        return pred.sum() * 0.0
    per_px = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0).sum(1)
    return (per_px * weight)[valid].sum() / n


def seg_loss(logits: torch.Tensor, target: torch.Tensor, hard_pixel_ratio: float = 0.2,
             ignore_index: int = -1) -> torch.Tensor:
    """Eq. 4: cross-entropy of the class map, over the hardest ``hard_pixel_ratio`` of the pixels.

    logits : (B, C, h, w); target : (B, h, w) long, ``ignore_index`` = no label.
    Eq. 4 averages ``CE`` over ``P_seg``; the paper's hard-pixel ratio (Table 5,
    0.2) restricts ``P_seg`` to the fraction of labelled pixels of the batch with
    the largest CE (Panoptic-DeepLab's top-k CE, as in the authors' code);
    ``hard_pixel_ratio=1`` is the plain mean. Returns 0 with no labelled pixel.
    """
    if not 0 < hard_pixel_ratio <= 1:
        raise ValueError(f"hard_pixel_ratio must be in (0, 1], got {hard_pixel_ratio}")
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    ce = ce[target != ignore_index]
    if ce.numel() == 0:
        return logits.sum() * 0.0
    if hard_pixel_ratio < 1:
        ce = ce.topk(max(1, int(round(hard_pixel_ratio * ce.numel())))).values
    return ce.mean()


def i2s_loss(affinity_logits: torch.Tensor, affinity: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 5, as printed:

    ``L_I2S = 1/N+ sum_{R+} (2 - σ(A_ij) - σ(Â_ij)) + 1/N- sum_{R-} (σ(A_kl) + σ(Â_kl))``

    affinity_logits : (..., N, N) ``Â``; affinity : (..., N, N) ``A`` in {0, 1}
    (:func:`~.i2s.affinity_targets`); ``R+`` / ``R-`` are the pairs with
    ``A = 1`` / ``A = 0`` over the whole batch, ``N+`` / ``N-`` their counts (a
    missing set contributes 0); valid : optional bool mask broadcast to the
    pairs (the window affinity's in-image pairs), other pairs are in neither
    set. ``σ(A)`` is constant (``σ(1)``, ``σ(0)``), so
    the gradient is that of ``-mean_{R+} σ(Â) + mean_{R-} σ(Â)`` and the loss
    floor is ``2 - σ(1) - 1 + σ(0) ≈ 0.769``, not 0.
    """
    pos = (affinity > 0.5).to(affinity_logits.dtype)
    neg = 1.0 - pos
    if valid is not None:
        pos, neg = pos * valid, neg * valid
    s_hat = torch.sigmoid(affinity_logits)
    s_a = torch.sigmoid(affinity.to(affinity_logits.dtype))
    n_pos, n_neg = pos.sum(), neg.sum()
    # Masks as products, not boolean indexing: no copies of the N x N pairs, no scatter in the backward pass.
    loss_pos = ((2.0 - s_a - s_hat) * pos).sum() / n_pos.clamp(min=1.0)
    loss_neg = ((s_a + s_hat) * neg).sum() / n_neg.clamp(min=1.0)
    return loss_pos + loss_neg


def point_loss(logits: torch.Tensor, point_yx: list[torch.Tensor], point_label: list[torch.Tensor],
               input_size: tuple[int, int]) -> torch.Tensor:
    """Cross-entropy of the class map at the clicks: the authors' code's ``annotation_loss`` (not in the paper).

    logits : (B, C, h, w) class map of inputs of ``input_size = (H, W)``;
    point_yx : B tensors (P_b, 2) float ``(row, col)`` in input pixels;
    point_label : B tensors (P_b,) long, the channel of each click (0 for a
    stuff click, e.g. the VOC-panoptic background click). The logits are read at
    each click by bilinear interpolation (pixel centres, ``align_corners=False``).
    Returns the mean over every click of the batch (0 without clicks).
    """
    H, W = input_size
    picked, labels = [], []
    for b, (yx, lab) in enumerate(zip(point_yx, point_label)):
        if len(yx) == 0:
            continue
        grid = torch.stack([(yx[:, 1] + 0.5) / W * 2 - 1, (yx[:, 0] + 0.5) / H * 2 - 1], -1).to(logits.dtype)
        picked.append(F.grid_sample(logits[b:b + 1], grid.view(1, 1, -1, 2), align_corners=False)[0, :, 0].T)
        labels.append(lab)
    if not picked:
        return logits.sum() * 0.0
    return F.cross_entropy(torch.cat(picked), torch.cat(labels).to(logits.device))
