"""EXITS: retrieval maths (Eq. 2-5), the CRF (Eq. 9), losses, crops, stage 1 on the engine, labelling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pointseg.data.record import Category, ImageRecord, Points
from pointseg.generators import GENERATORS, build_generator
from pointseg.generators.exits import ExitsGenerator, ExitsStage1
from pointseg.generators.exits.crf import crf_energy, crf_weights, mean_field_crf
from pointseg.generators.exits.crops import crop_images, crop_windows, grid_sets, paste_probabilities, to_crop
from pointseg.generators.exits.generator import margin_uncertainty
from pointseg.generators.exits.losses import dice_loss, mil_loss, point_loss
from pointseg.generators.exits.retrieval import (
    inward_points,
    point_dropout,
    random_walk_scores,
    retrieve_points,
    transition_matrix,
)
from pointseg.generators.exits.stage1 import box_masks, object_batch
from pointseg.train.engine import fit_plain, load_trained

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CATS = {1: Category(1, "thing", True), 2: Category(2, "other", True)}


# --------------------------------------------------------------------------- Eq. 2-5


def test_symmetrised_sinkhorn_transition_is_doubly_stochastic():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 64, 64, generator=g) * 3
    S = logits.softmax(-1)  # attention-like: row-stochastic, far from column-stochastic
    T = transition_matrix(S, n_iter=2000, tol=1e-9)
    assert torch.allclose(T, T.transpose(-1, -2))
    assert (T.sum(-1) - 1).abs().max() < 1e-6 and (T.sum(-2) - 1).abs().max() < 1e-6
    assert (T >= 0).all()
    # T comes from S's pattern, not just any doubly stochastic matrix: on a symmetric S, Sinkhorn's
    # A = diag(u) S diag(u) is symmetric, T = A, and the 2x2 cross ratios of S survive the scaling
    S0 = S[0].double()
    Ssym = (S0 + S0.T) / 2
    Tsym = transition_matrix(Ssym, n_iter=2000, tol=1e-10)
    i, j = 3, 17
    lhs = Tsym[i, j] * Tsym[j, i] / (Tsym[i, i] * Tsym[j, j])
    rhs = Ssym[i, j] * Ssym[j, i] / (Ssym[i, i] * Ssym[j, j])
    assert torch.isclose(lhs, rhs, rtol=1e-6)
    assert T.dtype == torch.float64


def test_random_walk_scores_match_dense_matrix_power():
    g = torch.Generator().manual_seed(1)
    T = transition_matrix(torch.rand(1, 16, 16, generator=g) + 0.05, n_iter=2000, tol=1e-10)
    sources = torch.zeros(1, 16, dtype=torch.bool)
    sources[0, [2, 5, 11]] = True
    for alpha in (1, 3, 5):
        dense = torch.linalg.matrix_power(T[0], alpha)
        expected = dense[[2, 5, 11]].mean(0)  # Eq. 3: mean over sources j of T^alpha(j, i)
        got = random_walk_scores(T, sources, alpha)[0]
        assert torch.allclose(got, expected, atol=1e-12)
    # a doubly stochastic walk keeps total mass 1 and spreads toward uniform
    far = random_walk_scores(T, sources, 200)[0]
    assert torch.allclose(far, torch.full((16,), 1 / 16, dtype=far.dtype), atol=1e-6)


def test_retrieval_thresholds_on_two_blocks():
    # two clusters of 8 nodes: 0-7 object, 8-15 background; similarity high inside a cluster
    S = torch.full((16, 16), 0.01)
    S[:8, :8] = 1.0
    S[8:, 8:] = 1.0
    T = transition_matrix(S[None], n_iter=2000)
    fg = torch.zeros(1, 16, dtype=torch.bool)
    fg[0, [0, 1]] = True
    bg = torch.zeros(1, 16, dtype=torch.bool)
    bg[0, [14, 15]] = True
    in_box = torch.ones(1, 16, dtype=torch.bool)
    in_box[0, [14, 15]] = False
    fg_hat, bg_hat, diff = retrieve_points(T, fg, bg, in_box, alpha=3, tau_fg=1e-3, tau_bg=-1e-4)
    assert fg_hat[0].nonzero().flatten().tolist() == list(range(2, 8))  # P_FG itself is not retrieved
    assert bg_hat[0].nonzero().flatten().tolist() == list(range(8, 14))
    assert (diff[0, :8] > 0).all() and (diff[0, 8:] < 0).all()


def test_inward_shift_points_into_the_object():
    ext = torch.tensor([[[10.0, 0.0], [0.0, 10.0], [10.0, 20.0], [20.0, 10.0]]])
    np.testing.assert_allclose(inward_points(ext, 2.0)[0].numpy(), [[10, 2], [2, 10], [10, 18], [18, 10]])


def test_point_dropout_rate_and_seed():
    m = torch.ones(1, 10000, dtype=torch.bool)
    a = point_dropout(m, 0.9, torch.Generator().manual_seed(3))
    b = point_dropout(m, 0.9, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and 0.08 < a.float().mean() < 0.12
    assert not point_dropout(~m, 0.0, torch.Generator().manual_seed(0)).any()


# --------------------------------------------------------------------------- CRF and losses


def test_crf_energy_decreases_over_iterations():
    g = torch.Generator().manual_seed(0)
    image = torch.zeros(2, 3, 24, 24)
    image[:, :, :, 12:] = 1.0  # two flat halves
    image += 0.05 * torch.rand(image.shape, generator=g)
    prob = torch.rand(2, 1, 24, 24, generator=g).clamp(0.05, 0.95)
    for dilation in (1, 2):
        q, energies = mean_field_crf(prob, image, iters=6, dilation=dilation, theta_color=0.2,
                                     w_appearance=2.0, w_smooth=0.5, return_energy=True)
        steps = energies[1:] - energies[:-1]
        assert (steps <= 1e-4).all(), steps
        assert (energies[-1] < energies[0] - 1).all()
        # energy of the returned q is the last one recorded
        w = crf_weights(image, dilation, 0.2, 3.0, 2.0, 0.5)
        assert torch.allclose(crf_energy(q, prob, w, dilation), energies[-1])
    # the CRF cleans noise toward the halves' majority: a noisy left half that leans background
    prob = torch.where(torch.arange(24)[None, None, None, :] < 12, 0.4, 0.7).expand(1, 1, 24, 24).clone()
    prob += 0.1 * (torch.rand(prob.shape, generator=g) - 0.5)
    q = mean_field_crf(prob, image[:1], iters=10, w_appearance=2.0)
    assert (q[..., :12] < 0.5).float().mean() > 0.95 and (q[..., 12:] > 0.5).float().mean() > 0.95


def test_weights_are_symmetric():
    image = torch.rand(1, 3, 9, 9)
    w = crf_weights(image, 1)
    # offset k = (dy, dx) at pixel i equals offset -k at pixel i + k
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    for k, (dy, dx) in enumerate(offsets):
        kk = offsets.index((-dy, -dx))
        assert torch.allclose(w[0, k, 2:7, 2:7], w[0, kk, 2 + dy : 7 + dy, 2 + dx : 7 + dx])
    assert (w[0, offsets.index((-1, 0)), 0] == 0).all()  # no neighbour above the first row


def test_dice_and_mil_hand_computed():
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    y = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert torch.isclose(dice_loss(x, y, eps=0), torch.tensor([0.5]))
    box = torch.zeros(1, 1, 6, 6)
    box[..., 1:4, 2:5] = 1
    assert torch.isclose(mil_loss(box, box), torch.tensor([0.0]), atol=1e-6)
    # a single pixel inside the box covers one of three columns and one of three rows
    dot = torch.zeros(1, 1, 6, 6)
    dot[..., 2, 3] = 1
    assert torch.isclose(mil_loss(dot, box), torch.tensor([2 * (1 - 2 / 4)]), atol=1e-4)
    # Eq. 8: the MIL term is added only when nothing was retrieved
    target = torch.zeros(1, 3, 3)
    known = torch.ones(1, 3, 3)
    with_points = point_loss(box, target, known, torch.tensor([True]), box, 10.0)
    without = point_loss(box, target, known, torch.tensor([False]), box, 10.0)
    assert torch.isclose(without - with_points, 10 * mil_loss(box, box), atol=1e-6)


# --------------------------------------------------------------------------- crops


def test_crop_and_paste_round_trip():
    image = torch.zeros(1, 40, 60)
    image[0, 10:20, 15:45] = 1.0
    windows = crop_windows(np.array([[15, 10, 44, 19]]), margin=0.5)
    np.testing.assert_allclose(windows, [[0, 5, 60, 25]])  # box [15, 45) x [10, 20) grown by half its size
    crop = crop_images(image, windows, 32)[0, 0]
    assert crop[9:23, 9:23].min() > 0.9 and crop[:, :7].max() < 0.01  # the box fills the middle half
    (rows, cols), patch = paste_probabilities(crop, windows[0], 40, 60)
    back = np.zeros((40, 60))
    back[rows, cols] = patch
    assert np.abs((back > 0.5) - image[0].numpy()).sum() <= 4
    # pixel-centre points map to crop coordinates; grid cells of the box and the inward points
    xy = to_crop(np.array([[[15.0, 10.0], [44.0, 19.0]]]), windows, 32)
    np.testing.assert_allclose(xy[0], [[(15.5 - 0) * 32 / 60, (10.5 - 5) * 32 / 20],
                                       [(44.5 - 0) * 32 / 60, (19.5 - 5) * 32 / 20]])
    fg, bg, in_box = grid_sets(torch.tensor([[[12.0, 9.0], [9.0, 20.0], [20.0, 23.0], [23.0, 12.0]]]),
                               torch.tensor([[8.0, 8.0, 24.0, 24.0]]), torch.tensor([[0.0, 0.0, 32.0, 32.0]]), 4, 8)
    assert in_box[0].view(4, 4)[1:3, 1:3].all() and in_box.sum() == 4
    assert fg.sum() == 4 and not (fg & bg).any() and bg.sum() == 12


def test_margin_uncertainty():
    probs = np.array([[[0.5, 0.99, 0.0, 0.9]], [[0.0, 0.0, 0.0, 0.9]]], np.float32)
    u = margin_uncertainty(probs)[0]
    np.testing.assert_allclose(u, [1.0, 0.02, 0.0, 1.0], atol=1e-6)


# --------------------------------------------------------------------------- stage 1, labelling, bad input


def _scene(seed=0, size=64):
    """An image with two flat-coloured objects (a disc and a bar) on noise, and their extreme points."""
    rng = np.random.default_rng(seed)
    img = (rng.random((size, size, 3)) * 80).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - 22) ** 2 + (xx - 20) ** 2 <= 12**2
    bar = (yy >= 40) & (yy <= 55) & (xx >= 30) & (xx <= 60)
    img[disc] = (230, 40, 40)
    img[bar] = (40, 200, 60)
    pts = []
    for seg, m in ((1, disc), (2, bar)):
        r, c = np.nonzero(m)
        pts += [(c[r == r.min()].mean(), r.min(), seg), (c.min(), r[c == c.min()].mean(), seg),
                (c[r == r.max()].mean(), r.max(), seg), (c.max(), r[c == c.max()].mean(), seg)]
    points = Points([(x, y) for x, y, _ in pts], [s for *_, s in pts], [1] * 4 + [2] * 4)
    return img, points, {1: disc, 2: bar}


def _rows(tmp_path, n=3):
    from PIL import Image

    rows = []
    for i in range(n):
        img, pts, _ = _scene(i)
        path = tmp_path / f"{i}.png"
        Image.fromarray(img).save(path)
        import json

        rows.append({"image_id": i, "file_name": str(path), "height": 64, "width": 64,
                     "points": json.dumps(pts.to_list())})
    return rows


TINY = {"crop_size": 32, "patch": 8, "decoder_dim": 12, "upsample": 2, "vit_dim": 16, "vit_depth": 2,
        "vit_heads": 2, "attention_layer": 2, "batch_size": 2, "report_every": 1, "checkpoint_every": 2}


def test_object_batch_crops_every_object_and_flips_consistently():
    img, pts, _ = _scene()
    rec = ImageRecord(7, 64, 64, image=img, points=pts)
    cfg = ExitsStage1.Config(**TINY, seed=1)
    b = object_batch([rec], CATS, cfg, epoch=0, train=False)
    assert b["crops"].shape == (2, 3, 32, 32) and b["objects"] == [(7, 1), (7, 2)]
    # the box of the extreme points spans the middle of the crop: margin 0.15 of 1.3 -> 32 * 0.15 / 1.3
    m = 32 * 0.15 / 1.3
    np.testing.assert_allclose(b["boxes"].numpy(), [[m, m, 32 - m, 32 - m]] * 2, atol=1e-4)
    flipped = object_batch([rec], CATS, cfg.model_copy(update={"flip": True, "crop_jitter": 0.0}), epoch=0, train=True)
    was_flipped = [torch.equal(flipped["crops"][k], b["crops"][k].flip(-1)) for k in range(2)]
    assert any(was_flipped)  # seed 1, epoch 0 flips one of the two
    for k in range(2):
        if was_flipped[k]:
            np.testing.assert_allclose(flipped["extremes"][k, 1, 0], 32 - b["extremes"][k, 3, 0], atol=1e-5)
        else:
            assert torch.equal(flipped["crops"][k], b["crops"][k])
    jittered = object_batch([rec], CATS, cfg.model_copy(update={"crop_jitter": 0.2}), epoch=0, train=True)
    assert not torch.allclose(jittered["boxes"], b["boxes"])  # the box moves inside the crop
    # each side's margin (fraction of the box) is drawn from [0.15, 0.15 + 0.2]: never below the labelling
    # margin, so every side keeps cells outside the box (P_BG)
    x0, y0, x1, y1 = jittered["boxes"].double().unbind(1)
    margins = torch.stack([x0 / (x1 - x0), y0 / (y1 - y0), (32 - x1) / (x1 - x0), (32 - y1) / (y1 - y0)])
    assert margins.min() >= 0.15 - 1e-4 and margins.max() <= 0.35 + 1e-4
    assert margins.max() > 0.2


@pytest.mark.parametrize("similarity", ["vit_attention", "feature_cosine"])
def test_stage1_fit_save_load_and_label(tmp_path, similarity):
    rows = _rows(tmp_path)
    cfg = {**TINY, "steps": 4, "warmup_steps": 2, "similarity": similarity}
    last = fit_plain(ExitsStage1(cfg, CATS), rows, str(tmp_path / "ck"))
    assert last["step"] == 4 and last["skipped_rows"] == 0
    net, meta = load_trained(str(tmp_path / "ck"), ExitsStage1)
    assert (net.extractor is None) == (similarity == "feature_cosine")
    assert meta["config"]["similarity"] == similarity
    from pointseg.train.checkpoint import read_checkpoint

    assert "teacher" in read_checkpoint(str(tmp_path / "ck"), extra=True).extra  # the EMA teacher is saved
    gen = build_generator("exits", {"checkpoint": str(tmp_path / "ck")}, CATS)
    in_memory = ExitsGenerator({}, CATS, net=net)
    unfolded = ExitsGenerator({"fold_batchnorm": False}, CATS, net=net)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # the net handed in keeps its BN
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in in_memory.net.modules())  # the labelling copy: folded
    img, pts, _ = _scene(5)
    a, b, u = gen([img], [pts])[0], in_memory([img], [pts])[0], unfolded([img], [pts])[0]
    np.testing.assert_array_equal(a.id_map, b.id_map)  # loaded weights = trained weights
    np.testing.assert_array_equal(a.id_map, u.id_map)  # folding the BatchNorms leaves the labels as they were
    np.testing.assert_allclose(a.uncertainty, u.uncertainty, atol=1e-4)
    assert a.uncertainty.shape == (64, 64) and 0 <= a.uncertainty.min() and a.uncertainty.max() <= 1
    assert a.diagnostics["objects"] == 2 and a.diagnostics["labelled"] == 2
    # resume: a finished run reloads and reports the same step
    assert fit_plain(ExitsStage1(cfg, CATS), rows, str(tmp_path / "ck"))["step"] == 4


def test_mil_always_adds_the_mil_term_for_objects_with_retrieved_points():
    """Eq. 8 with ``mil: fallback`` (the paper) drops MIL where points were retrieved; ``always`` keeps it."""
    recs = [ImageRecord(i, 64, 64, image=_scene(i)[0], points=_scene(i)[1]) for i in range(2)]
    base = {**TINY, "similarity": "feature_cosine", "tau_reference_nodes": None, "tau_fg": 0.0, "tau_bg": 0.0,
            "point_dropout": 0.0}
    terms = {}
    for mode in ("fallback", "always"):
        trainable = ExitsStage1({**base, "mil": mode}, CATS)
        torch.manual_seed(0)
        net = trainable.build().eval()
        trainable.start(net)
        batch = object_batch(recs, CATS, trainable.config, epoch=0, train=False)
        terms[mode] = trainable.loss(net, batch, step=5)
    assert float(terms["fallback"]["mil_fallback"]) == 0.0  # tau 0: every object retrieves some cell
    assert float(terms["always"]["mil_fallback"]) == 1.0
    cfg = trainable.config
    logits, _ = net(batch["crops"], "generator_trunk")
    box = box_masks(batch["boxes"], cfg.grid * cfg.upsample, cfg.crop_size)
    expected = cfg.lambda_mil * mil_loss(torch.sigmoid(logits), box).mean()
    assert torch.allclose(terms["always"]["point"] - terms["fallback"]["point"], expected, atol=1e-5)


def test_stage1_ema_teacher_moves_toward_the_student(tmp_path):
    trainable = ExitsStage1({**TINY, "warmup_steps": 0, "ema_momentum": 0.5, "similarity": "feature_cosine"}, CATS)
    net = trainable.build()
    trainable.start(net)
    p_student = next(net.generator.decoder.parameters())
    p_teacher = next(trainable.teacher.decoder.parameters())
    before = p_teacher.detach().clone()
    with torch.no_grad():
        p_student.add_(1.0)
    trainable.after_step(net, 1)
    assert torch.allclose(p_teacher, before + 0.5)


def test_bad_objects_fall_back_and_others_are_labelled(tmp_path):
    from pointseg.generators.exits.network import ExitsNet

    net = ExitsNet(ExitsStage1.Config(**TINY, similarity="feature_cosine"), pretrained=False).eval()
    gen = ExitsGenerator({"min_object_px": 4}, CATS, net=net)
    img, pts, _ = _scene()
    extra = Points([(5, 5)] * 4 + [(50, 3), (52, 3), (58, 3), (55, 3)] + [(60, 60), (62, 61), (70, 62), (61, 63)]
                   + [(10, 60), (11, 61), (12, 62), (11, 62)],
                   [10] * 4 + [11] * 4 + [12] * 4 + [13] * 4, [1] * 16)
    # 10: four points on one pixel; 11: one line; 12: a point outside the 64 x 64 image; 13: a 3 px object
    allp = Points(np.concatenate([pts.xy, extra.xy]), np.concatenate([pts.segment, extra.segment]),
                  np.concatenate([pts.category_id, extra.category_id]))
    label = gen([img], [allp])[0]
    d = label.diagnostics
    assert d["objects"] == 6 and d["degenerate"] == 2 and d["small"] == 1 and d["points_clipped"] == 1
    sources = {s["source_segment"] for s in label.segments_info}
    assert {10, 11, 13} <= sources  # fallbacks keep their object
    ids = {s["source_segment"]: s["id"] for s in label.segments_info}
    assert (label.id_map == ids[10]).sum() == 1  # the one pixel
    assert (label.id_map == ids[11]).sum() == 9  # the line x = 50 .. 58 on row 3
    summary = ExitsGenerator.summarize([d, d])
    assert summary["summary"]["degenerate"] == 4


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="crop_size"):
        ExitsStage1.Config(crop_size=100, patch=8)
    with pytest.raises(ValueError, match="attention_layer"):
        ExitsStage1.Config(attention_layer=9, vit_depth=6)
    with pytest.raises(ValueError, match="mask_thresh"):
        ExitsGenerator.Config(mask_thresh=0.5)
    with pytest.raises(ValueError, match="checkpoint"):
        ExitsGenerator({}, CATS)
    assert GENERATORS["exits"] is ExitsGenerator


def test_sinkhorn_knopp_matches_pot_and_the_log_domain_solver():
    import ot

    from pointseg.sinkhorn import sinkhorn_knopp, sinkhorn_log

    g = torch.Generator().manual_seed(2)
    K = (torch.randn(20, 20, generator=g, dtype=torch.float64) * 2).exp()
    A = sinkhorn_knopp(K, n_iter=5000, tol=1e-12)
    ones = np.ones(20)
    expected = ot.sinkhorn(ones, ones, -K.log().numpy(), reg=1.0, numItermax=100000, stopThr=1e-13)
    np.testing.assert_allclose(A.numpy(), expected, atol=1e-8)
    plan = sinkhorn_log(-K.log(), torch.ones(20, dtype=torch.float64), eps=1.0, n_iter=20000, tol=1e-11).plan
    assert torch.allclose(A, plan, atol=1e-8)
    with pytest.raises(ValueError, match="> 0"):
        sinkhorn_knopp(torch.zeros(3, 3))


class _ConstantNet(torch.nn.Module):
    """A stand-in generator network: every crop's mask is certain everywhere (M = sigmoid(10))."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.train_config = ExitsStage1.Config(**TINY)

    def forward(self, x):
        return torch.full((len(x), 1, 8, 8), 10.0) + self.w


def test_overlap_rule_and_clip_to_box():
    img = np.zeros((40, 40, 3), np.uint8)
    big = [(20, 2), (2, 20), (20, 37), (37, 20)]
    small = [(20, 15), (15, 20), (20, 25), (25, 20)]
    pts = Points(big + small, [1] * 4 + [2] * 4, [1] * 8)
    net = _ConstantNet()
    lab = ExitsGenerator({}, CATS, net=net)([img], [pts])[0]
    ids = {s["source_segment"]: s["id"] for s in lab.segments_info}
    assert (lab.id_map[15:26, 15:26] == ids[2]).all()  # the smaller box wins its pixels
    # clip_to_box: the crop's margin is context, the mask stops at the box (x, y in 2 .. 37)
    assert (lab.id_map[2:38, 2:38] > 0).all() and (lab.id_map[:2] == 0).all() and (lab.id_map[:, 38:] == 0).all()
    unclipped = ExitsGenerator({"clip_to_box": False}, CATS, net=net)([img], [pts])[0]
    assert (unclipped.id_map[:2] > 0).any()
    by_prob = ExitsGenerator({"overlap": "probability"}, CATS, net=net)([img], [pts])[0]
    assert (by_prob.id_map[15:26, 15:26] == ids[1]).mean() > 0.5  # equal M (up to resampling): mostly the first
    # uncertainty: two certain objects claim the small box's pixels equally
    assert lab.uncertainty[20, 20] > 0.99 and lab.uncertainty[5, 20] < 0.01
