"""EPLD: query aggregation (Eq. 1-3) by hand, the focal loss against torchvision, the losses on tiny
inputs, bad inputs, the network's shapes, a fit_plain -> load_trained round trip and the batched generator."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from conftest import red_blue_image
from pointseg.data.images import encode_png
from pointseg.data.record import Category, Points
from pointseg.generators import GENERATORS, build_generator
from pointseg.generators.epld import EPLDConfig, EPLDGenerator, EPLDTrainable, EPLDTrainConfig
from pointseg.generators.epld import generator as epld_generator
from pointseg.generators.epld.batch import network_batch
from pointseg.generators.epld.losses import class_focal_loss, distance_loss, sigmoid_focal_loss
from pointseg.generators.epld.model import (
    MASKED_LOGIT,
    EPLDNet,
    aggregation_masks,
    click_distance,
    eroded_one_hot,
    masked_mean,
    sine_position_embedding,
)
from pointseg.train.engine import fit_plain, load_trained

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CATS = {1: Category(1, "disc", True), 2: Category(2, "box", True), 7: Category(7, "sky", False)}
#: A CPU-tiny network: random backbone (no weight file read), 64 px, D = 16.
TINY = dict(pretrained=False, input_size=64, hidden_dim=16, num_heads=2, ffn_dim=16, layers=3, loss_stride=4,
            batch_size=2, steps=2, report_every=1, checkpoint_every=1)


# ----------------------------------------------------------------------------- Eq. 1-3 by hand


def test_query_aggregation_matches_a_hand_computation_on_6x6():
    # F^fuse with channel 0 = column index, channel 1 = row index.
    rows, cols = np.mgrid[0:6, 0:6]
    feature = torch.tensor(np.stack([cols, rows]), dtype=torch.float32)[None]  # (1, 2, 6, 6)
    # previous layer's pseudo label: instance 0 = columns 0-3, instance 1 = columns 4-5;
    # a padded third slot has the largest logit everywhere and must be ignored (instance_valid)
    label = np.where(cols < 4, 0, 1)
    logits = torch.tensor(np.stack([(label == 0) * 5.0, (label == 1) * 5.0, np.full((6, 6), 9.0)]),
                          dtype=torch.float32)[None]
    valid = torch.tensor([[True, True, False]])
    points = torch.zeros(1, 3, 6, 6)
    points[0, 0, 2, 3] = 1  # instance 0's click at row 2, col 3 (on its border: eroded away)
    points[0, 1, 0, 4] = 1  # instance 1's click at row 0, col 4

    # Eq. 1 (first layer): the mean over the point mask is the feature at the click
    q1 = masked_mean(feature, points)
    assert q1[0, 0].tolist() == [3.0, 2.0] and q1[0, 1].tolist() == [4.0, 0.0]

    # one 3x3 erosion (the image border does not erode): instance 0 keeps columns 0-2,
    # instance 1 keeps column 5; Eq. 2 puts the clicks back
    m = aggregation_masks(logits, points, valid, erosion=True, kernel=3, iters=1)
    expect0 = (cols <= 2) | ((rows == 2) & (cols == 3))
    expect1 = (cols == 5) | ((rows == 0) & (cols == 4))
    assert np.array_equal(m[0, 0].numpy() == 1, expect0) and np.array_equal(m[0, 1].numpy() == 1, expect1)
    q = masked_mean(feature, m)  # Eq. 3
    assert q[0, 0].tolist() == pytest.approx([21 / 19, 47 / 19])  # (6 (0+1+2) + 3) / 19, (3 * 15 + 2) / 19
    assert q[0, 1].tolist() == pytest.approx([34 / 7, 15 / 7])  # (6 * 5 + 4) / 7, 15 / 7

    # the paper's three erosions: instance 0 shrinks to column 0, instance 1 vanishes and is
    # only its click again (Eq. 2's point restoration)
    m3 = aggregation_masks(logits, points, valid, erosion=True, kernel=3, iters=3)
    assert np.array_equal(m3[0, 0].numpy() == 1, (cols == 0) | ((rows == 2) & (cols == 3)))
    assert np.array_equal(m3[0, 1].numpy() == 1, (rows == 0) & (cols == 4))
    q3 = masked_mean(feature, m3)
    assert q3[0, 0].tolist() == pytest.approx([3 / 7, 17 / 7]) and q3[0, 1].tolist() == [4.0, 0.0]

    # erosion off: the one-hot argmax itself (plus the clicks, already inside)
    m0 = aggregation_masks(logits, points, valid, erosion=False)
    assert np.array_equal(m0[0, 0].numpy() == 1, label == 0) and m0[0, 2].sum() == 0


def test_click_distance_by_hand():
    # clicks of instance 0 in cells (0, 0) and (3, 3) of a 4x4 grid, read on an 8x8 grid; unit: the image side
    points = torch.zeros(1, 2, 4, 4)
    points[0, 0, 0, 0] = points[0, 0, 3, 3] = 1
    d = click_distance(points, (8, 8))
    assert d.shape == (1, 2, 8, 8)
    assert float(d[0, 0, 0, 0]) == pytest.approx(math.hypot(0.0625, 0.0625))  # centre 1/16 vs 1/8
    assert float(d[0, 0, 0, 7]) == pytest.approx(math.hypot(0.0625, 0.8125))  # nearer to neither: the min
    assert float(d[0, 0, 7, 7]) == pytest.approx(math.hypot(0.0625, 0.0625))
    assert (d[0, 1] == 0).all()  # an instance without a point gets no prior


def test_eroded_one_hot_matches_opencv_on_every_mask():
    """The label-map erosion (one window of side 1 + iters (kernel - 1)) equals ``iters`` OpenCV erosions of
    each instance's one-hot mask, image border not eroding (OpenCV's default border)."""
    rng = np.random.default_rng(0)
    for seed in range(3):
        # blobby labels: a random label per cell of a 4 x 3 grid, upsampled to 26 x 22, plus stray pixels
        coarse = rng.integers(0, 5, (2, 4, 3))
        label = np.stack([cv2.resize(c.astype(np.uint8), (22, 26), interpolation=cv2.INTER_NEAREST) for c in coarse])
        label[:, rng.integers(0, 26, 8), rng.integers(0, 22, 8)] = rng.integers(0, 5, 8)
        for kernel, iters in ((3, 1), (3, 3), (5, 2), (1, 4)):
            ours = eroded_one_hot(torch.from_numpy(label).long(), 5, kernel, iters).numpy().astype(np.uint8)
            theirs = np.stack([[cv2.erode((lab == n).astype(np.uint8), np.ones((kernel, kernel), np.uint8),
                                          iterations=iters) for n in range(5)] for lab in label])
            assert np.array_equal(ours, theirs), (seed, kernel, iters)
            if (kernel, iters) == (3, 1):  # the case discriminates: some pixels survive, some are eroded
                assert 0 < ours.sum() < label.size
            if kernel == 1:  # a 1 x 1 element erodes nothing
                assert ours.sum() == label.size


# ----------------------------------------------------------------------------- Eq. 4


def test_focal_loss_matches_torchvision():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=gen) * 4
    targets = (torch.rand(7, 5, generator=gen) < 0.3).float()
    for alpha, gamma in ((0.25, 2.0), (0.5, 0.0), (-1.0, 1.5)):
        ours = sigmoid_focal_loss(logits, targets, alpha, gamma)
        ref = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
        torch.testing.assert_close(ours, ref)
    # Eq. 4: summed over the classes, averaged over the image's valid instances, then over images
    klass = torch.tensor([[0, 3, 1], [4, 0, 0]])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    cl = torch.randn(2, 3, 5, generator=gen)
    ref = torchvision.ops.sigmoid_focal_loss(cl, F.one_hot(klass, 5).float(), reduction="none").sum(-1)
    expect = (ref[0].mean() + ref[1, 0]) / 2
    torch.testing.assert_close(class_focal_loss(cl, klass, valid), expect)


# ----------------------------------------------------------------------------- network


def test_sine_position_embedding():
    e = sine_position_embedding(5, 7, 16)
    assert e.shape == (16, 5, 7) and e.abs().max() <= 1.0
    flat = e.flatten(1).T  # every pixel has its own code
    assert torch.cdist(flat, flat).add(torch.eye(35) * 9).min() > 1e-3
    with pytest.raises(ValueError, match="multiple of 4"):
        sine_position_embedding(4, 4, 6)


def _toy_batch(n_images=2, size=64, lab=True):
    """Two coloured toy images with 3 and 1 instances, at other sizes than the network's."""
    images = [np.zeros((48, 80, 3), np.uint8), np.full((70, 50, 3), 90, np.uint8)]
    images[0][:, 40:] = (200, 30, 30)
    images[0][30:, :20] = (30, 200, 30)
    points = [Points([[10, 10], [60, 20], [5, 40]], [1, 2, 3], [1, 2, 7]), Points([[25, 35]], [4], [7])]
    channel_of = {c: i for i, c in enumerate(sorted(CATS))}
    return network_batch(images[:n_images], points[:n_images], CATS, channel_of, size, loss_stride=4,
                         lab=lab), images, points


@pytest.mark.parametrize("knobs", [{}, {"query_feature": "learned", "class_embedding": False, "cls_loss": False},
                                   {"query_feature": "sine", "erosion": False, "decoder_blocks": 2},
                                   {"mask_stride": 4, "spatial_prior": 10.0}])
def test_network_shapes_and_padding(knobs):
    cfg = EPLDTrainConfig(**TINY, **knobs)
    net = EPLDNet(cfg, sorted(CATS), pretrained=False)
    batch, _, _ = _toy_batch()
    assert batch["point_masks"].shape == (2, 3, 8, 8) and batch["instance_valid"].tolist() == [[True] * 3, [True, False, False]]
    assert batch["lab"].shape == (2, 3, 16, 16) and [len(p) for p in batch["point_yx"]] == [3, 1]
    out = net(batch["image"], batch["point_masks"], batch["instance_valid"], batch["instance_class"])
    assert len(out["mask_logits"]) == cfg.layers
    side = cfg.input_size // cfg.mask_stride
    for m in out["mask_logits"]:
        assert m.shape == (2, 3, side, side) and torch.isfinite(m).all()
        assert (m[1, 1:] == MASKED_LOGIT).all()  # padded slots never win
    if cfg.cls_loss:
        assert [c.shape for c in out["class_logits"]] == [(2, 3, 3)] * cfg.layers
    else:
        assert out["class_logits"] is None
    # a precomputed backbone output (the frozen-backbone cache) gives the same result
    again = net(batch["image"], batch["point_masks"], batch["instance_valid"], batch["instance_class"],
                features=net.backbone_features(batch["image"]))
    torch.testing.assert_close(again["mask_logits"][-1], out["mask_logits"][-1])


def test_spatial_prior_lowers_thing_logits_by_the_click_distance():
    batch, _, _ = _toy_batch(n_images=1)  # instances: thing 1, thing 2, stuff 7
    things = [c for c in CATS if CATS[c].isthing]
    with_prior = EPLDNet(EPLDTrainConfig(**TINY, spatial_prior=10.0), sorted(CATS), False, things).eval()
    plain = EPLDNet(EPLDTrainConfig(**TINY), sorted(CATS), False, things).eval()
    plain.load_state_dict(with_prior.state_dict())
    args = (batch["image"], batch["point_masks"], batch["instance_valid"], batch["instance_class"])
    diff = with_prior(*args)["mask_logits"][0] - plain(*args)["mask_logits"][0]  # layer 1: same queries
    d = click_distance(batch["point_masks"], (8, 8))
    torch.testing.assert_close(diff[0, :2], -10.0 * d[0, :2], atol=1e-4, rtol=1e-4)
    assert diff[0, 2].abs().max() < 1e-4  # stuff: no prior


def test_frozen_backbone_stays_frozen_in_train_mode():
    net = EPLDNet(EPLDTrainConfig(**TINY), sorted(CATS), pretrained=False).train()
    assert not net.backbone.training and net.fusion.training
    assert not any(p.requires_grad for p in net.backbone.parameters())
    net = EPLDNet(EPLDTrainConfig(**{**TINY, "freeze_backbone": False}), sorted(CATS), pretrained=False).train()
    assert net.backbone.training and all(p.requires_grad for p in net.backbone.parameters())


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="input_size=100"):
        EPLDTrainConfig(input_size=100)
    with pytest.raises(ValueError, match="num_heads"):
        EPLDTrainConfig(hidden_dim=18, num_heads=4)
    with pytest.raises(ValueError, match="erosion_kernel"):
        EPLDTrainConfig(erosion_kernel=2)
    with pytest.raises(ValueError, match="layerz"):
        EPLDTrainConfig(layerz=3)
    with pytest.raises(ValueError, match="stage-1 network"):
        EPLDGenerator({}, CATS)


# ----------------------------------------------------------------------------- losses


def test_losses_on_uniform_predictions_are_log_n():
    """Zero logits: M is uniform over the N valid instances, so L_partial, L_col and L_self are log N per layer."""
    cfg = EPLDTrainConfig(**TINY)
    batch, _, _ = _toy_batch(n_images=1)  # one image, N = 3
    batch["lab"] = torch.zeros_like(batch["lab"])  # one colour: every neighbour pair passes tau
    zeros = torch.zeros(1, 3, 8, 8, requires_grad=True)
    cls = torch.zeros(1, 3, 3, requires_grad=True)
    out = {"mask_logits": [zeros] * cfg.layers, "class_logits": [cls] * cfg.layers}
    terms = distance_loss(out, batch, cfg)
    for key in ("partial", "color", "self"):
        assert float(terms[key].detach()) == pytest.approx(cfg.layers * math.log(3), rel=1e-5), key
    # L_cls at logit 0: per instance sum_c FL = 0.25 * 0.25 * log 2 + 2 * 0.75 * 0.25 * log 2
    assert float(terms["cls"].detach()) == pytest.approx(cfg.layers * (0.0625 + 0.375) * math.log(2), rel=1e-5)
    assert float(terms["loss"].detach()) == pytest.approx(sum(float(terms[k].detach()) for k in ("partial", "color", "self", "cls")))
    terms["loss"].backward()
    assert torch.isfinite(zeros.grad).all() and zeros.grad.abs().sum() > 0

    # the Table 5 switches remove their terms; self-training waits for self_training_start
    off = EPLDTrainConfig(**TINY, color_prior=False, self_training=False)
    t = distance_loss(out, batch, off)
    assert float(t["color"]) == 0 and float(t["self"]) == 0 and float(t["partial"]) > 0
    late = EPLDTrainConfig(**TINY, self_training_start=10)
    assert float(distance_loss(out, batch, late, step=9)["self"]) == 0
    assert float(distance_loss(out, batch, late, step=10)["self"]) > 0


def test_partial_loss_vanishes_on_a_confident_correct_prediction():
    cfg = EPLDTrainConfig(**TINY, color_prior=False, self_training=False, cls_loss=False)
    batch, _, _ = _toy_batch(n_images=1)
    grid = cfg.input_size // cfg.loss_stride
    logits = torch.zeros(1, 3, grid, grid)
    for (r, c), n in zip(batch["point_yx"][0].tolist(), batch["point_instance"][0].tolist()):
        logits[0, n, r, c] = 30.0
    terms = distance_loss({"mask_logits": [logits], "class_logits": None}, batch, cfg)
    assert float(terms["partial"]) < 1e-6


def test_bad_inputs_never_give_a_nan_loss():
    """One instance (softmax over one channel), two instances clicked in one cell, a constant image,
    a 1-pixel segment's click on the image corner: every term finite, with a gradient."""
    cfg = EPLDTrainConfig(**TINY)
    net = EPLDNet(cfg, sorted(CATS), pretrained=False)
    channel_of = {c: i for i, c in enumerate(sorted(CATS))}
    images = [np.full((20, 20, 3), 128, np.uint8), np.zeros((33, 17, 3), np.uint8), np.zeros((64, 64, 3), np.uint8)]
    points = [Points([[5, 5]], [1], [1]),
              Points([[3.0, 3.0], [3.2, 3.1]], [1, 2], [1, 2]),
              Points([[63, 63], [10, 10]], [1, 2], [1, 7])]
    batch = network_batch(images, points, CATS, channel_of, cfg.input_size, cfg.loss_stride, lab=True)
    out = net(batch["image"], batch["point_masks"], batch["instance_valid"], batch["instance_class"])
    terms = distance_loss(out, batch, cfg)
    assert all(torch.isfinite(v) for v in terms.values()), terms
    terms["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- stage 1 through the engine


def _index_rows(tmp_path, n=4, bad=False):
    """Index rows of toy images written as PNG: two coloured halves, a thing click on each, a stuff click."""
    rows = []
    for i in range(n):
        img = np.zeros((40 + 4 * i, 56, 3), np.uint8)
        img[:, :28] = (200, 40 + 20 * i, 30)
        img[:, 28:] = (30, 40, 200)
        img[:8] = (120, 170, 230)
        path = tmp_path / f"{i}.png"
        path.write_bytes(encode_png(img))
        pts = [{"x": 10.0, "y": 25.0, "segment": 1, "category_id": 1},
               {"x": 45.0, "y": 25.0, "segment": 2, "category_id": 2},
               {"x": 30.0, "y": 2.0, "segment": 3, "category_id": 7}]
        rows.append({"image_id": i, "file_name": str(path), "height": img.shape[0], "width": 56, "points": json.dumps(pts)})
    if bad:
        # only a click of a class outside the label space: skipped and counted, never a NaN
        rows.append({**rows[0], "image_id": 90, "points": json.dumps([{"x": 3, "y": 3, "segment": 1, "category_id": 99}])})
        # a 1-pixel segment (one click on the corner) beside a large one
        rows.append({**rows[1], "image_id": 91, "points": json.dumps(
            [{"x": 55, "y": 0, "segment": 5, "category_id": 1}, {"x": 20, "y": 20, "segment": 6, "category_id": 7}])})
    return rows


def test_fit_plain_save_load_round_trip_and_valid_labels(tmp_path):
    rows = _index_rows(tmp_path, bad=True)
    ck = str(tmp_path / "ck")
    trainable = EPLDTrainable({**TINY, "steps": 3}, CATS)
    result = fit_plain(trainable, rows, ck)
    assert result["step"] == 3 and math.isfinite(result["loss"])
    assert result["skipped_rows"] >= 1 and "ValueError" in result["skip_reasons"]
    net, meta = load_trained(ck, EPLDTrainable)
    assert meta["trainable"] == "epld" and meta["config"]["layers"] == 3 and net.category_ids == sorted(CATS)
    assert len(trainable._features) > 0  # the frozen backbone's features were cached

    gen = build_generator("epld", {"checkpoint": ck}, CATS)
    images = [cv2.cvtColor(cv2.imread(r["file_name"]), cv2.COLOR_BGR2RGB) for r in rows[:3]]
    points = [Points.from_list(json.loads(r["points"])) for r in rows[:3]]
    labels = gen(images, points)
    # the same weights in memory give the same labels
    again = EPLDGenerator({}, CATS, net=net)(images, points)
    # labelling folds BN into the convs of its own copy: the network handed in keeps its BN layers
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.backbone.modules())
    unfolded = EPLDGenerator({"fold_batchnorm": False}, CATS, net=net)(images, points)
    # and pads its TF-SAME convolutions inside the convolution; the network handed in keeps timm's Conv2dSame
    from timm.layers import Conv2dSame

    assert any(isinstance(m, Conv2dSame) for m in net.backbone.modules())
    assert not any(isinstance(m, Conv2dSame) for m in build_generator("epld", {"checkpoint": ck}, CATS).net.modules())
    padded = EPLDGenerator({"pad_same_inside": False}, CATS, net=net)(images, points)
    for lab, lab2, lab3, lab4, img, pts in zip(labels, again, unfolded, padded, images, points):
        assert np.array_equal(lab.id_map, lab2.id_map) and np.array_equal(lab.id_map, lab3.id_map)
        assert np.array_equal(lab.id_map, lab4.id_map)
        assert lab.id_map.shape == img.shape[:2] and lab.id_map.dtype == np.int32
        ids = {s["id"] for s in lab.segments_info}
        assert set(np.unique(lab.id_map)) <= ids and 0 not in np.unique(lab.id_map)  # Eq. 7 labels every pixel
        assert sum(s["area"] for s in lab.segments_info) == lab.id_map.size
        assert {s["category_id"] for s in lab.segments_info} <= set(pts.category_id.tolist())
        assert lab.uncertainty.shape == img.shape[:2] and 0 <= lab.uncertainty.min() <= lab.uncertainty.max() <= 1
        assert lab.diagnostics["layer"] == 3 and lab.diagnostics["instances"] == 3
    assert EPLDGenerator.summarize([lab.diagnostics for lab in labels])["summary"]["images"] == 3


def test_stage1_is_reproducible_for_a_seed_and_the_seed_matters(tmp_path):
    """Two runs of one config give bit-identical weights (seeded init, order and flips, cached features);
    another ``seed`` gives other weights. README's retrain rows rely on this."""
    rows = _index_rows(tmp_path, n=6)

    def weights(name, **cfg):
        fit_plain(EPLDTrainable({**TINY, "steps": 6, "checkpoint_every": 100, "report_every": 100, **cfg}, CATS),
                  rows, str(tmp_path / name))
        return load_trained(str(tmp_path / name), EPLDTrainable)[0].state_dict()

    a, b, c = weights("a"), weights("b"), weights("c", seed=1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_a_nan_loss_stops_training_naming_step_and_images(tmp_path, monkeypatch):
    from pointseg.generators.epld import trainable as epld_trainable

    real = epld_trainable.distance_loss

    def nan_at_step_one(outputs, batch, cfg, step=0):
        terms = real(outputs, batch, cfg, step)
        if step == 1:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(epld_trainable, "distance_loss", nan_at_step_one)
    with pytest.raises(FloatingPointError, match=r"at step 1 .*batch image ids \[\d+, \d+\]"):
        fit_plain(EPLDTrainable({**TINY, "steps": 3}, CATS), _index_rows(tmp_path), str(tmp_path / "ck"))


# ----------------------------------------------------------------------------- the generator


def test_bilinear_resize_and_banded_top2_match_interpolate(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 5, generator=gen)
    for out_h, out_w in ((13, 7), (6, 5), (3, 2)):
        ref = F.interpolate(x[None], size=(out_h, out_w), mode="bilinear", align_corners=False)[0]
        ours = torch.einsum("yh,nhw,xw->nyx", epld_generator.bilinear_matrix(out_h, 6), x,
                            epld_generator.bilinear_matrix(out_w, 5))
        torch.testing.assert_close(ours, ref)
    monkeypatch.setattr(epld_generator, "ROW_BAND", 4)  # several bands
    ref = F.interpolate(x[None], size=(13, 7), mode="bilinear", align_corners=False)[0].softmax(0)
    top = ref.topk(2, 0).values
    assignment, uncertainty = epld_generator.top2_assignment(x, 13, 7)
    assert np.array_equal(assignment, ref.argmax(0).numpy())
    np.testing.assert_allclose(uncertainty, (1 - (top[0] - top[1])).numpy(), atol=1e-6)
    a1, u1 = epld_generator.top2_assignment(x[:1], 13, 7)  # one instance: all its, certain
    assert (a1 == 0).all() and (u1 == 0).all()


def test_top_two_equals_topk_and_ties_go_to_the_first_index():
    gen = torch.Generator().manual_seed(2)
    for n in (2, 3, 17):
        v = torch.randn(n, 9, 11, generator=gen)
        first, second, idx = epld_generator.top_two(v)
        top = v.topk(2, dim=0)
        assert torch.equal(first, top.values[0]) and torch.equal(second, top.values[1])
        assert torch.equal(idx, top.indices[0])
    tie = torch.tensor([[1.0, 0.0], [3.0, 3.0], [3.0, 1.0]])  # (3 instances, 2 pixels): pixel 0 ties 1 and 2
    first, second, idx = epld_generator.top_two(tie)
    assert first.tolist() == [3.0, 3.0] and second.tolist() == [3.0, 1.0] and idx.tolist() == [1, 1]
    first, second, idx = epld_generator.top_two(tie[:1])  # one instance: the second value is 0
    assert first.tolist() == [1.0, 0.0] and second.tolist() == [0.0, 0.0] and idx.tolist() == [0, 0]


def test_keep_clicked_components_by_hand():
    # thing 0 wins columns 0 and 4 of a 5x5 grid (two parts), its click in column 0; thing 1 wins the middle;
    # stuff 2 wins nothing but its own far corner cell in a part without its click
    logits = torch.zeros(3, 5, 5)
    logits[0, :, [0, 4]] = 5.0
    logits[1, :, 1:4] = 5.0
    logits[1, :, 4] = 2.0  # thing 1 is next best on column 4
    logits[2, 4, 4] = 9.0
    cells = np.array([[2, 0], [2, 2], [0, 2]])
    new, moved = epld_generator.keep_clicked_components(logits, cells, np.array([0, 1, 2]),
                                                        np.array([True, True, False]))
    label = new.argmax(0).numpy()
    assert (label[:, 0] == 0).all() and (label[:, 1:4] == 1).all()
    assert (label[:4, 4] == 1).all() and label[4, 4] == 2  # thing 0's stray part moved; stuff untouched
    assert moved == 4


def test_batched_call_equals_single_calls_and_bad_images_are_named():
    cfg = EPLDTrainConfig(**TINY)
    net = EPLDNet(cfg, sorted(CATS), pretrained=False).eval()
    gen = EPLDGenerator({"restore_points": True, "connected_things": True}, CATS, net=net)
    _, images, points = _toy_batch()
    images.append(np.full((31, 64, 3), 200, np.uint8))
    points.append(Points([[1, 1], [60, 28]], [8, 9], [2, 2]))
    batched = gen(images, points)
    for chunk in (1, 2, 8):  # backbone passes of 1, 2 or all images: the same labels as the default (4 on a CPU)
        knobs = {"restore_points": True, "connected_things": True, "backbone_chunk": chunk}
        for lab, other in zip(batched, EPLDGenerator(knobs, CATS, net=net)(images, points)):
            assert (lab.id_map == other.id_map).mean() > 0.999
    # the per-image work after the network in 2 threads: the same labels and uncertainty, in the batch's order
    threaded = EPLDGenerator({"restore_points": True, "connected_things": True, "thing_split": "geodesic",
                              "postprocess_threads": 2}, CATS, net=net)(images, points)
    in_turn = EPLDGenerator({"restore_points": True, "connected_things": True, "thing_split": "geodesic",
                             "postprocess_threads": 1}, CATS, net=net)(images, points)
    for a, b in zip(threaded, in_turn):
        assert (a.id_map == b.id_map).all() and (a.uncertainty == b.uncertainty).all()
        timing = ("network_seconds",)
        assert a.segments_info == b.segments_info
        assert {k: v for k, v in a.diagnostics.items() if k not in timing} == {
            k: v for k, v in b.diagnostics.items() if k not in timing}
    for img, pts, lab in zip(images, points, batched):
        single = gen([img], [pts])[0]
        assert (single.id_map == lab.id_map).mean() > 0.999
        np.testing.assert_allclose(single.uncertainty, lab.uncertainty, atol=1e-4)
        rc = pts.pixels(*img.shape[:2])  # restore_points: every click labels its own pixel
        seg_of = {s["source_segment"]: s["id"] for s in lab.segments_info}
        assert all(lab.id_map[r, c] == seg_of[s] for (r, c), s in zip(rc, pts.segment.tolist()))

    pic = gen.explain(images[0], points[0])  # image | M^1..M^L | uncertainty, 256 px on the long side
    assert pic.dtype == np.uint8 and pic.shape[1] == (cfg.layers + 2) * 256 and pic.shape[2] == 3

    with pytest.raises(ValueError, match=r"image 1 of the batch: .*category_id 99"):
        gen(images[:2], [points[0], Points([[3, 3]], [1], [99])])
    with pytest.raises(ValueError, match=r"image 0 of the batch: .*outside"):
        gen(images[:1], [Points([[500, 3]], [1], [1])])
    with pytest.raises(ValueError, match="no points"):
        gen(images[:1], [Points.empty()])
    with pytest.raises(ValueError, match=r"category id\(s\) \[5\] .* not among"):
        EPLDGenerator({}, {**CATS, 5: Category(5, "new", True)}, net=net)
    with pytest.raises(ValueError, match="layer=4"):
        EPLDGenerator({"layer": 4}, CATS, net=net)
    # labelling above the training size: a finer M^l from the same weights
    big = EPLDGenerator({"input_size": 128}, CATS, net=net)(images[:1], points[:1])[0]
    assert big.id_map.shape == images[0].shape[:2] and big.diagnostics["input_size"] == 128
    learned = EPLDNet(EPLDTrainConfig(**TINY, query_feature="learned"), sorted(CATS), pretrained=False)
    with pytest.raises(ValueError, match="query_feature=learned"):
        EPLDGenerator({"input_size": 128}, CATS, net=learned)


def test_registered_and_config_validated():
    assert GENERATORS["epld"] is EPLDGenerator and EPLDGenerator.stage1 is EPLDTrainable
    assert EPLDGenerator.trains(EPLDConfig()) and not EPLDGenerator.trains(EPLDConfig(checkpoint="x"))
    with pytest.raises(ValueError, match="restore_pointz"):
        EPLDConfig(restore_pointz=True)
    with pytest.raises(ValueError, match="input_size=100"):
        EPLDConfig(input_size=100)


def test_distance_branch_learns_a_two_colour_toy(tmp_path):
    """40 steps on four toy images: the last layer splits the coloured halves and the sky strip
    (an untrained network gets about a quarter of the pixels right)."""
    rows = _index_rows(tmp_path)
    ck = str(tmp_path / "ck")
    fit_plain(EPLDTrainable({**TINY, "steps": 40, "lr": 3e-3, "checkpoint_every": 40, "report_every": 20}, CATS), rows, ck)

    def accuracy(gen):
        img = cv2.cvtColor(cv2.imread(rows[0]["file_name"]), cv2.COLOR_BGR2RGB)
        lab = gen([img], [Points.from_list(json.loads(rows[0]["points"]))])[0]
        seg_of = {s["category_id"]: s["id"] for s in lab.segments_info}
        truth = np.full(img.shape[:2], seg_of.get(2, -1))
        truth[:, :28] = seg_of.get(1, -1)
        truth[:8] = seg_of.get(7, -1)
        return (lab.id_map == truth).mean()

    untrained = accuracy(EPLDGenerator({}, CATS, net=EPLDTrainable(TINY, CATS).build(pretrained=False)))
    trained = accuracy(EPLDGenerator({"checkpoint": ck}, CATS))
    assert trained > 0.8 and trained > untrained + 0.3, (trained, untrained)


def test_geodesic_thing_split_keeps_stuff_and_gives_foreground_to_the_geodesically_nearest_thing():
    from scipy.sparse.csgraph import dijkstra

    from pointseg.generators.base import seed_groups
    from pointseg.generators.psps import low_level_maps
    from pointseg.geodesic import edge_costs, to_csgraph

    rng = np.random.default_rng(0)
    img = np.full((16, 20, 3), 200, np.uint8)
    img[:, 10:] = (30, 30, 220)  # two colours: the geodesic cost is high across the border
    img = np.clip(img.astype(int) + rng.integers(-5, 6, img.shape), 0, 255).astype(np.uint8)
    pts = Points([[3.0, 8.0], [15.0, 8.0], [10.0, 1.0]], [1, 2, 7], [1, 1, 7])  # two discs, sky
    groups = seed_groups(pts, CATS)
    thing = [n for n, g in enumerate(groups) if g.isthing]
    stuff = [n for n, g in enumerate(groups) if not g.isthing][0]
    assignment = np.full((16, 20), thing[0], np.int64)  # the network gave all foreground to one thing
    assignment[:3] = stuff
    before = assignment.copy()
    changed = epld_generator.geodesic_thing_split(img, pts, groups, assignment, beta=0.1, downscale=1.0)
    # oracle: scipy Dijkstra from each thing's click on the same PSPS edge costs
    lab, boundary = low_level_maps(img, (16, 20), 0.5)
    graph = to_csgraph(edge_costs(lab, boundary, beta=0.1))
    rc = pts.pixels(16, 20)
    d = np.stack([dijkstra(graph, indices=rc[groups[n].point_index[0], 0] * 20 + rc[groups[n].point_index[0], 1],
                           min_only=True).reshape(16, 20) for n in thing])
    expect = np.array(thing)[d.argmin(0)]
    fg = before != stuff
    np.testing.assert_array_equal(assignment[~fg], before[~fg])  # stuff untouched
    np.testing.assert_array_equal(assignment[fg], expect[fg])
    assert changed == int((before[fg] != expect[fg]).sum()) > 0
    assert (assignment[fg][:, None] == np.array(thing)).any(1).all()


def test_learned_geodesic_split_pays_the_learned_distance_of_every_pixel_entered():
    from scipy.sparse.csgraph import dijkstra

    from pointseg.generators.base import seed_groups
    from pointseg.generators.psps import low_level_maps
    from pointseg.geodesic import add_entry_costs, edge_costs, to_csgraph

    rng = np.random.default_rng(1)
    img = np.clip(150 + rng.integers(-5, 6, (12, 16, 3)), 0, 255).astype(np.uint8)  # flat colour
    pts = Points([[2.0, 6.0], [13.0, 6.0], [8.0, 0.0]], [1, 2, 7], [1, 1, 7])
    groups = seed_groups(pts, CATS)
    thing = [n for n, g in enumerate(groups) if g.isthing]
    # the network: thing 0 owns the left 12 columns, thing 1 the right 4 (the plain geodesic splits in the middle)
    logits = torch.full((len(groups), 12, 16), -4.0)
    logits[thing[0], :, :12] = 4.0
    logits[thing[1], :, 12:] = 4.0
    start = np.full((12, 16), thing[0], np.int64)
    plain, learned = start.copy(), start.copy()
    epld_generator.geodesic_thing_split(img, pts, groups, plain, beta=0.1, downscale=1.0)
    epld_generator.geodesic_thing_split(img, pts, groups, learned, 0.1, 1.0, logits, gamma=0.0)
    np.testing.assert_array_equal(learned, plain)  # gamma 0 is the plain geodesic
    learned = start.copy()
    epld_generator.geodesic_thing_split(img, pts, groups, learned, 0.1, 1.0, logits, gamma=5.0)
    # oracle: scipy Dijkstra on the PSPS edge costs plus gamma * (1 - M_n) of the entered pixel
    lab, boundary = low_level_maps(img, (12, 16), 0.5)
    cost = edge_costs(lab, boundary, beta=0.1)
    m = logits.softmax(0).numpy()
    rc = pts.pixels(12, 16)
    d = np.stack([dijkstra(to_csgraph(add_entry_costs(cost, 5.0 * (1 - m[n]))),
                           indices=rc[groups[n].point_index[0], 0] * 16 + rc[groups[n].point_index[0], 1],
                           min_only=True).reshape(12, 16) for n in thing])
    np.testing.assert_array_equal(learned, np.array(thing)[d.argmin(0)])
    # by hand: entering a pixel of the other thing costs 5 * (1 - M) ~ 5 more, so the split follows the network
    assert (learned[:, :11] == thing[0]).all() and (learned[:, 13:] == thing[1]).all()
    assert (plain[:, :6] == thing[0]).all() and (plain[:, 10:] == thing[1]).all()


def test_split_features_make_the_paths_pay_the_feature_distance_by_hand_and_against_scipy():
    """``split_features``: column 0 is dark, columns 1-9 light, so in colour alone thing B (click at column 9)
    reaches columns 1-9 for free and thing A (click at column 0) pays the colour jump. F^fuse says columns 0-4
    are one thing and 5-9 another: crossing between columns 4 and 5 costs weight * sqrt(2) (unit vectors
    [1, 0] and [0, 1]), more than the jump, so A keeps columns 0-4. Checked against scipy's Dijkstra on PSPS's
    edge costs plus the weight times the feature distance."""
    from scipy.sparse.csgraph import dijkstra

    from pointseg.generators.base import seed_groups
    from pointseg.generators.psps import low_level_maps
    from pointseg.geodesic import edge_costs, to_csgraph

    h, w = 4, 10
    img = np.full((h, w, 3), 200, np.uint8)
    img[:, 0] = 40
    pts = Points([[0.0, 1.0], [9.0, 2.0]], [1, 2], [1, 1])
    groups = seed_groups(pts, CATS)
    a, b = range(len(groups))
    features = torch.zeros(2, h, w)
    features[0, :, :5] = 3.0  # any length: each pixel's vector is normalised
    features[1, :, 5:] = 0.5
    plain, zero, with_f = (np.full((h, w), a, np.int64) for _ in range(3))
    epld_generator.geodesic_thing_split(img, pts, groups, plain, beta=0.0, downscale=1.0)
    epld_generator.geodesic_thing_split(img, pts, groups, zero, 0.0, 1.0, features=features, feature_weight=0.0)
    epld_generator.geodesic_thing_split(img, pts, groups, with_f, 0.0, 1.0, features=features, feature_weight=1.0)
    np.testing.assert_array_equal(zero, plain)  # weight 0 is PSPS's cost
    assert (plain[:, 1:] == b).all() and (plain[:, 0] == a).all()  # by hand: colour alone
    assert (with_f[:, :5] == a).all() and (with_f[:, 5:] == b).all()  # by hand: the features' border
    lab, _ = low_level_maps(img, (h, w), 0.5)
    unit = np.zeros((2, h, w))
    unit[0, :, :5] = 1.0
    unit[1, :, 5:] = 1.0
    graph = to_csgraph(edge_costs(lab) + 1.0 * edge_costs(unit))
    np.testing.assert_allclose(epld_generator.feature_edge_costs(features, (h, w)), edge_costs(unit), atol=1e-6)
    rc = pts.pixels(h, w)
    d = np.stack([dijkstra(graph, indices=rc[n, 0] * w + rc[n, 1], min_only=True).reshape(h, w) for n in (a, b)])
    np.testing.assert_array_equal(with_f, np.array([a, b])[d.argmin(0)])


def test_split_features_reach_the_split_as_the_network_s_f_fuse(monkeypatch):
    cfg = EPLDTrainConfig(**TINY)
    net = EPLDNet(cfg, sorted(CATS), pretrained=False).eval()
    _, images, points = _toy_batch()
    seen = []
    split = epld_generator.geodesic_thing_split

    def spy(*args, **kwargs):
        seen.append((args[-2], args[-1]))
        return split(*args, **kwargs)

    monkeypatch.setattr(epld_generator, "geodesic_thing_split", spy)
    gen = EPLDGenerator({"thing_split": "geodesic", "split_features": 0.5, "postprocess_threads": 1}, CATS, net=net)
    gen(images, points)
    with torch.no_grad():
        batch, out = gen._forward(images, points)
    assert len(seen) == len(images) and all(wt == 0.5 for _, wt in seen)
    for (features, _), fuse in zip(seen, out["fuse"]):
        assert features.shape == (cfg.hidden_dim, cfg.input_size // 8, cfg.input_size // 8)
        torch.testing.assert_close(features, fuse.float(), atol=1e-4, rtol=1e-4)
    seen.clear()
    EPLDGenerator({"thing_split": "geodesic", "postprocess_threads": 1}, CATS, net=net)(images, points)
    assert all(f is None and wt == 0.0 for f, wt in seen)  # off by default
    with pytest.raises(ValueError, match="split_features"):
        EPLDConfig(split_features=-1)
    with pytest.raises(ValueError, match="needs thing_split"):  # it would weigh nothing
        EPLDConfig(split_features=0.3, thing_split="network")
    assert EPLDConfig(split_features=0.3, thing_split="learned_geodesic").split_features == 0.3


def test_split_within_foreground_keeps_paths_off_the_background_and_equals_scipy_on_the_foreground():
    """``split_within: foreground``: a horizontal colour ramp (each step right costs about the same), columns
    0-1 a foreground part without a click, 2 stuff, 3-7 thing A (click at 7), 8-11 stuff, 12-23 thing B's block
    (click at 23). Across the image, A is nearer to columns 12-14 than B; inside the foreground A cannot reach
    them, so B's block is all B's. The click-less part takes the open split (A). Checked against scipy's
    Dijkstra on the foreground's induced subgraph."""
    from scipy.sparse.csgraph import dijkstra

    from pointseg.generators.base import seed_groups
    from pointseg.generators.psps import low_level_maps
    from pointseg.geodesic import edge_costs, to_csgraph

    h, w = 6, 24
    img = np.repeat(np.repeat(np.linspace(40, 220, w).astype(np.uint8)[None, :, None], h, 0), 3, 2)
    pts = Points([[7.0, 3.0], [23.0, 3.0], [9.0, 0.0]], [1, 2, 7], [1, 1, 7])
    groups = seed_groups(pts, CATS)
    a, b = [n for n, g in enumerate(groups) if g.isthing]
    sky = [n for n, g in enumerate(groups) if not g.isthing][0]
    start = np.full((h, w), a, np.int64)
    start[:, [2, 8, 9, 10, 11]] = sky
    opened, within = start.copy(), start.copy()
    epld_generator.geodesic_thing_split(img, pts, groups, opened, beta=0.0, downscale=1.0)
    epld_generator.geodesic_thing_split(img, pts, groups, within, beta=0.0, downscale=1.0, within_foreground=True)
    assert (opened[:, 12:15] == a).all()  # across the stuff band A is nearer
    assert (within[:, 12:] == b).all() and (within[:, 3:8] == a).all() and (within[:, :2] == a).all()
    np.testing.assert_array_equal(within[start == sky], sky)  # stuff untouched
    # oracle: scipy on the subgraph of the foreground pixels
    lab, _ = low_level_maps(img, (h, w), 0.5)
    fg = (start != sky).ravel()
    inside = np.flatnonzero(fg)
    sub = to_csgraph(edge_costs(lab))[inside][:, inside]
    at = {p: i for i, p in enumerate(inside)}
    rc = pts.pixels(h, w)
    d = np.full((2, h * w), np.inf)
    for k, n in enumerate((a, b)):
        y, x = rc[groups[n].point_index[0]]
        d[k, inside] = dijkstra(sub, indices=at[y * w + x], min_only=True)
    reach = np.isfinite(d).any(0).reshape(h, w)
    np.testing.assert_array_equal(within[reach], np.array([a, b])[d.argmin(0)].reshape(h, w)[reach])
    assert not reach[:, :2].any()  # the click-less part is the fallback's
    with pytest.raises(ValueError, match="split_within"):
        EPLDConfig(split_within="stuff")


def test_foreground_band_moves_the_boundary_to_the_colour_edge_and_equals_scipy_in_the_band():
    """``foreground_band``: red columns 0-39, blue 40-79 (with pixel noise); EPLD's foreground (one thing) reaches
    column 47, 8 pixels past the colour edge. A band of 5 does not reach the edge: the blue band is split near its
    middle, where EPLD put the boundary (``band_step``; the noise moves a few pixels). A band of 10 does: its blue
    cells are nearer the blue stuff outside than the red foreground inside, so columns 40-47 (8 x 64 pixels) go
    to the stuff. In both, the band's sides equal scipy's Dijkstra from the two seed sets on the same lengths."""
    from scipy.sparse.csgraph import dijkstra

    from pointseg.generators.base import seed_groups
    from pointseg.generators.psps import low_level_maps
    from pointseg.geodesic import NEIGHBOURS_8, edge_costs, to_csgraph

    h, w = 64, 80
    img = red_blue_image(h, w, 40)
    pts = Points([[10.0, 32.0], [70.0, 32.0]], [1, 7], [1, 7])  # a thing on the red, the sky on the blue
    groups = seed_groups(pts, CATS)
    thing = [n for n, g in enumerate(groups) if g.isthing][0]
    sky = [n for n, g in enumerate(groups) if not g.isthing][0]
    col = np.broadcast_to(np.arange(w)[None, :], (h, w))
    start = np.where(col < 48, thing, sky)
    logits = torch.zeros(len(groups), 8, 10)
    logits[thing, :, :6], logits[sky, :, 6:] = 2.0, 2.0  # M^l's grid: cells of 8 px

    lab, boundary = low_level_maps(img, (h, w), 0.5)
    cost = edge_costs(lab, boundary, beta=0.1)
    graph = to_csgraph(cost + 0.01 * np.array([np.hypot(dy, dx) for dy, dx in NEIGHBOURS_8])[:, None, None])

    def oracle(band: int) -> np.ndarray:  # seeds: the foreground eroded by `band` columns, the stuff likewise
        d_in = dijkstra(graph, indices=np.flatnonzero(col < 48 - band), min_only=True).reshape(h, w)
        d_out = dijkstra(graph, indices=np.flatnonzero(col >= 48 + band), min_only=True).reshape(h, w)
        return np.where(col < 48 - band, thing, np.where(col >= 48 + band, sky, np.where(d_in < d_out, thing, sky)))

    for band in (5, 10):
        got = start.copy()
        moved = epld_generator.geodesic_foreground_band(img, pts, groups, got, logits, band, 0.1, 1.0, 0.01)
        np.testing.assert_array_equal(got, oracle(band))
        assert moved == int((got != start).sum())
        if band == 5:
            assert moved < 0.05 * h * 2 * band and (got[col < 44] == thing).all() and (got[col >= 52] == sky).all()
        else:
            np.testing.assert_array_equal(got, np.where(col < 40, thing, sky))
            assert moved == 8 * h
    assert epld_generator.geodesic_foreground_band(img, pts, groups, start.copy(), logits, 0, 0.1, 1.0) == 0  # off
    only_things = seed_groups(Points([[10.0, 32.0], [70.0, 32.0]], [1, 2], [1, 2]), CATS)  # the void protocol
    assert epld_generator.geodesic_foreground_band(img, pts, only_things, start.copy(), logits, 10, 0.1, 1.0) == 0
    with pytest.raises(ValueError, match="foreground_band"):
        EPLDConfig(foreground_band=-1)
