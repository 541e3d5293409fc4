"""P2Seg stage 1 on the engine: batches > 1, rounds with a teacher, save/load round trip, valid pseudo labels."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from pointseg.config import DatasetConfig, PointsConfig
from pointseg.data.prepare import prepare_inputs, read_index
from pointseg.data.record import Points
from pointseg.generators import build_generator
from pointseg.generators.p2seg import P2SegConfig, P2SegGenerator, P2SegTrainable
from pointseg.generators.p2seg.generator import instance_uncertainty
from pointseg.generators.p2seg.targets import ThingLayout, network_maps
from pointseg.train.checkpoint import read_checkpoint
from pointseg.train.engine import fit_plain, load_trained

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = {"steps": 3, "batch_size": 2, "image_size": 64, "affinity_grid": 8, "pretrained": False, "width": 16,
         "embed_dim": 8, "checkpoint_every": 2, "report_every": 2}
PARAMS = {"rounds": 1, "beta": 2.0}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("p2seg_data"))
    cats, _ = prepare_inputs(DatasetConfig(kind="synthetic", synthetic={"num_images": 3, "height": 64, "width": 64}),
                             PointsConfig(scheme="p1", seed=0), out)
    return cats, read_index(out + "/index/index.parquet")


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory):
    cats, rows = synthetic
    ck = str(tmp_path_factory.mktemp("p2seg_ck") / "ck")
    trainable = P2SegTrainable(TRAIN, cats, context={"generator": PARAMS})
    metrics = fit_plain(trainable, rows, ck, resume=False)
    return cats, rows, ck, trainable, metrics


def test_fit_trains_batches_over_two_rounds(trained):
    cats, rows, ck, trainable, metrics = trained
    assert metrics["step"] == 3 and metrics["skipped_rows"] == 0
    assert np.isfinite([metrics["loss"], metrics["seg"], metrics["offset"], metrics["i2s"]]).all()
    # Round 1 started at step 2 of 3: the teacher is the network of that moment and is checkpointed.
    assert trainable.teacher_round == 1 and trainable.teacher is not None
    extra = read_checkpoint(ck, extra=True).extra
    assert extra["teacher_round"] == 1 and set(extra["teacher"]) == set(trainable.teacher.state_dict())


def test_batch_has_more_than_one_image(synthetic):
    cats, rows = synthetic
    trainable = P2SegTrainable(TRAIN, cats, context={"generator": PARAMS})
    batch = trainable.collate()(rows[:2])
    assert batch["image"].shape == (2, 3, 64, 64) and batch["image_ids"] == [r["image_id"] for r in rows[:2]]
    t = batch["targets"]
    assert t["cls"].shape == (2, 64, 64) and t["offsets"].shape == (2, 2, 64, 64) and t["grid"].shape == (2, 64)
    # Eq. 2 targets exist exactly on the instance pixels of the class map.
    assert torch.equal(t["weight"] > 0, t["cls"] > 0)
    model = trainable.build(pretrained=False)
    terms = trainable.loss(model, batch, 0)
    assert set(terms) == {"loss", "seg", "offset", "i2s"} and terms["loss"].requires_grad


def test_save_load_round_trip_gives_the_same_labels(trained, synthetic):
    cats, rows, ck, trainable, _ = trained
    net, meta = load_trained(ck, P2SegTrainable)
    assert meta["trainable"] == "p2seg" and meta["config"]["image_size"] == 64
    from_ck = build_generator("p2seg", {**PARAMS, "checkpoint": ck}, cats)
    in_memory = P2SegGenerator({**PARAMS}, cats, net=net, net_config=meta["config"])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (50, 70, 3), dtype=np.uint8) for _ in range(3)]
    points = [Points([[10, 10], [60, 40]], [1, 2], [c, c]) for c in sorted(k for k, v in cats.items() if v.isthing)[:3]]
    unfolded = P2SegGenerator({**PARAMS, "fold_batchnorm": False}, cats, net=net, net_config=meta["config"])
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # the net handed in keeps its BN
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in in_memory.net.modules())  # the labelling copy: folded
    a, b = from_ck(images, points), in_memory(images, points)
    singles = [from_ck.generate(im, p) for im, p in zip(images, points)]
    for la, lb, ls, lu in zip(a, b, singles, unfolded(images, points)):
        np.testing.assert_array_equal(la.id_map, lb.id_map)
        np.testing.assert_array_equal(la.id_map, lu.id_map)  # folding the BatchNorms leaves the labels as they were
        np.testing.assert_allclose(la.uncertainty, lu.uncertainty, atol=1e-4)
        np.testing.assert_array_equal(la.id_map, ls.id_map)  # the batched call equals image by image
        assert la.id_map.shape == (50, 70) and la.id_map.dtype == np.int32
        ids = {s["id"] for s in la.segments_info}
        assert set(np.unique(la.id_map)) <= ids | {0}
        assert len([s for s in la.segments_info if s["isthing"]]) == 2  # Points First: every point an instance
        for s in la.segments_info:
            assert {"id", "category_id", "isthing", "iscrowd", "area", "bbox", "source_segment"} <= set(s)
            assert s["area"] == int((la.id_map == s["id"]).sum())
        assert la.uncertainty.shape == (50, 70) and 0 <= la.uncertainty.min() and la.uncertainty.max() <= 1


def test_resume_continues_with_the_teacher(trained, synthetic, tmp_path):
    cats, rows, ck, trainable, _ = trained
    resumed = P2SegTrainable({**TRAIN, "steps": 5}, cats, context={"generator": PARAMS})
    shutil.copytree(ck, tmp_path / "ck")
    metrics = fit_plain(resumed, rows, str(tmp_path / "ck"))
    assert metrics["start_step"] == 3 and metrics["step"] == 5
    # The restored teacher is the checkpointed one (5 steps, 1 round: round 1 from step 2, no new snapshot).
    for k, v in trainable.teacher.state_dict().items():
        assert torch.equal(v, resumed.teacher.state_dict()[k])


def test_wrong_checkpoint_and_missing_checkpoint_are_named(trained):
    cats, *_ = trained
    with pytest.raises(ValueError, match="checkpoint"):
        build_generator("p2seg", {}, cats)
    assert P2SegGenerator.trains(P2SegGenerator.Config()) and not P2SegGenerator.trains(
        P2SegGenerator.Config(use_network=False))


def test_uncertainty_is_one_minus_the_top_two_margin():
    # Two pixels, background + one class with two instances at columns 0 and 4 (T = 1, no offsets).
    prob = torch.tensor([[[0.2, 0.9]], [[0.8, 0.1]]])  # (K=2, h=1, w=2)
    layout = ThingLayout([], np.array([0, 1]), np.array([[0.0, 0.0], [0.0, 4.0]]), np.array([0, 1]),
                         np.array([1, 1]), np.zeros((0, 2)), np.zeros(0, np.int64))
    u = instance_uncertainty(prob, [0, 1], layout, None, temperature=1.0)
    # Pixel (0, 0): distances 0 and 4 -> pi = (1, e^-4) / (1 + e^-4); masks: bg 0.2, 0.8 pi_0, 0.8 pi_1.
    pi0 = 1 / (1 + np.exp(-4.0))
    assert u[0, 0] == pytest.approx(1 - (0.8 * pi0 - 0.2), rel=1e-5)
    # Pixel (0, 1): distances 1 and 3; background 0.9 is the top mask.
    pi0 = 1 / (1 + np.exp(-2.0))
    assert u[0, 1] == pytest.approx(1 - (0.9 - 0.1 * pi0), rel=1e-5)


def test_class_agnostic_map_keeps_the_points_classes(synthetic):
    cats, rows = synthetic
    cfg = {**TRAIN, "class_map": "agnostic"}
    trainable = P2SegTrainable(cfg, cats, context={"generator": PARAMS})
    model = trainable.build(pretrained=False).eval()
    assert model.num_classes == 2
    batch = trainable.collate()(rows[:2])
    assert set(torch.unique(batch["targets"]["cls"]).tolist()) <= {0, 1}
    gen = P2SegGenerator(PARAMS, cats, net=model, net_config=cfg)
    things = sorted(k for k, v in cats.items() if v.isthing)[:2]
    img = np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    label = gen([img], [Points([[10, 10], [50, 30]], [1, 2], things)])[0]
    assert sorted(s["category_id"] for s in label.segments_info if s["isthing"]) == sorted(things)


def test_stride_4_heads_double_the_class_map_and_keep_offsets_in_image_pixels(synthetic):
    cats, rows = synthetic
    cfg = {**TRAIN, "head_stride": 4, "affinity_grid": 16}
    trainable = P2SegTrainable(cfg, cats, context={"generator": PARAMS})
    model = trainable.build(pretrained=False).eval()
    out = model(torch.rand(2, 3, 64, 64))
    assert out["class_logits"].shape[-2:] == (16, 16) and out["offsets"].shape[-2:] == (16, 16)
    assert out["affinity_logits"].shape == (2, 256, 256)
    terms = trainable.loss(model.train(), trainable.collate()(rows[:2]), 0)
    assert np.isfinite(float(terms["loss"]))
    # Offsets are in pixels of the 64-px input whatever the head stride: (4, 8) there is (2, 16) on a 32 x 128 image.
    one = {"class_logits": torch.zeros(2, 16, 16), "offsets": torch.tensor([4.0, 8.0]).view(2, 1, 1).expand(2, 16, 16),
           "affinity_logits": torch.zeros(256, 256)}
    _, _, off = network_maps(one, [0, 1], P2SegConfig(i2s=False), (32, 128), 64)
    assert np.allclose(off[0], 2.0) and np.allclose(off[1], 16.0)
    # The affinity grid may be as fine as the head's map, not finer.
    with pytest.raises(ValueError, match="finer than the stride-8 map"):
        P2SegTrainable.Config.model_validate({**TRAIN, "affinity_grid": 16})
    with pytest.raises(ValueError, match="finer than the stride-4 map"):
        P2SegTrainable.Config.model_validate({**cfg, "affinity_grid": 32})



def test_window_affinity_trains_on_the_head_map_and_labels_through_the_window_i2s(synthetic, tmp_path):
    cats, rows = synthetic
    cfg = {**TRAIN, "head_stride": 4, "affinity": "window", "affinity_window": 3, "affinity_dilation": 2}
    trainable = P2SegTrainable(cfg, cats, context={"generator": PARAMS})
    assert trainable.config.affinity_side == 16 and trainable.config.window == (3, 2)
    model = trainable.build(pretrained=False)
    batch = trainable.collate()(rows[:2])
    assert batch["targets"]["grid"].shape == (2, 256)  # instance labels on the 16 x 16 head map
    assert model(batch["image"])["affinity_logits"].shape == (2, 9, 256)
    terms = trainable.loss(model, batch, 0)
    assert np.isfinite(float(terms["i2s"].detach())) and terms["loss"].requires_grad
    ck = str(tmp_path / "ck")
    fit_plain(trainable, rows, ck, resume=False)  # rounds 1: round 1's labels come from the window I2S map
    gen = build_generator("p2seg", {**PARAMS, "checkpoint": ck}, cats)
    assert gen.window == (3, 2)
    thing = sorted(k for k, v in cats.items() if v.isthing)[0]
    img = np.random.default_rng(2).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    label = gen([img], [Points([[10, 10]], [1], [thing])])[0]
    assert label.id_map.shape == img.shape[:2]
    with pytest.raises(ValueError, match="odd"):
        P2SegTrainable.Config.model_validate({**cfg, "affinity_window": 4})


def test_input_size_labels_the_same_weights_at_a_finer_class_map(synthetic):
    cats, _ = synthetic
    cfg = {**TRAIN, "head_stride": 4, "affinity_grid": 16}
    model = P2SegTrainable(cfg, cats, context={"generator": PARAMS}).build(pretrained=False).eval()
    img = np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    default = P2SegGenerator({**PARAMS, "i2s": False}, cats, net=model, net_config=cfg)
    finer = P2SegGenerator({**PARAMS, "i2s": False, "input_size": 128}, cats, net=model, net_config=cfg)
    assert default.input_size == 64 and finer.input_size == 128
    assert default._forward([img])["class_logits"].shape[-2:] == (16, 16)
    assert finer._forward([img])["class_logits"].shape[-2:] == (32, 32)
    thing = sorted(k for k, v in cats.items() if v.isthing)[0]
    label = finer([img], [Points([[10, 10]], [1], [thing])])[0]
    assert label.id_map.shape == (40, 60)
    with pytest.raises(ValueError, match="multiple of 32"):
        P2SegConfig(input_size=100)


def test_foreground_band_reaches_the_network_labelling(synthetic):
    """``foreground_band`` on the network's map: the labels carry the moved pixel count, and on a two-colour image
    whose class map (an untrained network) puts the boundary elsewhere the band moves pixels; 0 moves none."""
    cats, rows = synthetic
    trainable = P2SegTrainable(TRAIN, cats, context={"generator": PARAMS})
    model = trainable.build(pretrained=False).eval()
    things = sorted(k for k, v in cats.items() if v.isthing)[:1]
    stuff = sorted(k for k, v in cats.items() if not v.isthing)[:1]
    img = np.zeros((48, 64, 3), np.uint8)
    img[:, :32], img[:, 32:] = (200, 30, 30), (30, 30, 200)
    pts = Points([[8, 24], [56, 24]], [1, 2], things + stuff)
    moved = {}
    for band in (0, 4):
        gen = P2SegGenerator({**PARAMS, "i2s": False, "foreground_band": band, "split_downscale": 1.0}, cats,
                             net=model, net_config=TRAIN)
        moved[band] = gen([img], [pts])[0].diagnostics["band_foreground_pixels"]
    assert moved[0] == 0 and moved[4] > 0


def test_band_and_geodesic_split_share_one_cost_of_the_image(synthetic, monkeypatch):
    """With ``foreground_band`` and ``grouping: geodesic`` the network labelling computes PSPS's cost of the
    image once and gives it to both (it used to compute it twice); the split still runs on it (two thing
    clicks of one colour region are split apart), and without a band or a split nothing computes it."""
    import pointseg.generators.p2seg.generator as gen_mod
    import pointseg.generators.p2seg.s2i as s2i_mod

    cats, _ = synthetic
    model = P2SegTrainable(TRAIN, cats, context={"generator": PARAMS}).build(pretrained=False).eval()
    things = sorted(k for k, v in cats.items() if v.isthing)[:1]
    stuff = sorted(k for k, v in cats.items() if not v.isthing)[:1]
    img = np.zeros((48, 64, 3), np.uint8)
    img[:, :32], img[:, 32:] = (200, 30, 30), (30, 30, 200)
    pts = Points([[4, 10], [28, 10], [56, 24]], [1, 2, 3], things * 2 + stuff)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1:])
        return real(*args, **kwargs)

    real = gen_mod.geodesic_cost
    monkeypatch.setattr(gen_mod, "geodesic_cost", counted)
    monkeypatch.setattr(s2i_mod, "geodesic_cost", counted)
    for band, grouping, expected in ((4, "geodesic", 1), (0, "geodesic", 1), (4, "nearest_point", 1), (0, "nearest_point", 0)):
        calls.clear()
        gen = P2SegGenerator({**PARAMS, "i2s": False, "foreground_band": band, "grouping": grouping,
                              "components": "foreground", "split_downscale": 1.0}, cats, net=model, net_config=TRAIN)
        label = gen([img], [pts])[0]
        assert len(calls) == expected, (band, grouping, calls)
        if grouping == "geodesic":
            assert label.diagnostics["split_components"] >= 1
