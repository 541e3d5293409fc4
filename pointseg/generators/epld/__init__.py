"""EPLD: point-supervised panoptic pseudo labels from a learnable distance.

Li, Fan and Zhang, "Point-supervised Panoptic Segmentation via Estimating
Pseudo Labels from Learnable Distance", ECCV 2024 (Sec. 3). Each instance
(one thing object or one stuff class of an image) becomes an *anchor query*
aggregated from the pixel features at its points; ``L`` decoder layers
predict ``M^l``, the probability of every pixel belonging to each instance,
re-aggregating the queries from the previous layer's eroded pseudo label;
``X^l = 1 - M^l`` is the learnt pixel-to-instance distance and the pseudo
label is ``argmax_n M^L`` (Eq. 7). The distance branch is trained from the
points alone (Eq. 11).

A trainable generator (:class:`~pointseg.generators.base.TrainableGenerator`):

* :class:`EPLDTrainable` (``stage1``), config :class:`EPLDTrainConfig`
  (``generator.train``): the network and its losses, trained by the one
  engine (``fit`` / ``fit_plain``) on the dataset's index rows;
* :class:`EPLDGenerator`, config :class:`EPLDConfig` (``generator.params``):
  loads the checkpoint once and labels whole batches in one network pass.

Modules: ``config`` (both configs), ``model`` (the network, Eq. 1-7),
``losses`` (Eq. 4, 8-11), ``batch`` (images and points -> tensors),
``trainable``, ``generator``.

Substitutes and choices where the paper is silent or its setting does not fit a
CPU (each a config key):

* backbone + neck: offline ImageNet EfficientNet-Lite0 (strides 8/16/32) and a
  small FPN instead of R50 + MSDeformAttn; the backbone is frozen by default
  and its features cached per image (``freeze_backbone``, ``feature_cache``);
* decoder layer: the supplement's Panoptic SegFormer layer is not available;
  ours is query self-attention + cross-attention over ``F^1..F^3``, and
  ``M^l`` is read from the cross-attention logits (Panoptic SegFormer's way)
  with a learned weight per (block, level, head);
* the queries also carry the mean sine position of their pixels
  (``query_position``), standing in for the position that deformable
  attention mixes into the paper's features;
* colour prior: BoxInst's ``tau = 0.3``, ``theta = 2``, 3x3 at dilation 2;
  losses on ``M^l`` upsampled to ``input_size / loss_stride``;
* ``L_pan`` (the jointly trained panoptic branch, Eq. 12) is pointseg's stage 2,
  trained afterwards on the pseudo labels.
"""

from pointseg.generators.epld.config import EPLDConfig, EPLDTrainConfig
from pointseg.generators.epld.generator import EPLDGenerator
from pointseg.generators.epld.trainable import EPLDTrainable

__all__ = ["EPLDConfig", "EPLDGenerator", "EPLDTrainConfig", "EPLDTrainable"]
