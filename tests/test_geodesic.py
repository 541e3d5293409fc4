"""pointseg.geodesic against scipy.sparse.csgraph.dijkstra and hand-computed costs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import sparse
from scipy.sparse.csgraph import dijkstra

from pointseg.geodesic import (
    NEIGHBOURS_8,
    OPPOSITE_8,
    add_entry_costs,
    edge_costs,
    geodesic_distance,
    nearest_source,
    nearest_two_sources,
    restrict_to,
    split_within,
    to_csgraph,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COCO_IMAGES = DATA / "coco-mini" / "train2017"


# ---------------------------------------------------------------------------
# oracles


def loop_graph(cost: np.ndarray) -> sparse.csr_matrix:
    """CSR graph built pixel by pixel (independent of to_csgraph's slicing)."""
    _, h, w = cost.shape
    rows, cols, vals = [], [], []
    for y in range(h):
        for x in range(w):
            for d, (dy, dx) in enumerate(NEIGHBOURS_8):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and np.isfinite(cost[d, y, x]):
                    rows.append(y * w + x)
                    cols.append(yy * w + xx)
                    vals.append(cost[d, y, x])
    n = h * w
    return sparse.csr_matrix(
        (np.array(vals, dtype=float), (np.array(rows, dtype=int), np.array(cols, dtype=int))), shape=(n, n)
    )


def scipy_distances(graph, sources: np.ndarray, shape) -> np.ndarray:
    h, w = shape
    flat = sources[:, 0] * w + sources[:, 1]
    return dijkstra(graph, directed=True, indices=flat).reshape(len(sources), h, w)


def random_cost(rng, h, w, directed: bool, p_zero=0.15, p_inf=0.1, integer=False) -> np.ndarray:
    """Random (8, H, W) costs with zero and blocked edges; symmetric if not directed."""
    cost = rng.integers(0, 3, size=(8, h, w)).astype(float) if integer else rng.random((8, h, w)) * 10
    u = rng.random((8, h, w))
    cost[u < p_zero] = 0.0
    cost[u > 1 - p_inf] = np.inf
    if not directed:
        # the edge q -> p (direction 7 - d from q) copies the edge p -> q
        for d, (dy, dx) in enumerate(NEIGHBOURS_8):
            if d >= 4:
                continue
            for y in range(h):
                for x in range(w):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w:
                        cost[OPPOSITE_8[d], yy, xx] = cost[d, y, x]
    return cost


def random_sources(rng, h, w, n) -> np.ndarray:
    return np.stack([rng.integers(0, h, n), rng.integers(0, w, n)], axis=1)


def assert_same_distances(ours: np.ndarray, ref: np.ndarray):
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(ours[fin], ref[fin], rtol=0, atol=1e-5)


def assert_nearest_matches(dist, label, ref, labels=None):
    """dist is the min over the per-source maps; label names a source achieving it."""
    best = ref.min(axis=0)
    assert_same_distances(dist, best)
    reach = np.isfinite(best)
    assert (label[~reach] == -1).all()
    idx = np.argwhere(reach)
    if labels is None:
        achieved = ref[label[reach], idx[:, 0], idx[:, 1]]
        np.testing.assert_allclose(achieved, best[reach], rtol=0, atol=1e-5)
    else:
        # some source carrying that label achieves the min
        per_label = np.stack([np.where(labels[:, None, None] == lab, ref, np.inf).min(0) for lab in np.unique(labels)])
        pos = np.searchsorted(np.unique(labels), label[reach])
        np.testing.assert_allclose(per_label[pos, idx[:, 0], idx[:, 1]], best[reach], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# layout


def test_neighbour_order_is_documented_row_major():
    assert NEIGHBOURS_8 == ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
    for d, (dy, dx) in enumerate(NEIGHBOURS_8):
        assert NEIGHBOURS_8[OPPOSITE_8[d]] == (-dy, -dx)


def test_to_csgraph_equals_pixel_loop_graph():
    rng = np.random.default_rng(3)
    cost = random_cost(rng, 6, 9, directed=True)
    a, b = to_csgraph(cost), loop_graph(cost)
    assert a.nnz == b.nnz  # zero-cost edges are kept explicitly, inf edges dropped
    assert abs(a - b).max() == 0
    h, w = cost.shape[1:]
    zero_edges = sum(
        cost[d, y, x] == 0
        for d, (dy, dx) in enumerate(NEIGHBOURS_8)
        for y in range(h)
        for x in range(w)
        if 0 <= y + dy < h and 0 <= x + dx < w
    )
    assert zero_edges > 0 and (a.data == 0).sum() == zero_edges


# ---------------------------------------------------------------------------
# edge_costs (Point2Mask Eq. 2) by hand


def test_edge_costs_by_hand_single_channel():
    f = np.array([[0.0, 1.0, 3.0], [4.0, 4.0, 10.0]])
    c = edge_costs(f)
    assert c.shape == (8, 2, 3) and c.dtype == np.float64
    right, down, down_right, up_left = 4, 6, 7, 0
    assert c[right, 0, 0] == 1 and c[right, 0, 1] == 2 and c[right, 1, 1] == 6
    assert c[down, 0, 0] == 4 and c[down, 0, 2] == 7
    assert c[down_right, 0, 0] == 4 and c[down_right, 0, 1] == 9
    assert c[up_left, 1, 1] == 4 and c[up_left, 1, 2] == 9
    # symmetric without boundary: reverse edges cost the same
    assert c[3, 0, 1] == c[right, 0, 0]
    # neighbours outside the image are inf
    assert np.isinf(c[right, :, 2]).all() and np.isinf(c[down, 1, :]).all()
    assert np.isinf(c[up_left, 0, :]).all() and np.isinf(c[up_left, :, 0]).all()
    assert np.isfinite(c[right, :, :2]).all()
    # out-of-image counts: up/down 3 each, left/right 2 each, each diagonal 4
    assert np.isinf(c).sum() == 3 + 3 + 2 + 2 + 4 * 4


def test_edge_costs_boundary_term_and_channels():
    f = np.zeros((2, 2, 2))
    f[:, 0, 1] = (3.0, 4.0)  # L2 distance 5 from its neighbours
    b = np.array([[0.5, 2.0], [0.0, 1.0]])
    c = edge_costs(f, boundary=b, beta=0.1)
    right, down, down_right, down_left = 4, 6, 7, 5
    assert c[right, 0, 0] == pytest.approx(5 + 0.1 * 2.0)  # max(b(k), b(l)) = 2.0
    assert c[3, 0, 1] == pytest.approx(5 + 0.1 * 2.0)
    assert c[down, 0, 0] == pytest.approx(0 + 0.1 * 0.5)
    assert c[down_right, 0, 0] == pytest.approx(0 + 0.1 * 1.0)
    assert c[down_left, 0, 1] == pytest.approx(5 + 0.1 * 2.0)
    # directed: only the boundary of the pixel being entered
    cd = edge_costs(f, boundary=b, beta=0.1, directed_from_source=True)
    assert cd[down, 0, 0] == pytest.approx(0.0)
    assert cd[1, 1, 0] == pytest.approx(0.1 * 0.5)  # up from (1,0) into b=0.5
    assert cd[right, 1, 0] == pytest.approx(0.1 * 1.0)
    assert cd[3, 1, 1] == pytest.approx(0.0)
    # diagonal weight scales only the diagonals
    cw = edge_costs(f, boundary=b, beta=0.1, diagonal_weight=2.0)
    assert cw[down_right, 0, 0] == pytest.approx(2 * 0.1)
    assert cw[right, 0, 0] == c[right, 0, 0]
    assert np.isinf(cw[down_right, 1, :]).all()


def test_edge_costs_equals_explicit_loop_formula():
    rng = np.random.default_rng(5)
    f = rng.random((3, 5, 4))
    b = rng.random((5, 4))
    c = edge_costs(f, boundary=b, beta=0.3)
    for d, (dy, dx) in enumerate(NEIGHBOURS_8):
        for y in range(5):
            for x in range(4):
                yy, xx = y + dy, x + dx
                if 0 <= yy < 5 and 0 <= xx < 4:
                    want = np.linalg.norm(f[:, y, x] - f[:, yy, xx]) + 0.3 * max(b[y, x], b[yy, xx])
                    assert c[d, y, x] == pytest.approx(want, abs=1e-12)
                else:
                    assert np.isinf(c[d, y, x])


# ---------------------------------------------------------------------------
# geodesic_distance / nearest_source == scipy


SHAPES = [(1, 1), (1, 17), (13, 1), (2, 2), (7, 11), (24, 24), (31, 18)]


@pytest.mark.parametrize("directed", [True, False], ids=["directed", "undirected"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distances_equal_scipy_on_random_grids(seed, directed):
    rng = np.random.default_rng(seed)
    for h, w in SHAPES:
        cost = random_cost(rng, h, w, directed)
        sources = random_sources(rng, h, w, 5)
        ref = scipy_distances(loop_graph(cost), sources, (h, w))
        ours = geodesic_distance(cost, sources)
        assert ours.dtype == np.float64
        assert_same_distances(ours, ref)
        dist, label = nearest_source(cost, sources)
        assert dist.shape == (h, w) and label.dtype == np.int64
        assert_nearest_matches(dist, label, ref)


def test_parallel_and_float32_give_the_same_distances():
    rng = np.random.default_rng(7)
    cost = random_cost(rng, 20, 27, directed=True)
    sources = random_sources(rng, 20, 27, 6)
    ref = scipy_distances(loop_graph(cost), sources, (20, 27))
    assert_same_distances(geodesic_distance(cost, sources, parallel=True), ref)
    c32 = cost.astype(np.float32)
    ref32 = scipy_distances(loop_graph(c32.astype(float)), sources, (20, 27))
    assert_same_distances(geodesic_distance(c32, sources), ref32)


def test_directed_costs_hand_example():
    # 1 x 3 row: going right costs 1 per step, going left 5 per step
    cost = np.full((8, 1, 3), np.inf)
    cost[4] = 1.0
    cost[3] = 5.0
    d = geodesic_distance(cost, [[0, 0], [0, 2]])
    np.testing.assert_array_equal(d[0, 0], [0, 1, 2])
    np.testing.assert_array_equal(d[1, 0], [10, 5, 0])
    dist, label = nearest_source(cost, [[0, 0], [0, 2]])
    np.testing.assert_array_equal(dist[0], [0, 1, 0])
    np.testing.assert_array_equal(label[0], [0, 0, 1])


def test_blocked_edges_give_inf_and_label_minus_one():
    h, w = 6, 8
    cost = np.ones((8, h, w))
    # no edge leaves column 3 towards the right, and nothing enters column 4 from the left
    for d, (dy, dx) in enumerate(NEIGHBOURS_8):
        if dx == 1:
            cost[d, :, 3] = np.inf
        if dx == -1:
            cost[d, :, 4] = np.inf
    dist, label = nearest_source(cost, [[2, 1]], labels=[7])
    assert np.isinf(dist[:, 4:]).all() and (label[:, 4:] == -1).all()
    assert np.isfinite(dist[:, :4]).all() and (label[:, :4] == 7).all()
    # 8-connected with unit costs: Chebyshev distance
    yy, xx = np.mgrid[:h, :4]
    np.testing.assert_array_equal(dist[:, :4], np.maximum(abs(yy - 2), abs(xx - 1)))
    assert np.isinf(geodesic_distance(cost, [[0, 0]])[0, :, 4:]).all()


def test_zero_costs_and_ties_go_to_lowest_source_index():
    cost = np.zeros((8, 9, 9))
    dist, label = nearest_source(cost, [[8, 8], [4, 4], [0, 0]])
    assert (dist == 0).all() and (label == 0).all()
    dist, label = nearest_source(cost, [[8, 8], [4, 4], [0, 0]], labels=[5, 3, 3])
    assert (label == 5).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_integer_costs_ties_follow_lowest_index_rule(seed):
    # integer costs make path sums exact, so ties are exact and frequent
    rng = np.random.default_rng(seed)
    h, w = 17, 23
    cost = random_cost(rng, h, w, directed=True, p_zero=0.3, p_inf=0.05, integer=True)
    sources = random_sources(rng, h, w, 12)
    ref = scipy_distances(loop_graph(cost), sources, (h, w))
    dist, label = nearest_source(cost, sources)
    best = ref.min(0)
    assert_same_distances(dist, best)
    want = np.where(np.isfinite(best), np.argmax(ref == best[None], axis=0), -1)
    np.testing.assert_array_equal(label, want)


def test_shared_labels_and_duplicate_sources():
    rng = np.random.default_rng(11)
    h, w = 15, 19
    cost = random_cost(rng, h, w, directed=False)
    sources = random_sources(rng, h, w, 8)
    sources[5] = sources[2]  # duplicate pixel
    labels = np.array([0, 1, 1, 2, 0, 3, 2, 2])
    ref = scipy_distances(loop_graph(cost), sources, (h, w))
    dist, label = nearest_source(cost, sources, labels=labels)
    assert set(np.unique(label)) <= {-1, 0, 1, 2, 3}
    assert_nearest_matches(dist, label, ref, labels=labels)
    assert label[tuple(sources[2])] == 1  # the lower index keeps the duplicated pixel


def test_nearest_source_is_one_run_not_n():
    # sanity of the multi-source search on a larger grid: matches min of per-source runs
    rng = np.random.default_rng(4)
    cost = edge_costs(rng.random((3, 64, 48)))
    sources = random_sources(rng, 64, 48, 30)
    per_source = geodesic_distance(cost, sources)
    dist, label = nearest_source(cost, sources)
    np.testing.assert_allclose(dist, per_source.min(0), atol=1e-9)
    np.testing.assert_allclose(np.take_along_axis(per_source, label[None], 0)[0], dist, atol=1e-9)


def test_no_sources():
    cost = np.ones((8, 3, 4))
    assert geodesic_distance(cost, np.zeros((0, 2), int)).shape == (0, 3, 4)
    dist, label = nearest_source(cost, np.zeros((0, 2), int))
    assert np.isinf(dist).all() and (label == -1).all()


def test_out_of_image_entries_are_ignored():
    rng = np.random.default_rng(2)
    cost = edge_costs(rng.random((5, 6)))
    garbage = cost.copy()
    garbage[np.isinf(cost)] = -1.0  # out-of-image entries, never read
    garbage[0, 0, 0] = np.nan
    np.testing.assert_array_equal(geodesic_distance(garbage, [[1, 1]]), geodesic_distance(cost, [[1, 1]]))


# ---------------------------------------------------------------------------
# real image: LAB colour costs (PSPS / Point2Mask low-level cue)


def test_real_image_lab_costs_equal_scipy():
    if not COCO_IMAGES.is_dir():
        pytest.skip(f"real COCO test data not found at {COCO_IMAGES} (../shared/data is not part of the repo)")
    cv2 = pytest.importorskip("cv2")
    path = sorted(COCO_IMAGES.glob("*.jpg"))[0]
    bgr = cv2.imread(str(path))
    assert bgr is not None, path
    # a quarter of the size keeps the scipy oracle fast; still a real photograph
    bgr = cv2.resize(bgr, (bgr.shape[1] // 4, bgr.shape[0] // 4), interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB).astype(np.float64).transpose(2, 0, 1)
    cost = edge_costs(lab)
    h, w = lab.shape[1:]
    rng = np.random.default_rng(0)
    sources = random_sources(rng, h, w, 20)
    ref = scipy_distances(to_csgraph(cost), sources, (h, w))
    assert_same_distances(geodesic_distance(cost, sources), ref)
    dist, label = nearest_source(cost, sources)
    assert_nearest_matches(dist, label, ref)


# ---------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "bad, match",
    [
        ([[5, 0]], r"sources\[0\] = \(5, 0\) is outside"),
        ([[0, 0], [-1, 2]], r"sources\[1\] = \(-1, 2\) is outside"),
        ([[0, 6]], r"outside the image of shape \(H, W\) = \(5, 6\)"),
        ([[0.5, 1]], "integer"),
        ([1, 2], r"shape \(N, 2\)"),
    ],
)
def test_bad_sources_raise(bad, match):
    cost = np.ones((8, 5, 6))
    with pytest.raises(ValueError, match=match):
        geodesic_distance(cost, bad)
    with pytest.raises(ValueError, match=match):
        nearest_source(cost, bad)


def test_bad_costs_raise():
    cost = np.ones((8, 5, 6))
    nan = cost.copy()
    nan[4, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"NaN at cost\[4, 2, 3\]"):
        geodesic_distance(nan, [[0, 0]])
    neg = cost.copy()
    neg[1, 3, 3] = -0.5
    with pytest.raises(ValueError, match=r"negative value -0.5 at cost\[1, 3, 3\]"):
        nearest_source(neg, [[0, 0]])
    with pytest.raises(ValueError, match=r"cost must have shape \(8, H, W\)"):
        geodesic_distance(np.ones((4, 5, 6)), [[0, 0]])


def test_bad_edge_cost_inputs_raise():
    f = np.zeros((4, 5))
    with pytest.raises(ValueError, match="node_features contains NaN"):
        edge_costs(np.full((4, 5), np.nan))
    with pytest.raises(ValueError, match="node_features must have shape"):
        edge_costs(np.zeros(5))
    with pytest.raises(ValueError, match="boundary must have shape"):
        edge_costs(f, boundary=np.zeros((5, 4)), beta=0.1)
    with pytest.raises(ValueError, match="boundary has negative values"):
        edge_costs(f, boundary=-np.ones((4, 5)), beta=0.1)
    with pytest.raises(ValueError, match="needs a boundary map"):
        edge_costs(f, beta=0.1)
    with pytest.raises(ValueError, match="beta must be"):
        edge_costs(f, boundary=np.zeros((4, 5)), beta=-1)


def test_bad_labels_raise():
    cost = np.ones((8, 3, 3))
    with pytest.raises(ValueError, match=r"labels must have shape \(N,\) = \(2,\)"):
        nearest_source(cost, [[0, 0], [1, 1]], labels=[1])
    with pytest.raises(ValueError, match="labels must be >= 0"):
        nearest_source(cost, [[0, 0], [1, 1]], labels=[0, -1])


# ---------------------------------------------------------------------------
# nearest_two_sources: the two nearest distinct labels


def per_label_distances(graph, sources: np.ndarray, labels: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """``(L, H, W)`` scipy multi-source Dijkstra run once per label, and the labels."""
    h, w = shape
    uniq = np.unique(labels)
    flat = sources[:, 0] * w + sources[:, 1]
    per = [dijkstra(graph, directed=True, indices=flat[labels == u], min_only=True).reshape(h, w) for u in uniq]
    return np.stack(per), uniq


def assert_two_nearest_match(dist, label, per_label, uniq):
    ref = np.sort(per_label, axis=0)
    second = ref[1] if len(uniq) > 1 else np.full(ref.shape[1:], np.inf)
    assert_same_distances(dist[0], ref[0])
    assert_same_distances(dist[1], second)
    reached = label[1] >= 0
    np.testing.assert_array_equal(reached, np.isfinite(second))
    assert (label[0][reached] != label[1][reached]).all()
    # whatever the tie, each label's distance is that label's own distance
    index = {int(u): i for i, u in enumerate(uniq)}
    for slot in (0, 1):
        ok = label[slot] >= 0
        li = np.array([index[int(v)] for v in label[slot][ok]], dtype=np.int64)
        np.testing.assert_allclose(per_label[(li, *np.nonzero(ok))], dist[slot][ok], rtol=0, atol=1e-9)


@pytest.mark.parametrize("directed", [True, False], ids=["directed", "undirected"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_nearest_equal_scipy_per_label(seed, directed):
    rng = np.random.default_rng(100 + seed)
    for h, w in SHAPES:
        for integer in (False, True):  # integer costs: exact, frequent ties
            cost = random_cost(rng, h, w, directed, p_zero=0.25, integer=integer)
            n = int(rng.integers(1, 9))
            sources = random_sources(rng, h, w, n)
            labels = rng.integers(0, 4, n)
            dist, label = nearest_two_sources(cost, sources, labels)
            assert dist.shape == label.shape == (2, h, w) and label.dtype == np.int64
            per_label, uniq = per_label_distances(loop_graph(cost), sources, labels, (h, w))
            assert_two_nearest_match(dist, label, per_label, uniq)
            # the first slot is nearest_source's answer, its tie rule included
            d1, l1 = nearest_source(cost, sources, labels)
            np.testing.assert_array_equal(dist[0], d1)
            np.testing.assert_array_equal(label[0], l1)


def test_two_nearest_hand_example():
    # 1 x 5 row, unit steps: label 3 at column 0, label 8 at columns 3 and 4
    cost = np.full((8, 1, 5), np.inf)
    cost[3] = cost[4] = 1.0
    dist, label = nearest_two_sources(cost, [[0, 0], [0, 3], [0, 4]], labels=[3, 8, 8])
    np.testing.assert_array_equal(dist[0, 0], [0, 1, 1, 0, 0])
    np.testing.assert_array_equal(label[0, 0], [3, 3, 8, 8, 8])
    np.testing.assert_array_equal(dist[1, 0], [3, 2, 2, 3, 4])
    np.testing.assert_array_equal(label[1, 0], [8, 8, 3, 3, 3])


def test_two_nearest_single_label_duplicate_pixel_and_no_sources():
    cost = np.ones((8, 4, 5))
    dist, label = nearest_two_sources(cost, [[1, 1], [2, 3]], labels=[4, 4])
    assert np.isinf(dist[1]).all() and (label[1] == -1).all() and (label[0] == 4).all()
    # two labels on one pixel: the second label is at distance 0 there
    dist, label = nearest_two_sources(cost, [[1, 1], [1, 1]], labels=[2, 6])
    assert dist[1, 1, 1] == 0 and label[0, 1, 1] == 2 and label[1, 1, 1] == 6
    np.testing.assert_array_equal(dist[0], dist[1])
    dist, label = nearest_two_sources(cost, np.zeros((0, 2), int))
    assert np.isinf(dist).all() and (label == -1).all()


def test_add_entry_costs_by_hand():
    """On a 2 x 3 grid every in-image edge pays the node cost of the pixel it enters; out-of-image edges stay inf."""
    cost = edge_costs(np.zeros((2, 3)))  # all in-image edges 0
    node = np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    out = add_entry_costs(cost, node)
    for d, (dy, dx) in enumerate(NEIGHBOURS_8):
        for y in range(2):
            for x in range(3):
                ty, tx = y + dy, x + dx
                expect = node[ty, tx] if 0 <= ty < 2 and 0 <= tx < 3 else np.inf
                assert out[d, y, x] == expect
    assert np.all(cost[np.isfinite(cost)] == 0)  # the input is not changed
    with pytest.raises(ValueError, match="node_cost"):
        add_entry_costs(cost, -node)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_restrict_to_equals_scipy_on_the_masked_subgraph(seed):
    """Distances inside a random mask equal scipy's Dijkstra on the graph with every node outside the mask
    removed (rows and columns zeroed in the pixel-loop graph); outside pixels are unreached, label -1."""
    rng = np.random.default_rng(seed)
    h, w = 9, 11
    cost = random_cost(rng, h, w, directed=True, p_inf=0.0)
    mask = rng.random((h, w)) < 0.7
    srcs = np.argwhere(mask)[rng.choice(int(mask.sum()), 3, replace=False)]
    inside = np.flatnonzero(mask.ravel())
    sub = loop_graph(cost)[inside][:, inside]  # the induced subgraph of the mask's pixels
    at = {p: i for i, p in enumerate(inside)}
    ref = np.full((len(srcs), h * w), np.inf)
    ref[:, inside] = dijkstra(sub, directed=True, indices=[at[y * w + x] for y, x in srcs])
    ref = ref.reshape(len(srcs), h, w)
    ours = restrict_to(cost, mask)
    assert_same_distances(geodesic_distance(ours, srcs), ref)
    dist, label = nearest_source(ours, srcs)
    assert_nearest_matches(dist, label, ref)
    assert (label[~mask] == -1).all()
    assert np.isfinite(cost[:, 1:-1, 1:-1]).all()  # the input is not changed


def test_restrict_to_by_hand_a_wall_splits_a_row():
    """1 x 5 row, every step of length 1, the middle pixel outside the mask: the left source owns pixels 0-1, the
    right one 3-4, pixel 2 nobody; without the mask the left source (lower index) takes the tie at pixel 2."""
    cost = edge_costs(np.arange(5.0)[None])
    mask = np.array([[True, True, False, True, True]])
    _, label = nearest_source(restrict_to(cost, mask), np.array([[0, 0], [0, 4]]))
    assert label.tolist() == [[0, 0, -1, 1, 1]]
    _, label = nearest_source(cost, np.array([[0, 0], [0, 4]]))
    assert label.tolist() == [[0, 0, 0, 1, 1]]
    with pytest.raises(ValueError, match="mask must have shape"):
        restrict_to(cost, np.ones((5, 1), bool))


def test_split_within_by_hand_a_sourceless_part_of_the_mask_takes_the_open_split():
    """1 x 7 row of unit steps, sources at 0 (label 0) and 6 (label 1), mask 0-2 and 4-5: pixels 0-2 are reached
    from inside by source 0; part 4-5 holds no source, so it takes the open split (nearer to 6); pixel 3 stays
    unreached, and source 6's own pixel keeps its label."""
    cost = edge_costs(np.arange(7.0)[None])
    mask = np.array([[True, True, True, False, True, True, False]])
    calls = []

    def split(edges):
        calls.append(edges is cost)  # False: the restricted copy
        return nearest_source(edges, np.array([[0, 0], [0, 6]]))[1]

    assert split_within(split, cost, mask).tolist() == [[0, 0, 0, -1, 1, 1, 1]]
    assert calls == [False, True]  # the restricted run, then the open one for the sourceless part
    calls.clear()
    assert split_within(split, cost, np.array([[True] * 3 + [False] * 4])).tolist() == [[0, 0, 0, -1, -1, -1, 1]]
    assert calls == [False]  # every mask pixel reached from inside: no open run


def test_redraw_boundary_seeds_the_clicks_own_side_and_needs_both_sides():
    """On a flat cost the redraw keeps the mask's boundary (the band splits in its middle); an ``outside`` pixel
    deep inside the mask stays outside (a click seeds its own side); with no seed on one side there is nothing to
    redraw against (None); a mask of the wrong shape is refused."""
    from pointseg.geodesic import redraw_boundary

    cost = np.ones((8, 12, 12))
    mask = np.zeros((12, 12), bool)
    mask[:, :6] = True
    np.testing.assert_array_equal(redraw_boundary(cost, mask, 2, step=0.0), mask)
    full = np.ones((12, 12), bool)
    assert redraw_boundary(cost, full, 2) is None
    got = redraw_boundary(cost, full, 2, outside=np.array([[6, 6]]))
    assert not got[6, 6] and got.sum() == 143
    with pytest.raises(ValueError, match="shape"):
        redraw_boundary(cost, full[:5], 2)
