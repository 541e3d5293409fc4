"""Point2Mask training losses for the task-oriented maps ``P^s`` and ``P^b_high``.

Point2Mask (Li et al., ICCV 2023) learns the category-wise semantic map ``P^s``
and the high-level boundary map ``P^b_high`` from one point per segment
(Sec. 3.4.1)::

    L_sem = L_partial + alpha_1 * L_sem^LAB + alpha_2 * L_sem^RGB      (Eq. 5)
    L     = L_sem + L_bou                                              (Eq. 8, without L_full)

Functions
---------
partial_cross_entropy  ``L_partial``: cross-entropy at the labelled points only (Appendix B).
lab_affinity           the LAB-similar neighbour pairs of ``L_sem^LAB`` (Eq. 12-13), once per image batch.
local_affinity_loss    ``L_sem^LAB``: same-label probability of LAB-similar 8-neighbours (Eq. 12-13).
grid_mst               minimum spanning tree of the 4-connected pixel grid, RGB edge lengths.
tree_filter            ``sum_j S_ij x_j / sum_j S_ij`` over the MST, O(N) (Eq. 14).
tree_loss              ``L_sem^RGB``: L1 between ``P^s`` and its tree-filtered copy (Eq. 15).
boundary_targets       pixels next to a different pseudo segment (for inspection / plots).
boundary_loss          ``L_bou``: affinity loss on ``P^b_high`` from the pseudo masks (Eq. 6-7).
point2mask_loss        all terms weighted by :class:`Point2MaskLossConfig`.

Everything runs on the CPU in torch / numpy / numba; no CUDA extension.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit
from pydantic import BaseModel, ConfigDict, Field
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, minimum_spanning_tree

from pointseg.data.record import VOID
from pointseg.lowlevel import rgb_to_lab

__all__ = [
    "Point2MaskLossConfig",
    "SpanningTree",
    "partial_cross_entropy",
    "lab_affinity",
    "local_affinity_loss",
    "grid_mst",
    "tree_filter",
    "tree_loss",
    "boundary_targets",
    "boundary_loss",
    "point2mask_loss",
]

# Each unordered pair of 8-neighbours once: right, down, down-right, down-left.
# Eq. 13 and Eq. 7 sum over ordered pairs (every pair twice) in numerator and
# normaliser alike, so the ratio is the same.
_HALF_NEIGHBOURS_8 = ((0, 1), (1, 0), (1, 1), (1, -1))


class Point2MaskLossConfig(BaseModel):
    """Weights and hyper-parameters of the Point2Mask map losses.

    Defaults are the paper's: ``alpha_1 = alpha_2 = 3`` (Sec. 4.2),
    ``tau = 0.3``, ``theta_1 = 2``, ``theta_2 = 0.02`` (Appendix B). The
    ``use_*`` switches give the ablations of Table 4 (``use_lab`` /
    ``use_rgb``) and, with ``use_boundary=False``, a model without the
    ``L_bou``-trained ``P^b_high`` map of Table 3.
    """

    model_config = ConfigDict(extra="forbid")

    use_partial: bool = True
    use_lab: bool = True
    use_rgb: bool = True
    use_boundary: bool = True
    alpha_lab: float = Field(3.0, ge=0, description="alpha_1 of Eq. 5")
    alpha_rgb: float = Field(3.0, ge=0, description="alpha_2 of Eq. 5")
    boundary_weight: float = Field(1.0, ge=0, description="weight of L_bou (1 in Eq. 8)")
    tau: float = Field(0.3, ge=0, le=1, description="LAB affinity threshold, Eq. 13")
    theta1: float = Field(2.0, gt=0, description="LAB similarity scale, Eq. 12")
    lab_dilation: int = Field(2, ge=1, description="neighbour spacing of the local LAB kernel")
    theta2: float = Field(0.02, gt=0, description="RGB tree similarity scale, Eq. 14 (RGB in [0, 1])")
    loss_stride: int = Field(1, ge=1, description="compute L_sem^LAB / L_sem^RGB at 1/loss_stride resolution")
    eps: float = Field(1e-5, gt=0, description="log guard of L_bou")
    present_classes: bool = Field(
        True, description="semantic terms on the softmax over the classes among the image's points (image-level "
        "labels, as the authors' code masks P^s with cls_labels); False: over all C classes")


# --------------------------------------------------------------------- L_partial


def partial_cross_entropy(
    logits: torch.Tensor,
    point_yx: list[torch.Tensor],
    point_labels: list[torch.Tensor],
    ignore_index: int = -1,
) -> torch.Tensor:
    """Partial cross-entropy ``L_partial``: CE only at the labelled points.

    ::

        L_partial = -1/|P| * sum_{(b, p, c) in P} log softmax(logits[b, :, p])[c]

    Parameters
    ----------
    logits : (B, C, H, W) float, semantic logits ``P^s`` before softmax.
    point_yx : B tensors of shape (P_b, 2) long, ``(row, col)`` in the logits grid.
    point_labels : B tensors of shape (P_b,) long, class index in ``[0, C)``;
        ``ignore_index`` marks a point to skip.

    Returns
    -------
    loss : scalar, the mean over all kept points of the batch (0 with a
        gradient path if there is none).
    """
    b, c, h, w = logits.shape
    if len(point_yx) != b or len(point_labels) != b:
        raise ValueError(f"partial_cross_entropy: {b} images but {len(point_yx)} point_yx / {len(point_labels)} point_labels")
    picked, targets = [], []
    for i, (yx, lab) in enumerate(zip(point_yx, point_labels)):
        yx = torch.as_tensor(yx, dtype=torch.long, device=logits.device).reshape(-1, 2)
        lab = torch.as_tensor(lab, dtype=torch.long, device=logits.device).reshape(-1)
        if len(yx) != len(lab):
            raise ValueError(f"partial_cross_entropy: image {i} has {len(yx)} points but {len(lab)} labels")
        keep = lab != ignore_index
        yx, lab = yx[keep], lab[keep]
        if len(lab) == 0:
            continue
        if (lab < 0).any() or (lab >= c).any():
            raise ValueError(f"partial_cross_entropy: image {i} point_labels outside [0, {c}): {lab.tolist()}")
        if (yx[:, 0] < 0).any() or (yx[:, 0] >= h).any() or (yx[:, 1] < 0).any() or (yx[:, 1] >= w).any():
            raise ValueError(f"partial_cross_entropy: image {i} point_yx outside the {h}x{w} grid: {yx.tolist()}")
        picked.append(logits[i][:, yx[:, 0], yx[:, 1]].T)  # (P, C)
        targets.append(lab)
    if not picked:
        return logits.sum() * 0.0
    return F.cross_entropy(torch.cat(picked), torch.cat(targets))


# ------------------------------------------------------------------ L_sem^LAB


def _pair_slices(h: int, w: int, dy: int, dx: int):
    """Slices ``(a, b)`` so that ``x[..., a]`` and ``x[..., b]`` are the pixels
    ``p`` and ``p + (dy, dx)``, both inside an ``h x w`` image."""
    ys_a, ys_b = slice(0, h - dy), slice(dy, h)
    if dx >= 0:
        xs_a, xs_b = slice(0, w - dx), slice(dx, w)
    else:
        xs_a, xs_b = slice(-dx, w), slice(0, w + dx)
    return (..., ys_a, xs_a), (..., ys_b, xs_b)


def lab_affinity(lab: torch.Tensor, tau: float = 0.3, theta1: float = 2.0,
                 dilation: int = 2) -> list[tuple[tuple, tuple, torch.Tensor]]:
    """The neighbour pairs of ``L_sem^LAB`` that pass the threshold (Eq. 12-13), once per image batch.

    For each unordered 8-neighbour offset at spacing ``dilation`` (pairs
    leaving the image dropped): the slices ``(a, c)`` that select the pixels
    ``p`` and ``p + offset`` of a ``(..., H, W)`` tensor, and
    ``keep = 1[exp(-||r_p - r_{p+offset}||_2 / theta_1) >= tau]`` (B, H', W')
    float. It depends on the image only, so a loss over several predictions of
    one image (e.g. every decoder layer) computes it once.

    lab : (B, 3, H, W) float, L*a*b* in real units (L in [0, 100]).
    """
    h, w = lab.shape[-2:]
    out = []
    for dy, dx in _HALF_NEIGHBOURS_8:
        dy, dx = dy * dilation, dx * dilation
        if dy >= h or abs(dx) >= w:
            continue
        a, c = _pair_slices(h, w, dy, dx)
        similarity = torch.exp(-torch.linalg.vector_norm(lab[a] - lab[c], dim=1) / theta1)  # Eq. 12
        out.append((a, c, (similarity >= tau).to(lab.dtype)))
    return out


def local_affinity_loss(
    probs: torch.Tensor,
    lab: torch.Tensor | None = None,
    tau: float = 0.3,
    theta1: float = 2.0,
    dilation: int = 2,
    affinity: list | None = None,
) -> torch.Tensor:
    """Local LAB affinity loss ``L_sem^LAB`` (Point2Mask Appendix B, Eq. 12-13; BoxInst).

    ::

        S_ij     = exp(-||r_i - r_j||_2 / theta_1)                         (Eq. 12)
        L^LAB    = -1/z_1 sum_i sum_{j in N_8(i)} 1[S_ij >= tau] log sum_c P_i^c P_j^c   (Eq. 13)
        z_1      = sum_i sum_{j in N_8(i)} 1[S_ij >= tau]

    ``r`` is the L*a*b* colour; ``sum_c P_i^c P_j^c`` is the probability that
    ``i`` and ``j`` take the same class. ``N_8`` are the 8 neighbours at
    spacing ``dilation`` (2 in BoxInst and the Point2Mask code); pairs leaving
    the image are not counted. Normalised per image, then averaged over the
    batch.

    Parameters
    ----------
    probs : (B, C, H, W) float, softmax probabilities ``P^s``.
    lab : (B, 3, H, W) float, L*a*b* in real units (L in [0, 100]).
    affinity : instead of ``lab``, ``tau``, ``theta1``, ``dilation``: the pairs
        from :func:`lab_affinity` of the same images.

    Returns
    -------
    loss : scalar tensor (0 if no pair passes the threshold).
    """
    if affinity is None:
        if probs.ndim != 4 or lab is None or lab.shape != (probs.shape[0], 3, *probs.shape[2:]):
            shape = None if lab is None else tuple(lab.shape)
            raise ValueError(f"local_affinity_loss: probs {tuple(probs.shape)} and lab {shape} disagree")
        affinity = lab_affinity(lab, tau, theta1, dilation)
    b = probs.shape[0]
    log_p = torch.log(probs.clamp_min(1e-12))
    total = probs.new_zeros(b)
    count = probs.new_zeros(b)
    for a, c, keep in affinity:
        keep = keep.to(probs.dtype)  # (B, h', w')
        log_same = torch.logsumexp(log_p[a] + log_p[c], dim=1)  # log sum_c P_i^c P_j^c
        total = total - (log_same * keep).sum(dim=(1, 2))
        count = count + keep.sum(dim=(1, 2))
    return (total / count.clamp_min(1.0)).mean()  # Eq. 13, z_1 per image


# ------------------------------------------------------------------ L_sem^RGB


@dataclass(frozen=True)
class SpanningTree:
    """A spanning tree of the ``H x W`` pixel grid, rooted at pixel 0.

    Attributes
    ----------
    order : (N,) int64, breadth-first order from the root (``order[0]`` is the root).
    parent : (N,) int64, parent pixel (flat index ``y * W + x``), -1 at the root.
    dist : (N,) float64, length ``||r_v - r_parent(v)||^2`` of the edge to the parent, 0 at the root.
    """

    order: np.ndarray
    parent: np.ndarray
    dist: np.ndarray

    def edges(self) -> np.ndarray:
        """(N - 1, 2) int64 ``(child, parent)`` pairs."""
        child = self.order[1:]
        return np.stack([child, self.parent[child]], axis=1)


def grid_mst(guide: np.ndarray) -> SpanningTree:
    """Minimum spanning tree of the 4-connected grid with squared colour edge lengths.

    The edge between 4-neighbours ``k`` and ``l`` has length
    ``d_kl = ||r_k - r_l||_2^2`` (the ``norm2_distance`` of the TreeFilter code
    used by Point2Mask Eq. 14). The MST is found by ``scipy``'s Kruskal on
    lengths ``d_kl + 1``: scipy drops zero entries as missing edges, and a
    constant offset on every edge of a spanning tree does not change which
    tree is minimal.

    Parameters
    ----------
    guide : (H, W, C) float, e.g. RGB in ``[0, 1]``. Not differentiated.

    Returns
    -------
    tree : :class:`SpanningTree` with ``N = H * W`` vertices.
    """
    guide = np.asarray(guide, dtype=np.float64)
    if guide.ndim != 3:
        raise ValueError(f"grid_mst: guide must be (H, W, C), got shape {guide.shape}")
    h, w, _ = guide.shape
    n = h * w
    idx = np.arange(n).reshape(h, w)
    u = np.concatenate([idx[:, :-1].ravel(), idx[:-1, :].ravel()])
    v = np.concatenate([idx[:, 1:].ravel(), idx[1:, :].ravel()])
    flat = guide.reshape(n, -1)
    d = ((flat[u] - flat[v]) ** 2).sum(axis=1)
    mst = minimum_spanning_tree(coo_matrix((d + 1.0, (u, v)), shape=(n, n)).tocsr())
    order, pred = breadth_first_order(mst, 0, directed=False, return_predecessors=True)
    if len(order) != n:
        raise RuntimeError(f"grid_mst: spanning tree reaches {len(order)} of {n} pixels")
    parent = pred.astype(np.int64)
    parent[order[0]] = -1
    dist = np.zeros(n, dtype=np.float64)
    child = order[1:]
    dist[child] = ((flat[child] - flat[parent[child]]) ** 2).sum(axis=1)
    return SpanningTree(order.astype(np.int64), parent, dist)


@njit(cache=True)
def _tree_aggregate(x, order, parent, weight):  # pragma: no cover - numba
    """``y_i = sum_j S_ij x_j`` with ``S_ij`` = product of edge weights on the tree path.

    Leaf-to-root then root-to-leaf pass, O(N C)."""
    n, c = x.shape
    up = x.copy()  # up[v] = sum over the subtree of v
    for t in range(n - 1, 0, -1):
        v = order[t]
        p = parent[v]
        wv = weight[v]
        for k in range(c):
            up[p, k] += wv * up[v, k]
    out = np.empty_like(up)
    r = order[0]
    for k in range(c):
        out[r, k] = up[r, k]
    for t in range(1, n):
        v = order[t]
        p = parent[v]
        wv = weight[v]
        for k in range(c):
            out[v, k] = up[v, k] + wv * (out[p, k] - wv * up[v, k])
    return out


class _TreeAggregate(torch.autograd.Function):
    """``y = S x`` for the symmetric tree affinity ``S``; the backward is ``S g``."""

    @staticmethod
    def forward(ctx, x, order, parent, weight):
        ctx.tree = (order, parent, weight)
        y = _tree_aggregate(x.detach().cpu().double().numpy(), order, parent, weight)
        return torch.from_numpy(y).to(device=x.device, dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad):
        order, parent, weight = ctx.tree
        g = _tree_aggregate(grad.detach().cpu().double().numpy(), order, parent, weight)
        return torch.from_numpy(g).to(device=grad.device, dtype=grad.dtype), None, None, None


def tree_filter(features: torch.Tensor, guide: torch.Tensor, theta2: float = 0.02) -> torch.Tensor:
    """Tree filter over the colour MST (Point2Mask Eq. 14-15, TreeFilter / TEL).

    ::

        S_ij = exp(-sum_{(l,k) in E(i,j)} ||r_l - r_k||^2 / theta_2)       (Eq. 14)
        out_i = sum_j S_ij x_j / sum_j S_ij

    ``E(i, j)`` is the path from ``i`` to ``j`` on :func:`grid_mst` of
    ``guide``; ``S_ij`` is the product of per-edge weights
    ``exp(-d_lk / theta_2)``, so both sums come from one leaf-to-root and one
    root-to-leaf pass (O(N) per channel). Differentiable in ``features``; the
    tree and ``S`` are built from the detached ``guide``.

    Parameters
    ----------
    features : (B, C, H, W) float, e.g. probabilities ``P^s``.
    guide : (B, K, H, W) float, e.g. RGB in ``[0, 1]``.

    Returns
    -------
    filtered : (B, C, H, W), same dtype as ``features``.
    """
    if features.ndim != 4 or guide.ndim != 4 or guide.shape[0] != features.shape[0] or guide.shape[2:] != features.shape[2:]:  # noqa: E501
        raise ValueError(f"tree_filter: features {tuple(features.shape)} and guide {tuple(guide.shape)} disagree")
    b, c, h, w = features.shape
    out = []
    for i in range(b):
        tree = grid_mst(guide[i].detach().permute(1, 2, 0).cpu().double().numpy())
        weight = np.exp(-tree.dist / theta2)
        norm = _tree_aggregate(np.ones((h * w, 1)), tree.order, tree.parent, weight)[:, 0]  # z_2 of Eq. 15
        x = features[i].reshape(c, h * w).T
        y = _TreeAggregate.apply(x, tree.order, tree.parent, weight)
        y = y / torch.from_numpy(norm).to(y)[:, None]
        out.append(y.T.reshape(c, h, w))
    return torch.stack(out)


def tree_loss(probs: torch.Tensor, rgb: torch.Tensor, theta2: float = 0.02) -> torch.Tensor:
    """Long-range RGB loss ``L_sem^RGB`` (Point2Mask Appendix B, Eq. 15; TEL).

    ::

        L^RGB = 1/n sum_i || P_i - 1/z_2 sum_j S_ij^RGB P_j ||_1          (Eq. 15)

    (Eq. 15 prints a leading minus sign; the loss to minimise, as in the
    Point2Mask / TEL code, is the positive L1 distance.) ``||.||_1`` runs over
    the classes, the mean over pixels and images. The gradient flows through
    both ``P`` and the filtered ``P``.

    Parameters
    ----------
    probs : (B, C, H, W) softmax probabilities.
    rgb : (B, 3, H, W) RGB in ``[0, 1]``. The official code feeds the
        ImageNet-normalised image instead, whose squared distances are about
        19x larger (like ``theta_2 ~ 0.001`` here).
    """
    filtered = tree_filter(probs, rgb, theta2)
    return (probs - filtered).abs().sum(dim=1).mean()


# ----------------------------------------------------------------------- L_bou


def boundary_targets(pseudo_ids: torch.Tensor, void: int = VOID) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood holds a different (non-void) pseudo segment.

    These are the pixels in at least one ``M^-`` pair of Eq. 7, i.e. where
    ``L_bou`` pushes ``P^b_high`` up.

    Parameters
    ----------
    pseudo_ids : (B, H, W) long segment ids; ``void`` pixels are never boundary.

    Returns
    -------
    (B, H, W) bool.
    """
    if pseudo_ids.ndim != 3:
        raise ValueError(f"boundary_targets: pseudo_ids must be (B, H, W), got {tuple(pseudo_ids.shape)}")
    _, h, w = pseudo_ids.shape
    out = torch.zeros_like(pseudo_ids, dtype=torch.bool)
    for dy, dx in _HALF_NEIGHBOURS_8:
        if dy >= h or abs(dx) >= w:
            continue
        a, c = _pair_slices(h, w, dy, dx)
        ka, kc = pseudo_ids[a], pseudo_ids[c]
        differ = (ka != kc) & (ka != void) & (kc != void)
        out[a] |= differ
        out[c] |= differ
    return out


def boundary_loss(
    boundary: torch.Tensor,
    pseudo_ids: torch.Tensor,
    thing_map: torch.Tensor | None = None,
    void: int = VOID,
    eps: float = 1e-5,
) -> torch.Tensor:
    """High-level boundary loss ``L_bou`` (Point2Mask Eq. 6-7).

    For 8-neighbours ``p_k``, ``p_l``::

        A_kl  = 1 - max(P^b(p_k), P^b(p_l))                                 (Eq. 6)
        L_bou = - sum_{M+_thing} log A_kl / (2|M+_thing|)
                - sum_{M+_stuff} log A_kl / (2|M+_stuff|)
                - sum_{M-} log(1 - A_kl) / |M-|                             (Eq. 7)

    ``M+_thing`` / ``M+_stuff``: pairs inside the same thing / stuff pseudo
    segment; ``M-``: pairs in different segments. Pairs touching a ``void``
    pixel are left out. If one of the two positive sets is empty the other
    takes the whole positive weight (Eq. 7 is undefined there); a missing
    ``thing_map`` treats every segment as a thing. Computed per image
    (``eps`` guards the logs, as in the official code) and averaged.

    Parameters
    ----------
    boundary : (B, 1, H, W) ``P^b_high`` in ``[0, 1]`` (after the sigmoid).
    pseudo_ids : (B, H, W) long pseudo segment ids (current pseudo masks).
    thing_map : (B, H, W) bool, True on thing segments; optional.
    """
    if boundary.ndim != 4 or boundary.shape[1] != 1 or (boundary.shape[0], *boundary.shape[2:]) != tuple(pseudo_ids.shape):
        raise ValueError(f"boundary_loss: boundary {tuple(boundary.shape)} and pseudo_ids {tuple(pseudo_ids.shape)} disagree")
    if thing_map is None:
        thing_map = torch.ones_like(pseudo_ids, dtype=torch.bool)
    elif thing_map.shape != pseudo_ids.shape:
        raise ValueError(f"boundary_loss: thing_map {tuple(thing_map.shape)} must match pseudo_ids {tuple(pseudo_ids.shape)}")
    pb = boundary[:, 0]
    b, h, w = pb.shape
    zeros = pb.new_zeros(b)
    sums = {"thing": zeros, "stuff": zeros, "neg": zeros}
    counts = {"thing": zeros, "stuff": zeros, "neg": zeros}
    for dy, dx in _HALF_NEIGHBOURS_8:
        if dy >= h or abs(dx) >= w:
            continue
        a, c = _pair_slices(h, w, dy, dx)
        ka, kc = pseudo_ids[a], pseudo_ids[c]
        valid = (ka != void) & (kc != void)
        same = ka == kc
        affinity = 1.0 - torch.maximum(pb[a], pb[c])  # Eq. 6
        pos_term = -torch.log(affinity + eps)
        neg_term = -torch.log(1.0 + eps - affinity)
        sets = {
            "thing": (valid & same & thing_map[a], pos_term),
            "stuff": (valid & same & ~thing_map[a], pos_term),
            "neg": (valid & ~same, neg_term),
        }
        for key, (mask, term) in sets.items():
            m = mask.to(pb.dtype)
            sums[key] = sums[key] + (term * m).sum(dim=(1, 2))
            counts[key] = counts[key] + m.sum(dim=(1, 2))
    means = {k: sums[k] / counts[k].clamp_min(1.0) for k in sums}
    has = {k: (counts[k] > 0).to(pb.dtype) for k in counts}
    n_pos = (has["thing"] + has["stuff"]).clamp_min(1.0)
    loss = (means["thing"] * has["thing"] + means["stuff"] * has["stuff"]) / n_pos + means["neg"]  # Eq. 7
    return loss.mean()


# ---------------------------------------------------------------------- total


def _lab_of(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 3, H, W) L*a*b*, via :func:`pointseg.lowlevel.rgb_to_lab`."""
    labs = [rgb_to_lab(im.detach().permute(1, 2, 0).cpu().float().numpy()) for im in image]
    return torch.from_numpy(np.stack(labs)).permute(0, 3, 1, 2).to(device=image.device, dtype=image.dtype)


def point2mask_loss(
    outputs: dict[str, torch.Tensor],
    batch: dict,
    config: Point2MaskLossConfig | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_partial + alpha_1 L^LAB + alpha_2 L^RGB + w_bou L_bou`` (Eq. 5 and 8).

    Parameters
    ----------
    outputs : ``MapNet`` outputs: ``sem_logits`` (B, C, H, W) and ``boundary``
        (B, 1, H, W) in ``[0, 1]``.
    batch : dict with
        ``image`` (B, 3, H, W) float RGB in ``[0, 1]``;
        ``point_yx`` B tensors (P_b, 2) long ``(row, col)``;
        ``point_labels`` B tensors (P_b,) long class indices;
        ``lab`` (B, 3, H, W), optional (computed from ``image`` if absent);
        ``pseudo_ids`` (B, H, W) long, optional: current pseudo masks. Without
        them the ``L_bou`` term is left out (e.g. before the first pseudo labels);
        ``thing_map`` (B, H, W) bool, optional.
    config : :class:`Point2MaskLossConfig` (defaults if ``None``). With
        ``present_classes`` (default) the semantic terms see each image's
        softmax over the classes among its points (:func:`_present_class_terms`).

    Returns
    -------
    total : scalar tensor.
    terms : unweighted terms ``partial``, ``lab``, ``rgb``, ``boundary`` (those
        that were computed), detached.
    """
    config = config or Point2MaskLossConfig()
    logits = outputs["sem_logits"]
    image = batch["image"]
    if image.shape[0] != logits.shape[0] or image.shape[2:] != logits.shape[2:]:
        raise ValueError(f"point2mask_loss: batch['image'] {tuple(image.shape)} does not match sem_logits {tuple(logits.shape)}")
    terms: dict[str, torch.Tensor] = {}
    total = logits.sum() * 0.0
    if config.present_classes:
        sem = _present_class_terms(logits, image, batch, config)
    else:
        sem = _semantic_terms(logits, image, batch.get("lab"), batch["point_yx"], batch["point_labels"], config)
    weights = {"partial": 1.0, "lab": config.alpha_lab, "rgb": config.alpha_rgb}
    for name, value in sem.items():
        terms[name] = value
        total = total + weights[name] * value
    if config.use_boundary and batch.get("pseudo_ids") is not None:
        terms["boundary"] = boundary_loss(outputs["boundary"], batch["pseudo_ids"], batch.get("thing_map"), eps=config.eps)
        total = total + config.boundary_weight * terms["boundary"]
    return total, {k: v.detach() for k, v in terms.items()}


def _semantic_terms(logits, image, lab, point_yx, point_labels, config: Point2MaskLossConfig) -> dict[str, torch.Tensor]:
    """``L_partial``, ``L_sem^LAB``, ``L_sem^RGB`` (those switched on) of a batch, unweighted."""
    terms: dict[str, torch.Tensor] = {}
    if config.use_partial:
        terms["partial"] = partial_cross_entropy(logits, point_yx, point_labels)
    if config.use_lab or config.use_rgb:
        s = config.loss_stride
        small_logits, small_image = logits, image
        if s > 1:
            size = (max(1, logits.shape[2] // s), max(1, logits.shape[3] // s))
            small_logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            small_image = F.interpolate(image, size=size, mode="area")
            lab = F.interpolate(lab, size=size, mode="area") if lab is not None else None
        probs = small_logits.softmax(dim=1)
        if config.use_lab:
            lab = _lab_of(small_image) if lab is None else lab
            terms["lab"] = local_affinity_loss(probs, lab, config.tau, config.theta1, config.lab_dilation)
        if config.use_rgb:
            terms["rgb"] = tree_loss(probs, small_image, config.theta2)
    return terms


def _present_class_terms(logits, image, batch: dict, config: Point2MaskLossConfig) -> dict[str, torch.Tensor]:
    """The semantic terms with ``P^s`` = softmax over the classes among each image's points.

    The points name the classes present in the image (image-level labels; the
    authors' code multiplies ``P^s`` by them, ``cls_labels``). Each image's
    logits are cut to those channels, so the terms see a C_b-way softmax
    (C_b = classes among its points) -- also what the generator's
    ``semantic_classes="present"`` uses. ``L_partial`` stays the mean over all
    points of the batch; the other terms the mean over images (as with all
    classes). An image without points keeps all C channels.
    """
    per_image: dict[str, list[tuple[torch.Tensor, float]]] = {}
    lab_all = batch.get("lab")
    for i in range(logits.shape[0]):
        labels = torch.as_tensor(batch["point_labels"][i], dtype=torch.long, device=logits.device).reshape(-1)
        present = torch.unique(labels[labels >= 0])
        if len(present):
            li = logits[i : i + 1, present]
            labels = torch.where(labels >= 0, torch.searchsorted(present, labels.clamp_min(0)), labels)
        else:
            li = logits[i : i + 1]
        lab = lab_all[i : i + 1] if lab_all is not None else None
        terms = _semantic_terms(li, image[i : i + 1], lab, [batch["point_yx"][i]], [labels], config)
        n_points = float((labels >= 0).sum())
        for name, value in terms.items():
            per_image.setdefault(name, []).append((value, n_points if name == "partial" else 1.0))
    out = {}
    for name, vals in per_image.items():
        weight = sum(w for _, w in vals)
        out[name] = sum(v * w for v, w in vals) / weight if weight > 0 else logits.sum() * 0.0
    return out
