"""Step 1 of Point2Mask: the task-oriented maps of one image (Sec. 3.3.1).

:class:`TransportMaps` holds ``P^s`` / ``P^b`` at the working resolution;
:func:`lowlevel_maps` and :func:`learned_maps` make them; :func:`finite_maps`
fills NaN / inf pixels of a learned map (a counted fallback).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from scipy import ndimage

from pointseg.data.images import resize_square
from pointseg.generators.psps import low_level_maps

@dataclass
class TransportMaps:
    """The task-oriented maps of one image at the working resolution ``(h, w)``.

    semantic : (S, h, w) float -- ``P^s`` (S = number of classes, class channels)
        or, for low-level maps, the LAB image (S = 3, one shared "channel").
    boundary : (h, w) float >= 0 -- ``P^b`` (sum of the chosen boundary maps'
        ``max`` terms is formed in :func:`class_edge_costs`), or ``None``.
    boundary_extra : (h, w) or None -- a second boundary map whose ``d^b`` term adds.
    channel_of : category id -> channel index of ``semantic``; ``None`` means
        every class uses all channels (the Euclidean norm over LAB).
    feature, feature_weight : (F, h, w) or None -- a feature map whose Euclidean
        neighbour difference, times ``feature_weight``, adds to every edge (the
        authors' code's ``lambda_feat * diff_feat`` term; LAB colour here).
    """

    semantic: np.ndarray
    boundary: np.ndarray | None
    boundary_extra: np.ndarray | None = None
    channel_of: dict[int, int] | None = None
    feature: np.ndarray | None = None
    feature_weight: float = 0.0


def _fill_nonfinite(a: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """Replace NaN / inf pixels of a ``(..., h, w)`` map by their nearest finite pixel."""
    a = np.asarray(a, dtype=np.float64)
    bad = ~np.isfinite(a)
    if a.ndim == 3:
        bad_px = bad.any(0)
    else:
        bad_px = bad
    n_bad = int(bad_px.sum())
    if n_bad == 0:
        return a, 0
    if n_bad * 2 > bad_px.size:
        raise ValueError(f"{name}: {n_bad} of {bad_px.size} pixels are NaN or inf; the map is unusable")
    _, (ri, ci) = ndimage.distance_transform_edt(bad_px, return_indices=True)
    return a[..., ri, ci], n_bad


def finite_maps(maps: TransportMaps) -> tuple[TransportMaps, int]:
    """``maps`` with NaN / inf pixels filled from the nearest finite pixel, and their count."""
    sem, n = _fill_nonfinite(maps.semantic, "P^s (semantic map)")
    out = [sem]
    for name, b in (("P^b (boundary map)", maps.boundary), ("second boundary map", maps.boundary_extra)):
        if b is None:
            out.append(None)
            continue
        b, nb = _fill_nonfinite(b, name)
        n += nb
        out.append(np.clip(b, 0.0, None))
    return TransportMaps(out[0], out[1], out[2], maps.channel_of, maps.feature, maps.feature_weight), n


def lowlevel_maps(image: np.ndarray, size: tuple[int, int], blur_sigma: float) -> TransportMaps:
    """Training-free maps: LAB (divided by 100) for ``P^s`` and the LAB Sobel map for ``P^b_low``."""
    lab, low = low_level_maps(image, size, blur_sigma)
    return TransportMaps(lab, low)


def learned_maps(image: np.ndarray, size: tuple[int, int], net_maps, channel_ids: list[int], present=None,
                 semantic_classes: str = "present", boundary_maps: str = "both", blur_sigma: float = 0.5,
                 feature_weight: float = 0.0) -> TransportMaps:
    """Maps from the network's ``(P^s (C, H', W'), P^b_high (H', W'))`` at ``size = (h, w)``.

    ``present``: the category ids among the image's points; with
    ``semantic_classes="present"`` ``P^s`` is renormalised over their channels
    (the softmax restricted to the image-level classes, as the authors' code
    masks ``P^s`` with ``cls_labels``). ``boundary_maps`` picks ``P^b_high``,
    ``P^b_low`` or both (their ``d^b`` terms add); ``feature_weight > 0`` adds
    the LAB colour feature term.
    """
    lab, low = low_level_maps(image, size, blur_sigma)
    sem, high = (np.asarray(m, dtype=np.float64) for m in net_maps)
    channel_of = {c: i for i, c in enumerate(channel_ids)}
    if semantic_classes == "present" and present is not None:
        keep = sorted({channel_of[int(c)] for c in present if int(c) in channel_of})
        if keep:
            sub = sem[keep]
            sem = sub / np.maximum(sub.sum(0, keepdims=True), 1e-12)
            channel_of = {c: keep.index(i) for c, i in channel_of.items() if i in keep}
    h, w = size
    sem = np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) for c in sem])
    high = cv2.resize(high, (w, h), interpolation=cv2.INTER_LINEAR)
    boundary, extra = {"low": (low, None), "high": (high, None), "both": (high, low)}[boundary_maps]
    feature = lab if feature_weight > 0 else None
    return TransportMaps(sem, boundary, extra, channel_of, feature, feature_weight)


@torch.no_grad()
def net_maps(net, images: list[np.ndarray], size: int | None, device: str = "cpu") -> list[tuple[np.ndarray, np.ndarray]]:
    """Softmax ``P^s`` (C, S, S) and ``P^b_high`` (S, S) of each image, one batched forward pass.

    Images are resized to the network's square input size ``S = size`` (their
    own size when None and all equal).
    """
    if not images:
        return []
    inputs = [resize_square(im, size) if size else im for im in images]
    x = torch.from_numpy(np.ascontiguousarray(np.stack(inputs))).permute(0, 3, 1, 2).float().div(255).to(device)
    was = net.training
    net.eval()
    out = net(x)
    net.train(was)
    sem = out["sem_logits"].softmax(1).cpu().double().numpy()
    bnd = out["boundary"][:, 0].cpu().double().numpy()
    return [(sem[i], bnd[i]) for i in range(len(images))]
