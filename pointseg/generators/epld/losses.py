"""EPLD's distance-branch losses (Eq. 4, 8-11).

::

    L_distance = sum_{l=1..L}  L_partial^l + L_col^l + L_self^l + L_cls^l        (Eq. 11)

* ``L_partial`` (Eq. 8): cross-entropy of ``M^l`` at the labelled pixels,
  :func:`pointseg.losses.partial_cross_entropy` over the instance channels;
* ``L_col`` (Eq. 9): ``-1/Z sum_i sum_{j in N_i} A_ij log(M_i^T M_j)`` with the
  BoxInst affinity ``A_ij = 1[exp(-||LAB_i - LAB_j|| / theta) >= tau]``,
  :func:`pointseg.losses.local_affinity_loss` (the affinity computed once
  for all layers, :func:`~pointseg.losses.point2mask.lab_affinity`). EPLD gives neither ``tau`` nor
  the neighbourhood; we use BoxInst's (``tau = 0.3``, ``theta = 2``, the 8
  neighbours of a 3x3 window at dilation 2);
* ``L_self`` (Eq. 10): ``1/HW sum_i CE(M^l[i], M^L[i])``, every layer against
  the last layer's pseudo label (argmax, detached: a target, not a path);
* ``L_cls`` (Eq. 4): ``1/N sum_n L_focal(Y_n^l, class_n)``, the sigmoid focal
  loss of the query classifier, summed over the ``C`` classes of an instance
  and averaged over the image's ``N`` instances.

``L_partial``, ``L_col`` and ``L_self`` are computed on ``M^l`` upsampled
(bilinear, on the logits) to ``input_size / loss_stride``. The paper's
``L_pan`` (its jointly trained panoptic branch) is not here: in pointseg the
panoptic model is stage 2, trained afterwards on the pseudo labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pointseg.generators.epld.config import EPLDTrainConfig
from pointseg.argmax import first_argmax
from pointseg.losses.point2mask import lab_affinity, local_affinity_loss, partial_cross_entropy

__all__ = ["class_focal_loss", "distance_loss", "self_training_loss", "sigmoid_focal_loss"]


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Element-wise sigmoid focal loss (Lin et al. 2017), the ``L_focal`` of Eq. 4.

    ::

        p_t  = p if y = 1 else 1 - p,            p = sigmoid(x)
        a_t  = alpha if y = 1 else 1 - alpha     (alpha < 0: no weighting)
        FL   = -a_t (1 - p_t)^gamma log(p_t)

    ``log(p_t)`` is computed as ``-BCE_with_logits(x, y)`` (finite for any
    finite ``x``). logits, targets : same shape, targets in [0, 1]. Returns
    that shape.
    """
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def class_focal_loss(class_logits: torch.Tensor, instance_class: torch.Tensor, instance_valid: torch.Tensor,
                     alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """``L_cls = 1/N sum_n sum_c FL(Y_n^c, 1[c = class_n])`` per image, averaged over the batch (Eq. 4).

    class_logits : (B, N, C); instance_class : (B, N) long; instance_valid : (B, N) bool.
    """
    targets = F.one_hot(instance_class, class_logits.shape[-1]).to(class_logits.dtype)
    per_instance = sigmoid_focal_loss(class_logits, targets, alpha, gamma).sum(-1)  # (B, N)
    valid = instance_valid.to(class_logits.dtype)
    per_image = (per_instance * valid).sum(1) / valid.sum(1).clamp_min(1.0)
    return per_image.mean()


def self_training_loss(mask_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L_self = 1/HW sum_i CE(M^l[i], target[i])`` (Eq. 10), averaged over the batch.

    mask_logits : (B, N, H, W); target : (B, H, W) long, the last layer's argmax (no gradient).
    """
    return F.cross_entropy(mask_logits, target.detach())


def _to_loss_grid(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def distance_loss(outputs: dict, batch: dict, cfg: EPLDTrainConfig, step: int = 0) -> dict[str, torch.Tensor]:
    """``L_distance`` of Eq. 11 and its terms summed over the layers.

    outputs : :class:`~pointseg.generators.epld.model.EPLDNet`'s dict.
    batch : ``point_yx`` (B tensors (P_b, 2) long, on the loss grid),
    ``point_instance`` (B tensors (P_b,) long), ``instance_class``,
    ``instance_valid`` and, with the colour prior, ``lab`` (B, 3, h, w) on the
    loss grid. Returns ``loss`` (the total) and ``partial``, ``color``,
    ``self``, ``cls`` (each summed over the layers, unweighted).
    """
    size = cfg.input_size // cfg.loss_stride
    size = (size, size)
    layers = [_to_loss_grid(m, size) for m in outputs["mask_logits"]]
    zero = layers[-1].sum() * 0.0
    terms = {"partial": zero, "color": zero, "self": zero, "cls": zero}
    use_self = cfg.self_training and step >= cfg.self_training_start
    last_labels = first_argmax(layers[-1].detach(), 1) if use_self else None
    affinity = lab_affinity(batch["lab"], cfg.color_tau, cfg.color_theta, cfg.color_dilation) if cfg.color_prior else None
    for li, logits in enumerate(layers):
        terms["partial"] = terms["partial"] + partial_cross_entropy(logits, batch["point_yx"], batch["point_instance"])
        if cfg.color_prior:
            terms["color"] = terms["color"] + local_affinity_loss(logits.softmax(1), affinity=affinity)
        if use_self:
            terms["self"] = terms["self"] + self_training_loss(logits, last_labels)
        if outputs.get("class_logits") is not None:
            terms["cls"] = terms["cls"] + class_focal_loss(outputs["class_logits"][li], batch["instance_class"],
                                                           batch["instance_valid"], cfg.focal_alpha, cfg.focal_gamma)
    total = (cfg.partial_weight * terms["partial"] + cfg.color_weight * terms["color"]
             + cfg.self_weight * terms["self"] + cfg.cls_weight * terms["cls"])
    return {"loss": total, **terms}
