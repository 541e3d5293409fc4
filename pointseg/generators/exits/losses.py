"""EXITS losses (Eq. 1, 6-10), one value per object; the stage-1 trainable averages them.

``L_dice(x, y) = 1 - 2 sum(x y) / (sum x^2 + sum y^2 + eps)`` (Sudre et al.
2017, the form of BoxInst / MAL), over all but the batch dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dice_loss", "mil_loss", "point_loss", "crf_loss"]


def dice_loss(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(B, ...) predictions and targets in [0, 1] -> (B,) dice losses."""
    x, y = x.flatten(1), y.flatten(1)
    return 1 - (2 * (x * y).sum(1) + eps) / ((x * x).sum(1) + (y * y).sum(1) + eps)


def mil_loss(mask: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Eq. 1: dice of the column-wise and row-wise max projections of ``mask`` and of the box.

    mask : (B, 1, H, W) probabilities; box : (B, 1, H, W) the filled box ``Y_box``.
    """
    return (dice_loss(mask.amax(-2), box.amax(-2))    # Proj_x: max over each column -> (B, 1, W)
            + dice_loss(mask.amax(-1), box.amax(-1)))  # Proj_y: max over each row -> (B, 1, H)


def point_loss(mask: torch.Tensor, target: torch.Tensor, known: torch.Tensor, retrieved_any: torch.Tensor,
               box: torch.Tensor, lambda_mil: float) -> torch.Tensor:
    """Eq. 8: ``L_dice(M~ . K, Y^) + 1[nothing retrieved] lambda_mil L_mil``.

    mask : (B, 1, H, W) probabilities ``M``; ``M~`` is its area average on the
        (N, N) cell grid of ``target`` (Eq. 6, ``Y^``) and ``known`` (Eq. 7, ``K``),
        both (B, N, N) in {0, 1}; retrieved_any : (B,) bool, ``|P^_FG u P^_BG| > 0``;
        box : (B, 1, H, W) ``Y_box`` for the MIL term.
    """
    small = F.adaptive_avg_pool2d(mask, target.shape[-2:])[:, 0]
    loss = dice_loss(small * known, target)
    mil = mil_loss(mask, box)
    return loss + (~retrieved_any).to(loss.dtype) * lambda_mil * mil


def crf_loss(mask: torch.Tensor, refined: torch.Tensor) -> torch.Tensor:
    """Eq. 9: ``L_dice(M, CRF(M_avg))``; ``refined`` is a fixed target (no gradient)."""
    return dice_loss(mask, refined.detach())
