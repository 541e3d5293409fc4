"""P2Seg algorithms against hand computations: S2I (Eq. 1-2), I2S, the losses (Eq. 3-5), bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import red_blue_image
from pointseg.data.record import Category, Points
from pointseg.generators import build_generator
from pointseg.generators.p2seg import P2SegConfig
from pointseg.generators.p2seg.i2s import (affinity_targets, grid_labels, i2s_semantic, i2s_window_semantic,
                                          pixel_cell_affinity, window_affinity, window_affinity_targets)
from pointseg.generators.p2seg.losses import i2s_loss, offset_loss, seg_loss
from pointseg.generators.p2seg.network import P2SegNet
from pointseg.generators.p2seg.s2i import (GeodesicSplit, class_components, nearest_point_split, offset_targets,
                                           s2i_instances)
from pointseg.generators.p2seg.stage1 import round_of
from pointseg.generators.p2seg.targets import on_grid

CATS = {1: Category(1, "cat", True), 2: Category(2, "dog", True), 10: Category(10, "background", False)}


def two_components():
    """Class-1 map with two components: A (rows 0-3, cols 0-5), B (rows 0-3, cols 8-9)."""
    sem = np.zeros((4, 10), np.int64)
    sem[:, 0:6] = 1
    sem[:, 8:10] = 1
    return sem


# ----------------------------------------------------------------------------- S2I


def test_nearest_point_split_eq1_on_two_components():
    sem = two_components()
    # Two points in A, one in B; one instance per point.
    yx = np.array([[1.0, 0.0], [1.0, 4.0], [2.0, 9.0]])
    res = s2i_instances(sem, yx, np.array([0, 1, 2]), np.array([1, 1, 1]), "points", min_area=1)
    # Hand computation in A: ||p - e_0||² - ||p - e_1||² = c² - (c - 4)² = 8c - 16, so columns 0..2 (a tie at
    # c = 2 goes to the lower index) are point 0, columns 3..5 point 1; B has one point: all of it is point 2.
    want = np.full((4, 10), -1)
    want[:, 0:3] = 0
    want[:, 3:6] = 1
    want[:, 8:10] = 2
    np.testing.assert_array_equal(res.instance, want)
    assert res.counters["components"] == 2 and res.counters["split_components"] == 1
    assert res.counters["default_boxes"] == 0 and res.counters["seed_pixels_restored"] == 0


def test_semantic_first_keeps_one_instance_per_component():
    sem = two_components()
    yx = np.array([[1.0, 0.0], [1.0, 4.0], [2.0, 9.0]])
    res = s2i_instances(sem, yx, np.array([0, 1, 2]), np.array([1, 1, 1]), "semantic")
    # A's centroid (1.5, 2.5) is nearer point 1 (distance 1.58) than point 0 (2.55): A is all point 1.
    want = np.full((4, 10), -1)
    want[:, 0:6] = 1
    want[:, 8:10] = 2
    np.testing.assert_array_equal(res.instance, want)
    assert res.counters["lost_points"] == 1


def test_offsets_decide_the_split_when_given():
    sem = two_components()
    yx = np.array([[1.0, 0.0], [1.0, 4.0]])
    off = np.zeros((2, 4, 10))
    off[1, :, 0:6] = -5.0  # every pixel of A votes 5 columns to its left: all nearer point 0
    res = s2i_instances(sem, yx, np.array([0, 1]), np.array([1, 1]), "points", offsets=off, min_area=1)
    assert (res.instance[:, 0:6] == 0).sum() == 4 * 6 - 1  # all but point 1's own pixel
    assert res.instance[1, 4] == 1 and res.counters["seed_pixels_restored"] == 1


def test_geodesic_split_follows_the_colour_edge_and_equals_scipy_dijkstra():
    from scipy.sparse.csgraph import dijkstra

    from pointseg.generators.psps import low_level_maps
    from pointseg.geodesic import edge_costs, to_csgraph

    # One class-1 component over a 12 x 16 image: red left of column 11, blue from it. Point 0 sits in
    # the red part (col 1), point 1 in the blue part (col 13). The bisector (Eq. 1) cuts at column 7;
    # the geodesic cut is the colour edge at column 11.
    img = np.zeros((12, 16, 3), np.uint8)
    img[:, :11] = (200, 30, 30)
    img[:, 11:] = (30, 30, 200)
    sem = np.ones((12, 16), np.int64)
    yx = np.array([[6.0, 1.0], [6.0, 13.0]])
    split = GeodesicSplit(img, yx, beta=0.1, downscale=1.0)
    res = s2i_instances(sem, yx, np.array([0, 1]), np.array([1, 1]), "points", min_area=1, split=split)
    # Oracle: scipy Dijkstra on the same edge costs, each pixel to the nearer point.
    lab, boundary = low_level_maps(img, (12, 16), 0.5)
    dist = dijkstra(to_csgraph(edge_costs(lab, boundary, beta=0.1)), directed=True, indices=[6 * 16 + 1, 6 * 16 + 13])
    np.testing.assert_array_equal(res.instance, dist.argmin(0).reshape(12, 16))
    assert (res.instance[:, :11] == 0).all() and (res.instance[:, 11:] == 1).all()
    plain = s2i_instances(sem, yx, np.array([0, 1]), np.array([1, 1]), "points", min_area=1)
    assert (plain.instance[:, 8:11] == 1).all()  # Eq. 1 gives the red columns 8-10 to the blue point


def test_geodesic_split_within_the_component_goes_round_the_background_and_equals_scipy_on_the_component():
    """``split_within: component`` on a U-shaped component (arms at columns 0-2 and 9-11, bottom rows 9-11) of a
    noisy 12 x 12 image: point A tops the left arm, point B sits in the bottom's middle. Across the background
    A is nearer to the top of the right arm; inside the U, B is. Oracle: scipy's Dijkstra on the component's
    induced subgraph."""
    from scipy.sparse.csgraph import dijkstra

    from pointseg.generators.psps import low_level_maps
    from pointseg.geodesic import edge_costs, to_csgraph

    rng = np.random.default_rng(0)
    img = rng.integers(60, 200, (12, 12, 3)).astype(np.uint8)
    sem = np.zeros((12, 12), np.int64)
    sem[:, :3] = sem[:, 9:] = sem[9:] = 1
    yx = np.array([[0.0, 1.0], [11.0, 6.0]])
    args = (sem, yx, np.array([0, 1]), np.array([1, 1]), "points")
    opened = s2i_instances(*args, min_area=1, split=GeodesicSplit(img, yx, beta=0.1, downscale=1.0))
    within = s2i_instances(*args, min_area=1, split=GeodesicSplit(img, yx, beta=0.1, downscale=1.0, within=True))
    assert (opened.instance[0:2, 9:] == 0).all()  # A jumps the gap
    assert (within.instance[0:2, 9:] == 1).all()  # B goes up the arm; A would have to go round
    lab, boundary = low_level_maps(img, (12, 12), 0.5)
    inside = np.flatnonzero(sem.ravel())
    sub = to_csgraph(edge_costs(lab, boundary, beta=0.1))[inside][:, inside]
    at = {p: i for i, p in enumerate(inside)}
    d = dijkstra(sub, directed=True, indices=[at[0 * 12 + 1], at[11 * 12 + 6]])
    want = np.full(144, -1)
    want[inside] = d.argmin(0)
    np.testing.assert_array_equal(within.instance.ravel(), want)
    with pytest.raises(ValueError, match="split_within"):
        P2SegConfig(split_within="image_and_more")


def test_orphan_components_go_to_the_nearest_point_only_when_asked():
    sem = two_components()
    yx = np.array([[1.0, 0.0]])  # a point in A only: B (cols 8-9) has none
    paper = s2i_instances(sem, yx, np.array([0]), np.array([1]), "points", min_area=1)
    assert (paper.instance[:, 8:10] == -1).all()
    filled = s2i_instances(sem, yx, np.array([0]), np.array([1]), "points", min_area=1, orphans="nearest")
    want = np.full((4, 10), -1)
    want[:, 0:6] = 0
    want[:, 8:10] = 0  # B joins the only point; background columns 6-7 stay -1
    np.testing.assert_array_equal(filled.instance, want)
    assert filled.counters["orphan_pixels"] == 8


def test_nearest_point_split_matches_brute_force():
    rng = np.random.default_rng(0)
    pix = rng.uniform(0, 50, (200, 2))
    pts = rng.uniform(0, 50, (7, 2))
    want = [min(range(7), key=lambda k: (p[0] - pts[k, 0]) ** 2 + (p[1] - pts[k, 1]) ** 2) for p in pix]
    np.testing.assert_array_equal(nearest_point_split(pix, pts), want)


def test_offset_targets_eq2_by_hand():
    inst = np.full((3, 4), -1)
    inst[0:2, 0:3] = 0
    inst[2, 3] = 1
    # Instance 1 has two points (P10): each pixel points to the nearer one.
    yx = np.array([[1.0, 2.0], [2.0, 0.0], [0.0, 3.0]])
    off, valid = offset_targets(inst, yx, np.array([0, 1, 1]))
    assert valid.sum() == 7 and not valid[2, 0]
    np.testing.assert_allclose(off[:, 0, 0], [1.0, 2.0])  # e - m = (1, 2) - (0, 0)
    np.testing.assert_allclose(off[:, 1, 2], [0.0, 0.0])  # the point's own pixel
    np.testing.assert_allclose(off[:, 0, 2], [1.0, 0.0])
    np.testing.assert_allclose(off[:, 2, 3], [-2.0, 0.0])  # (0, 3) is nearer than (2, 0)
    np.testing.assert_allclose(off[:, 2, 0], [0.0, 0.0])  # off the instances


def test_class_components_are_per_class_and_8_connected():
    sem = np.array([[1, 0, 2], [0, 1, 2], [1, 1, 0]])
    comp = class_components(sem)
    assert len(np.unique(comp[sem == 1])) == 1  # diagonal neighbours join
    assert comp[0, 2] == comp[1, 2] != comp[0, 0] and (comp[sem == 0] == -1).all()


# ----------------------------------------------------------------------------- bad input


def test_points_of_different_classes_in_one_component():
    sem = np.zeros((6, 12), np.int64)
    sem[:, :] = 1
    yx = np.array([[3.0, 1.0], [3.0, 10.0]])
    pf = s2i_instances(sem, yx, np.array([0, 1]), np.array([1, 2]), "points", min_area=1)
    assert pf.counters["class_conflicts"] == 1 and pf.counters["split_components"] == 1
    assert (pf.instance[:, :6] == 0).all() and (pf.instance[:, 6:] == 1).all()  # split at the bisector
    np.testing.assert_array_equal(pf.instance_class, [1, 2])  # each part keeps its point's class
    sf = s2i_instances(sem, yx, np.array([0, 1]), np.array([1, 2]), "semantic")
    assert (sf.instance == 0).all() and sf.counters["lost_points"] == 1


def test_point_on_one_pixel_component_and_on_background_get_default_boxes():
    sem = np.zeros((40, 40), np.int64)
    sem[5, 5] = 1  # a 1-pixel component
    sem[20:30, 20:30] = 1
    yx = np.array([[5.0, 5.0], [25.0, 25.0], [35.0, 22.0]])  # the last on background
    res = s2i_instances(sem, yx, np.array([0, 1, 2]), np.array([1, 1, 1]), "points", default_box=(16, 16), min_area=4)
    assert res.counters["default_boxes"] == 2
    # Box of point 0: rows/cols 5-8 .. 5+8, clipped at 0: rows 0..12, cols 0..12 (13 x 13), all background or its pixel.
    assert (res.instance == 0).sum() == 13 * 13 and res.instance[0, 0] == 0 and res.instance[12, 12] == 0
    assert (res.instance == 1).sum() == 100  # the large component is untouched
    # Box of point 2: rows 27..39 (clipped), cols 14..29; it leaves instance 1's 3 x 10 pixels in it alone.
    assert res.instance[39, 14] == 2 and res.instance[27, 19] == 2 and res.instance[27, 20] == 1
    assert (res.instance == 2).sum() == 13 * 16 - 3 * 10
    sf = s2i_instances(sem, yx, np.array([0, 1, 2]), np.array([1, 1, 1]), "semantic")
    assert sf.counters["lost_points"] == 1 and (sf.instance == 2).sum() == 0 and (sf.instance == 0).sum() == 1


def test_bad_arguments_are_named():
    sem = two_components()
    with pytest.raises(ValueError, match="group_class"):
        s2i_instances(sem, np.zeros((1, 2)), np.array([0]), np.array([0]))
    with pytest.raises(ValueError, match="priority"):
        s2i_instances(sem, np.zeros((1, 2)), np.array([0]), np.array([1]), "sam")


def _toy_image():
    img = np.full((48, 64, 3), 40, np.uint8)
    img[8:24, 8:28] = (220, 40, 40)
    img[26:44, 36:60] = (40, 200, 40)
    return img


def test_training_free_labels_and_an_image_without_thing_points():
    img = _toy_image()
    pts = Points([[15, 15], [45, 35], [2, 46]], [1, 2, 3], [1, 2, 10])
    gen = build_generator("p2seg", {"use_network": False, "semantic_params": {"downscale": 1.0}}, CATS)
    lab = gen([img], [pts])[0]
    things = [s for s in lab.segments_info if s["isthing"]]
    assert {s["category_id"] for s in things} == {1, 2}
    assert lab.id_map.dtype == np.int32 and lab.id_map.shape == img.shape[:2]
    assert (lab.id_map > 0).all()  # the stuff click takes every non-instance pixel
    stuff_only = gen([img], [Points([[2, 46]], [3], [10])])[0]
    assert stuff_only.diagnostics["no_thing_points"] == 1
    assert [s["category_id"] for s in stuff_only.segments_info] == [10]
    with pytest.raises(ValueError, match="batch image 1: image has no points"):
        gen([img, img], [pts, Points.empty()])


def test_source_grid_by_hand_and_only_without_the_network():
    sem = np.array([[0, 0, 0, 1, 1, 1],
                    [0, 2, 0, 1, 1, 1],
                    [3, 3, 3, 0, 0, 0],
                    [3, 3, 3, 0, 0, 4]])
    # cell centres: rows 1, 3 and columns 1, 4 -> cells [[2, 1], [3, 0]], each spread over its 2 x 3 block
    np.testing.assert_array_equal(on_grid(sem, 2), [[2, 2, 2, 1, 1, 1], [2, 2, 2, 1, 1, 1],
                                                    [3, 3, 3, 0, 0, 0], [3, 3, 3, 0, 0, 0]])
    square = np.arange(25).reshape(5, 5)
    np.testing.assert_array_equal(on_grid(square, 5), square)  # a grid as fine as the map changes nothing
    with pytest.raises(Exception, match="set use_network: false"):
        P2SegConfig.model_validate({"source_grid": 32})
    img = _toy_image()
    pts = Points([[15, 15], [45, 35], [2, 46]], [1, 2, 3], [1, 2, 10])
    params = {"use_network": False, "semantic_params": {"downscale": 1.0}}
    full = build_generator("p2seg", params, CATS)([img], [pts])[0]
    coarse = build_generator("p2seg", {**params, "source_grid": 4}, CATS)([img], [pts])[0]
    assert (coarse.id_map != full.id_map).any()  # a 4 x 4 view of the 48 x 64 map loses its edges


# ----------------------------------------------------------------------------- I2S


def test_grid_labels_majority_by_hand():
    inst = np.full((4, 4), -1)
    inst[0, 0:3] = 3  # cell (0, 0) holds 2 of 4 pixels of instance 3, 2 of background: tie -> smaller label
    inst[0:2, 2:4] = 5  # cell (0, 1): 4 of 4 pixels instance 5
    inst[2:4, 0:2] = 1
    inst[3, 1] = -1  # cell (1, 0): 3 of 4 instance 1
    np.testing.assert_array_equal(grid_labels(inst, 2), [[-1, 5], [1, -1]])


def test_affinity_targets_and_l_i2s_eq5_against_a_double_loop_on_8x8():
    rng = np.random.default_rng(1)
    labels = rng.integers(-1, 3, size=(8, 8)).ravel()
    logits = torch.from_numpy(rng.normal(0, 2, (64, 64)))
    A = affinity_targets(torch.from_numpy(labels))
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    pos = neg = 0
    s_pos = s_neg = 0.0
    for i in range(64):
        for j in range(64):
            a = 1.0 if labels[i] == labels[j] else 0.0
            assert float(A[i, j]) == a
            if a == 1.0:
                pos += 1
                s_pos += 2.0 - sig(a) - sig(float(logits[i, j]))
            else:
                neg += 1
                s_neg += sig(a) + sig(float(logits[i, j]))
    want = s_pos / pos + s_neg / neg
    assert float(i2s_loss(logits, A.double())) == pytest.approx(want, rel=1e-12)
    assert float(i2s_loss(logits.float(), A)) == pytest.approx(want, rel=1e-6)
    # Without background affinity, background pairs are non-affinity pairs.
    A0 = affinity_targets(torch.from_numpy(labels), background_affinity=False)
    bg = labels == -1
    assert float(A0[np.ix_(bg, bg)].sum()) == 0 and float(A0[np.ix_(~bg, ~bg)].sum()) == float(A[np.ix_(~bg, ~bg)].sum())


def test_i2s_semantic_is_the_hadamard_power_times_c():
    rng = np.random.default_rng(2)
    a = rng.normal(0, 1, (5, 5))
    c = rng.dirichlet(np.ones(3), 5).T  # (K=3, N=5)
    for beta in (0.0, 1.0, 3.0):
        w = (1 / (1 + np.exp(-a))) ** beta
        want = c @ (w / w.sum(1, keepdims=True)).T
        got = i2s_semantic(torch.from_numpy(a), torch.from_numpy(c), beta).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-10)
    with pytest.raises(ValueError, match="beta"):
        i2s_semantic(torch.from_numpy(a), torch.from_numpy(c), -1.0)


def test_window_affinity_targets_and_masked_l_i2s_against_a_double_loop():
    """The window pairs (k = 3, dilation 2) on a 5 x 6 map: Â, A and Eq. 5 over the in-image pairs only."""
    rng = np.random.default_rng(4)
    h, w, k, d = 5, 6, 3, 2
    emb = torch.from_numpy(rng.normal(0, 1, (1, 3, h, w)))
    labels = rng.integers(-1, 2, size=(h, w))
    logits = window_affinity(emb, k, d)[0]
    A, valid = window_affinity_targets(torch.from_numpy(labels)[None], k, d)
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    pos = neg = 0
    s_pos = s_neg = 0.0
    for y in range(h):
        for x in range(w):
            for n, (dy, dx) in enumerate((dy, dx) for dy in (-d, 0, d) for dx in (-d, 0, d)):
                yy, xx = y + dy, x + dx
                inside = 0 <= yy < h and 0 <= xx < w
                assert bool(valid[n, y * w + x]) == inside
                if not inside:
                    assert float(A[0, n, y * w + x]) == 0.0
                    continue
                want = float((emb[0, :, y, x] * emb[0, :, yy, xx]).sum()) / math.sqrt(3)
                assert float(logits[n, y * w + x]) == pytest.approx(want, rel=1e-12)
                a = 1.0 if labels[y, x] == labels[yy, xx] else 0.0
                assert float(A[0, n, y * w + x]) == a
                if a:
                    pos, s_pos = pos + 1, s_pos + 2.0 - sig(a) - sig(want)
                else:
                    neg, s_neg = neg + 1, s_neg + sig(a) + sig(want)
    got = float(i2s_loss(logits[None], A.double(), valid))
    assert got == pytest.approx(s_pos / pos + s_neg / neg, rel=1e-12)
    # Without the mask the out-of-image pairs (logit 0, A 0) would count as non-affinity pairs.
    assert float(i2s_loss(logits[None], A.double())) != pytest.approx(got, rel=1e-6)
    with pytest.raises(ValueError, match="odd"):
        window_affinity(emb, 4)


def test_window_i2s_covering_the_image_is_the_all_pairs_i2s():
    """A window that reaches every pixel gives S = Â^{∘β} * C over all pixel pairs (:func:`i2s_semantic`)."""
    rng = np.random.default_rng(5)
    h = w = 4
    emb = torch.from_numpy(rng.normal(0, 1, (1, 3, h, w)))
    c = torch.from_numpy(rng.dirichlet(np.ones(3), h * w).T.reshape(1, 3, h, w).copy())
    k = 2 * h - 1  # offsets -3..3 reach every pixel from every pixel
    for beta in (0.0, 2.0):
        got = i2s_window_semantic(window_affinity(emb, k), c, beta, k)[0].reshape(3, -1)
        want = i2s_semantic(pixel_cell_affinity(emb[0], h), c[0].reshape(3, -1), beta)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10)
    # A small window keeps S_i within the classes of i's neighbours: a one-hot C far away does not reach i.
    one_hot = torch.zeros(1, 2, 1, 8, dtype=torch.float64)
    one_hot[0, 0] = 1.0
    one_hot[0, :, 0, 7] = torch.tensor([0.0, 1.0])
    s = i2s_window_semantic(torch.zeros(1, 9, 8, dtype=torch.float64), one_hot, 1.0, 3, 1)[0, :, 0]
    np.testing.assert_allclose(s[1].numpy(), [0, 0, 0, 0, 0, 0, 1 / 3, 1 / 2])  # equal weights over in-image neighbours


def test_pixel_cell_affinity_by_hand_and_equal_to_the_cell_pairs_on_the_grid():
    # A 2-channel embedding on 4 x 4 pixels, grid 2: cell 0 is the top-left 2 x 2 block.
    e = np.arange(32, dtype=np.float64).reshape(2, 4, 4) / 10
    got = pixel_cell_affinity(torch.from_numpy(e), 2).numpy()
    assert got.shape == (16, 4)
    cells = np.array([[e[d, 2 * (j // 2):2 * (j // 2) + 2, 2 * (j % 2):2 * (j % 2) + 2].mean() for j in range(4)]
                      for d in range(2)])
    for i in range(16):
        for j in range(4):
            want = (e[0].ravel()[i] * cells[0, j] + e[1].ravel()[i] * cells[1, j]) / math.sqrt(2)
            assert got[i, j] == pytest.approx(want, rel=1e-12)
    # On the grid itself the rows are the cells: the network's cell-pair affinity.
    net = P2SegNet(2, pretrained=False, width=8, embed_dim=4, affinity_grid=3)
    emb = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    np.testing.assert_allclose(pixel_cell_affinity(emb[0], 3).numpy(), net.affinity(emb)[0].numpy(), rtol=1e-12)


# ----------------------------------------------------------------------------- S2I losses


def test_offset_loss_eq3_by_hand():
    pred = torch.zeros(1, 2, 1, 3)
    target = torch.tensor([[[[0.5, 3.0, 9.0]], [[0.0, -2.0, 9.0]]]])
    weight = torch.tensor([[[1.0, 0.5, 0.0]]])
    # smooth-L1 per pixel (sum over dy, dx): 0.125 + 0 ; 2.5 + 1.5 ; pixel 3 not in P (W = 0)
    assert float(offset_loss(pred, target, weight)) == pytest.approx((0.125 + 0.5 * 4.0) / 2)
    assert float(offset_loss(pred, target, torch.zeros(1, 1, 3))) == 0.0


def test_seg_loss_keeps_the_hardest_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 5)
    target = torch.randint(0, 4, (2, 5, 5))
    target[0, 0, 0] = -1
    ce = F.cross_entropy(logits, target, ignore_index=-1, reduction="none")[target != -1]
    assert float(seg_loss(logits, target, 1.0)) == pytest.approx(float(ce.mean()))
    k = round(0.2 * ce.numel())
    assert float(seg_loss(logits, target, 0.2)) == pytest.approx(float(ce.sort(descending=True).values[:k].mean()))


# ----------------------------------------------------------------------------- config


def test_config_keys_and_rounds():
    with pytest.raises(Exception, match="betta"):
        P2SegConfig.model_validate({"betta": 1})
    with pytest.raises(Exception, match="semantic_params"):
        P2SegConfig.model_validate({"semantic_params": {"downscal": 0.5}})
    with pytest.raises(Exception, match="training-free"):
        P2SegConfig.model_validate({"semantic_source": "point2mask", "semantic_params": {"maps": "learned"}})
    # 100 steps, 2 rounds: [0, 33] round 0, [34, 66] round 1, [67, 99] round 2.
    assert [round_of(s, 100, 2) for s in (0, 33, 34, 66, 67, 99)] == [0, 0, 1, 1, 2, 2]
    assert round_of(50, 100, 0) == 0


def test_point_loss_reads_the_class_map_at_the_clicks():
    from pointseg.generators.p2seg.losses import point_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 2, 2)  # a stride-8 map of 16 x 16 inputs
    # (3.5, 3.5) is the centre of cell (0, 0); (11.5, 3.5) of cell (1, 0): bilinear reads those cells exactly.
    yx = [torch.tensor([[3.5, 3.5], [11.5, 3.5]]), torch.zeros(0, 2)]
    lab = [torch.tensor([2, 0]), torch.zeros(0, dtype=torch.long)]
    want = F.cross_entropy(torch.stack([logits[0, :, 0, 0], logits[0, :, 1, 0]]), torch.tensor([2, 0]))
    assert float(point_loss(logits, yx, lab, (16, 16))) == pytest.approx(float(want), rel=1e-6)
    assert float(point_loss(logits, [torch.zeros(0, 2)] * 2, [torch.zeros(0, dtype=torch.long)] * 2, (16, 16))) == 0


def test_foreground_components_let_the_points_decide_the_classes():
    sem = np.zeros((4, 10), np.int64)
    sem[:, 0:4] = 1
    sem[:, 4:8] = 2  # two touching regions of different classes
    yx = np.array([[1.0, 1.0], [1.0, 5.0]])
    by_class = s2i_instances(sem, yx, np.array([0, 1]), np.array([1, 1]), "points", min_area=1)
    assert by_class.counters["class_conflicts"] == 1 and (by_class.instance[:, 4:8] == 1).all()
    fg = s2i_instances(sem, yx, np.array([0, 1]), np.array([1, 1]), "points", min_area=1, components="foreground")
    # One foreground component split by Eq. 1 at the bisector (column 3 is a tie: the lower index).
    assert fg.counters["components"] == 1 and (fg.instance[:, 0:4] == 0).all() and (fg.instance[:, 4:8] == 1).all()


def test_summarize_counts_the_fallbacks_over_images():
    from pointseg.generators.p2seg import P2SegGenerator

    d = [{"default_boxes": 2, "class_conflicts": 1, "background_fraction": 0.5, "image_id": 7},
         {"default_boxes": 1, "lost_points": 3, "background_fraction": 0.25, "image_id": 3}, {"other": 1}]
    s = P2SegGenerator.summarize(d)
    assert s["images"] == 2 and s["fallbacks"]["default_boxes"] == 3 and s["fallbacks"]["lost_points"] == 3
    assert s["summary"]["background_fraction"] == {"mean": 0.375, "max": 0.5}
    assert [r["image_id"] for r in s["table"]] == [3, 7]
    assert P2SegGenerator.summarize([{"other": 1}]) is None


def test_semantic_map_from_a_trained_epld_checkpoint(tmp_path):
    """semantic_source: epld takes the stage-1 semantic map from a trained EPLD checkpoint (never trains one)."""
    import json

    from PIL import Image

    from pointseg.generators.epld import EPLDTrainable
    from pointseg.generators.p2seg.config import P2SegConfig
    from pointseg.train.engine import fit_plain

    with pytest.raises(Exception, match="training-free generator or a trained checkpoint"):
        P2SegConfig.model_validate({"semantic_source": "epld"})
    img = _toy_image()
    pts = Points([[15, 15], [45, 35], [2, 46]], [1, 2, 3], [1, 2, 10])
    Image.fromarray(img).save(tmp_path / "0.png")
    rows = [{"image_id": 0, "file_name": str(tmp_path / "0.png"), "height": 48, "width": 64,
             "points": json.dumps(pts.to_list())}]
    tiny = dict(pretrained=False, input_size=64, hidden_dim=16, num_heads=2, ffn_dim=16, layers=2, batch_size=1,
                steps=1, report_every=1, checkpoint_every=1)
    fit_plain(EPLDTrainable(tiny, CATS), rows, str(tmp_path / "epld"))
    params = {"use_network": False, "semantic_source": "epld",
              "semantic_params": {"checkpoint": str(tmp_path / "epld"), "thing_split": "geodesic"}}
    lab = build_generator("p2seg", params, CATS)([img], [pts])[0]
    source = build_generator("epld", params["semantic_params"], CATS)([img], [pts])[0]
    things = [s for s in lab.segments_info if s["isthing"]]
    assert {s["category_id"] for s in things} == {1, 2}  # S2I: one instance per thing click
    # Points First on EPLD's map: every pixel EPLD gives a thing is one of that class's instances
    cls = {s["id"]: s["category_id"] for s in lab.segments_info}
    src_cls = {s["id"]: s["category_id"] for s in source.segments_info}
    pix_cls = np.vectorize(cls.get)(lab.id_map)
    src_pix = np.vectorize(src_cls.get)(source.id_map)
    assert (pix_cls[np.isin(src_pix, [1, 2])] == src_pix[np.isin(src_pix, [1, 2])]).mean() > 0.95


def test_foreground_band_moves_the_network_s_boundary_to_the_colour_edge_both_ways():
    """``foreground_band`` (EPLD's key, for P2Seg's network map): red columns 0-39, blue 40-79 (pixel noise).
    A foreground reaching column 47 loses columns 40-47 to the background; one stopping at column 31 gains
    columns 32-39, each entering pixel taking its most probable thing class (cat where cat outweighs dog, dog
    where dog does), not its neighbour's. A band of 0 is off; without it the boundary stays on the grid's."""
    from pointseg.generators.p2seg.generator import band_semantic
    from pointseg.generators.p2seg.targets import thing_layout

    h, w = 64, 80
    img = red_blue_image(h, w, 40)
    pts = Points([[10.0, 32.0], [70.0, 32.0]], [1, 2], [1, 10])  # a cat on the red, the background on the blue
    layout = thing_layout(pts, CATS, {1: 1, 2: 2})
    col = np.broadcast_to(np.arange(w)[None, :], (h, w))
    prob = torch.zeros(3, h, w)
    prob[0], prob[1], prob[2] = 0.6, 0.3, 0.1
    prob[2, :16, 32:40], prob[1, :16, 32:40] = 0.3, 0.1  # the dog outweighs the cat in the top rows of 32-39

    too_far = np.where(col < 48, 1, 0)
    got, moved = band_semantic(img, too_far, prob, [0, 1, 2], layout, 10, 0.1, 1.0, 0.01)
    np.testing.assert_array_equal(got, np.where(col < 40, 1, 0))
    assert moved == 8 * h

    too_short = np.where(col < 32, 1, 0)
    got, moved = band_semantic(img, too_short, prob, [0, 1, 2], layout, 10, 0.1, 1.0, 0.01)
    expect = np.where(col < 32, 1, np.where(col < 40, 1, 0))
    expect[:16, 32:40] = 2
    np.testing.assert_array_equal(got, expect)
    assert moved == 8 * h
    assert band_semantic(img, too_short, prob, [0, 1, 2], layout, 0, 0.1, 1.0)[1] == 0
    with pytest.raises(ValueError, match="foreground_band"):
        P2SegConfig(foreground_band=2, use_network=False)
    with pytest.raises(ValueError, match="foreground_band"):
        P2SegConfig(foreground_band=-1)
