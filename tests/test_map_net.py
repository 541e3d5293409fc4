import time

import pytest
import torch

from pointseg.losses import Point2MaskLossConfig, boundary_loss, point2mask_loss
from pointseg.models.backbones import MissingWeightsError, normalization
from pointseg.models.map_net import MapNet


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return MapNet(num_classes=5, backbone="efficientnet_lite0", pretrained=False)


def test_shapes_ranges_and_normalisation(net):
    x = torch.rand(2, 3, 96, 64)
    out = net(x)
    assert out["sem_logits"].shape == (2, 5, 96, 64)
    assert out["boundary"].shape == out["boundary_logits"].shape == (2, 1, 96, 64)
    assert ((out["boundary"] >= 0) & (out["boundary"] <= 1)).all()
    torch.testing.assert_close(out["boundary"], torch.sigmoid(out["boundary_logits"]))
    mean, std = normalization("efficientnet_lite0")
    assert net.mean.flatten().tolist() == list(mean) and net.std.flatten().tolist() == list(std)
    assert [m.in_channels for m in net.lateral] == [24, 40, 112, 320]
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.rand(2, 1, 32, 32))


def test_boundary_decoder_is_two_1x1_convs_with_relu(net):
    convs = [m for m in net.boundary_head if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 1), (1, 1)] and convs[-1].out_channels == 1
    assert isinstance(net.boundary_head[1], torch.nn.ReLU)


def test_boundary_loss_trains_only_the_boundary_decoder(net):
    # official Point2Mask: the boundary projection reads detached neck features
    net.zero_grad()
    out = net(torch.rand(1, 3, 64, 64))
    ids = torch.ones(1, 64, 64, dtype=torch.long)
    ids[:, :, 32:] = 2
    boundary_loss(out["boundary"], ids).backward()
    assert all(p.grad is None or not p.grad.any() for p in net.backbone.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.boundary_head.parameters())
    net.zero_grad()


def test_forward_backward_is_cpu_sized(net):
    x = torch.rand(2, 3, 128, 128)
    net(x)  # warm-up
    t0 = time.perf_counter()
    out = net(x)
    (out["sem_logits"].mean() + out["boundary"].mean()).backward()
    seconds = time.perf_counter() - t0
    print(f"MapNet efficientnet_lite0 forward+backward 2x3x128x128, 1 thread: {seconds:.3f} s")
    assert seconds < 2.0  # about 0.18 s on one core; loose for the shared CI box
    net.zero_grad()


def test_mobilenet_v2_backbone():
    torch.manual_seed(0)
    m = MapNet(num_classes=3, backbone="mobilenet_v2", pretrained=False)
    assert m(torch.rand(1, 3, 64, 64))["sem_logits"].shape == (1, 3, 64, 64)
    assert [c.in_channels for c in m.lateral] == [24, 32, 96, 320]


def test_pretrained_weights_are_loaded():
    try:
        m = MapNet(num_classes=3, backbone="efficientnet_lite0", pretrained=True)
    except MissingWeightsError as e:
        pytest.skip(f"EfficientNet-Lite0 weights not installed: {e}")
    from pointseg.models.backbones import efficientnet_lite0_state_dict

    sd = efficientnet_lite0_state_dict()
    own = m.backbone.state_dict()
    for key in ("conv_stem.weight", "blocks.1.0.conv_pw.weight"):
        torch.testing.assert_close(own[key], sd[key])


def test_a_few_steps_lower_the_total_loss():
    """Two coloured halves, one point each: Adam on MapNet lowers the Point2Mask loss."""
    torch.manual_seed(0)
    h = w = 64
    image = torch.zeros(1, 3, h, w)
    image[:, 0, :, : w // 2] = 0.9
    image[:, 2, :, w // 2 :] = 0.8
    ids = torch.ones(1, h, w, dtype=torch.long)
    ids[:, :, w // 2 :] = 2
    batch = {
        "image": image,
        "point_yx": [torch.tensor([[h // 2, w // 4], [h // 2, 3 * w // 4]])],
        "point_labels": [torch.tensor([0, 1])],
        "pseudo_ids": ids,
        "thing_map": ids == 1,
    }
    model = MapNet(num_classes=2, backbone="efficientnet_lite0", pretrained=False, width=32)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    config = Point2MaskLossConfig()
    history = []
    for _ in range(8):
        total, terms = point2mask_loss(model(image), batch, config)
        opt.zero_grad()
        total.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        history.append({"total": float(total.detach()), **{k: float(v) for k, v in terms.items()}})
    print("loss history:", [round(h["total"], 3) for h in history])
    assert history[-1]["total"] < 0.8 * history[0]["total"]
    assert history[-1]["partial"] < history[0]["partial"]
