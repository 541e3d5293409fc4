"""I2S, instance to semantic: instance affinity and the affinity-weighted class map (P2Seg Sec. 3.2).

Wang et al., ICLR 2024, Sec. 3.2. The affinity ``A`` is a pixel-pair matrix:
``A_ij = 1`` when pixels ``i`` and ``j`` belong to the same instance, else 0.
The network predicts affinity logits ``Â`` and a class map ``C``
(``hw x (c + 1)``); the new semantic map is

    S = Â^{∘β} * C          (Hadamard power β of the affinity, then a matrix product)

**Low-resolution grid.** Over all ``HW x HW`` pixel pairs the affinity of a
416-px crop has 117M entries (what made the authors' code slow). Here ``A`` and
``Â`` live on a ``grid x grid`` cell grid (32 x 32 by default: 1M pairs, 4 MB
in float32 per image): the network's stride-8 embedding is average-pooled to
the grid (:class:`~.network.P2SegNet`), and an instance map is reduced to the
grid by the majority label of each cell (:func:`grid_labels`).

Choices where the paper is silent (each a documented key):

* ``Â^{∘β}`` is taken on the affinity *probabilities* ``σ(Â)`` (the paper's
  ``Â`` enters Eq. 5 through ``σ``), and each row is normalised to sum to 1
  (``S_i`` is then a class distribution; the normalisation does not change the
  argmax). ``β`` is the config key ``beta``.
* ``affinity: window`` (our extension, a config key of stage 1): instead of
  the grid, ``Â`` pairs every pixel of the head's map (64 x 64 at stride 4)
  with the ``k x k`` pixels around it (dilation ``d``): ``hw·k²`` pairs, 200k
  for 64² and k = 7, so the semantic map keeps the class map's resolution where
  the 32² grid blurs it. ``A`` (:func:`window_affinity_targets`) and ``S``
  (:func:`i2s_window_semantic`) are the same definitions restricted to the
  window; pairs that fall outside the image are not pairs (``valid``).
* background: the paper's ``A`` names only instance pairs. With
  ``background_affinity`` (default) background cells count as one more segment,
  affine to each other, so that I2S keeps background background; without it,
  every pair involving background is a non-affinity pair.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["affinity_targets", "grid_labels", "i2s_semantic", "i2s_window_semantic", "pixel_cell_affinity",
           "pool_to_grid", "window_affinity", "window_affinity_targets", "window_neighbours"]


def grid_labels(instance: np.ndarray, grid: int) -> np.ndarray:
    """The majority label of every cell of a ``grid x grid`` partition of ``instance``.

    instance : (h, w) int, labels >= -1 (-1 = background, itself a label here).
    Pixel ``(r, c)`` falls in cell ``(r * grid // h, c * grid // w)``; ties go
    to the smaller label. Returns (grid, grid) int64.
    """
    instance = np.asarray(instance, np.int64)
    h, w = instance.shape
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    lab = instance + 1
    if lab.min() < 0:
        raise ValueError(f"instance labels must be >= -1, got {int(instance.min())}")
    n_lab = int(lab.max()) + 1
    cr = (np.arange(h) * grid // h)[:, None]
    cc = (np.arange(w) * grid // w)[None, :]
    cell = cr * grid + cc
    counts = np.bincount((lab * grid * grid + cell).ravel(), minlength=n_lab * grid * grid)
    return counts.reshape(n_lab, grid, grid).argmax(0).astype(np.int64) - 1


def affinity_targets(labels: torch.Tensor, background_affinity: bool = True) -> torch.Tensor:
    """The instance affinity ``A`` of Sec. 3.2 on grid cells.

    labels : (..., N) int, instance label per cell, -1 = background.
    ``A_ij = 1`` iff ``labels_i == labels_j`` and (``background_affinity`` or
    ``labels_i >= 0``). Returns (..., N, N) float32 in {0, 1}.
    """
    same = labels.unsqueeze(-1) == labels.unsqueeze(-2)
    if not background_affinity:
        same = same & (labels >= 0).unsqueeze(-1)
    return same.float()


def pool_to_grid(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, grid * grid): average pooling onto the affinity grid (identity when h = w = grid)."""
    if x.shape[-2:] != (grid, grid):
        x = F.adaptive_avg_pool2d(x, grid)
    return x.flatten(2)


def pixel_cell_affinity(embedding: torch.Tensor, grid: int) -> torch.Tensor:
    """``Â`` logits of every pixel of a (..., D, h, w) embedding against the ``grid²`` cells: (..., h w, grid²).

    ``Â_ij = <e_i, ē_j> / sqrt(D)``, ``e_i`` the embedding at pixel ``i`` and
    ``ē_j`` the embedding average-pooled over cell ``j``. On an embedding
    already on the grid (``h = w = grid``) this is the cell-pair affinity that
    :class:`~.network.P2SegNet` trains; on a finer one, the same with its rows
    refined to the pixels.
    """
    d, h, w = embedding.shape[-3:]
    flat = embedding.reshape(-1, d, h, w)
    cells = pool_to_grid(flat, grid)
    return (flat.flatten(2).transpose(1, 2) @ cells / math.sqrt(d)).reshape(*embedding.shape[:-3], h * w, grid * grid)


def i2s_semantic(affinity_logits: torch.Tensor, class_prob: torch.Tensor, beta: float) -> torch.Tensor:
    """The I2S semantic map ``S = Â^{∘β} * C`` (Sec. 3.2), rows of ``σ(Â)^β`` normalised.

    ``S_i = sum_j w_ij C_j`` with ``w_ij = σ(Â_ij)^β / sum_l σ(Â_il)^β``
    (computed in the log domain: ``softmax_j(β · log σ(Â_ij))``).

    affinity_logits : (..., N, N) float ``Â``; class_prob : (..., K, N) float,
    a class distribution per cell; beta : the Hadamard power ``β >= 0``
    (0: every cell gets the image's mean distribution; large: only the most
    affine cells count). Returns (..., K, N), a class distribution per cell.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    weights = torch.softmax(beta * F.logsigmoid(affinity_logits), dim=-1)
    return torch.einsum("...kj,...ij->...ki", class_prob, weights)


def window_neighbours(x: torch.Tensor, k: int, dilation: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k x k`` window (dilation ``d``) around every pixel of a (B, C, h, w) map.

    Returns ``(values, valid)``: values (B, C, k², h w), the neighbour of pixel
    ``i`` at window offset ``n`` (row-major over ``dy, dx`` in ``-r..r`` times
    ``d``, ``r = k // 2``), 0 outside the image; valid (k², h w) bool, False
    where that neighbour lies outside the image.
    """
    if k < 1 or k % 2 == 0:
        raise ValueError(f"window must be an odd size >= 1, got {k}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    b, c, h, w = x.shape
    pad = (k // 2) * dilation
    values = F.unfold(x, k, dilation=dilation, padding=pad).view(b, c, k * k, h * w)
    ones = torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device)
    valid = F.unfold(ones, k, dilation=dilation, padding=pad).view(k * k, h * w) > 0.5
    return values, valid


def window_affinity(embedding: torch.Tensor, k: int, dilation: int = 1) -> torch.Tensor:
    """``Â`` logits of every pixel of a (B, D, h, w) embedding against its window: (B, k², h w).

    ``Â_in = <e_i, e_{i + δ_n}> / sqrt(D)`` (the dot-product affinity of the
    grid, :func:`pixel_cell_affinity`, restricted to the window); 0 for a
    neighbour outside the image (mask it with :func:`window_neighbours`' valid).
    """
    d = embedding.shape[1]
    values, _ = window_neighbours(embedding, k, dilation)
    return (values * embedding.flatten(2).unsqueeze(2)).sum(1) / math.sqrt(d)


def window_affinity_targets(labels: torch.Tensor, k: int, dilation: int = 1,
                            background_affinity: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The instance affinity ``A`` of Sec. 3.2 on the window pairs.

    labels : (B, h, w) int, instance label per pixel, -1 = background.
    ``A_in = 1`` iff pixel ``i`` and its ``n``-th neighbour share a label (and
    ``background_affinity`` or that label is an instance). Returns ``(A, valid)``:
    A (B, k², h w) float32 in {0, 1}, valid (k², h w) bool.
    """
    lab = labels.unsqueeze(1).float()
    values, valid = window_neighbours(lab, k, dilation)
    centre = lab.flatten(2).unsqueeze(2)
    same = values[:, 0] == centre[:, 0]
    if not background_affinity:
        same = same & (centre[:, 0] >= 0)
    return (same & valid).float(), valid


def i2s_window_semantic(affinity_logits: torch.Tensor, class_prob: torch.Tensor, beta: float, k: int,
                        dilation: int = 1) -> torch.Tensor:
    """``S = Â^{∘β} * C`` on the window pairs: ``S_i = sum_n w_in C_{i + δ_n}``.

    ``w_in = σ(Â_in)^β / sum_m σ(Â_im)^β`` over the neighbours inside the image
    (as :func:`i2s_semantic`, the rows restricted to the window).
    affinity_logits : (B, k², h w); class_prob : (B, K, h, w). Returns (B, K, h, w).
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    cls, valid = window_neighbours(class_prob, k, dilation)
    logw = (beta * F.logsigmoid(affinity_logits)).masked_fill(~valid, float("-inf"))
    weights = torch.softmax(logw, dim=1)
    return (cls * weights.unsqueeze(1)).sum(2).view_as(class_prob)
