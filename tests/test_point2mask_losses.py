import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import shortest_path

from pointseg.data.record import VOID
from pointseg.losses import (
    Point2MaskLossConfig,
    boundary_loss,
    boundary_targets,
    grid_mst,
    local_affinity_loss,
    partial_cross_entropy,
    point2mask_loss,
    tree_filter,
    tree_loss,
)

NEIGHBOURS_8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


# ----------------------------------------------------------------- partial CE


def test_partial_cross_entropy_equals_ce_on_gathered_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 7, generator=g, dtype=torch.float64)
    yx = [torch.tensor([[0, 0], [5, 6], [2, 3]]), torch.tensor([[1, 4], [3, 3]])]
    labels = [torch.tensor([1, 3, -1]), torch.tensor([0, 2])]  # -1: ignored
    gathered, targets = [], []
    for b in range(2):
        for (y, x), c in zip(yx[b].tolist(), labels[b].tolist()):
            if c >= 0:
                gathered.append(logits[b, :, y, x])
                targets.append(c)
    expected = F.cross_entropy(torch.stack(gathered), torch.tensor(targets))
    got = partial_cross_entropy(logits, yx, labels)
    torch.testing.assert_close(got, expected)
    # by hand for one point: -log softmax
    one = partial_cross_entropy(logits[:1], [yx[0][:1]], [labels[0][:1]])
    assert math.isclose(float(one), float(-torch.log_softmax(logits[0, :, 0, 0], 0)[1]), rel_tol=1e-12)
    empty = partial_cross_entropy(logits, [torch.zeros(0, 2, dtype=torch.long)] * 2, [torch.zeros(0, dtype=torch.long)] * 2)
    assert float(empty) == 0.0
    with pytest.raises(ValueError, match="point_labels outside"):
        partial_cross_entropy(logits, yx, [torch.tensor([1, 3, 9]), labels[1]])


# ------------------------------------------------------------- local LAB loss


def _lab_loss_brute(probs, lab, tau, theta1, dilation):
    b, _, h, w = probs.shape
    out = []
    for i in range(b):
        num, den = 0.0, 0
        for y, x in itertools.product(range(h), range(w)):
            for dy, dx in NEIGHBOURS_8:
                yy, xx = y + dy * dilation, x + dx * dilation
                if not (0 <= yy < h and 0 <= xx < w):
                    continue
                s = math.exp(-float(np.linalg.norm(lab[i, :, y, x] - lab[i, :, yy, xx])) / theta1)
                if s >= tau:
                    num -= math.log(float((probs[i, :, y, x] * probs[i, :, yy, xx]).sum()))
                    den += 1
        out.append(num / max(den, 1))
    return sum(out) / b


@pytest.mark.parametrize("dilation", [1, 2])
def test_local_affinity_loss_matches_brute_force(dilation):
    g = torch.Generator().manual_seed(1)
    probs = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64).softmax(1)
    lab = torch.rand(2, 3, 5, 6, generator=g, dtype=torch.float64) * 5.0  # similarities span ~0.01..1
    got = local_affinity_loss(probs, lab, tau=0.3, theta1=2.0, dilation=dilation)
    expected = _lab_loss_brute(probs.numpy(), lab.numpy(), 0.3, 2.0, dilation)
    assert math.isclose(float(got), expected, rel_tol=1e-10)


def test_local_affinity_loss_small_inside_regions_large_across():
    h, w = 8, 8
    one_hot = torch.zeros(1, 2, h, w)
    one_hot[:, 0, :, :4] = 1
    one_hot[:, 1, :, 4:] = 1
    probs = one_hot * 0.998 + 0.001
    two_colours = torch.zeros(1, 3, h, w)
    two_colours[:, 0, :, 4:] = 60.0  # L* 0 | 60: across-pairs have S = exp(-30) < tau
    uniform = torch.full((1, 3, h, w), 50.0)
    inside = float(local_affinity_loss(probs, two_colours))
    across = float(local_affinity_loss(probs, uniform))
    assert inside < 0.01  # only same-class pairs are counted: -log(0.998^2 + 0.001^2)
    assert across > 0.5  # uniform colour: the class change is penalised
    flat = float(local_affinity_loss(torch.full((1, 2, h, w), 0.5), two_colours))
    assert math.isclose(flat, -math.log(0.5), rel_tol=1e-6)


# --------------------------------------------------------------- MST and tree


def _prim_mst(guide):
    """O(N^2) Prim on the 4-connected grid, independent of scipy."""
    h, w, _ = guide.shape
    n = h * w
    flat = guide.reshape(n, -1)
    adj = {i: [] for i in range(n)}
    for y in range(h):
        for x in range(w):
            i = y * w + x
            for j in ([i + 1] if x + 1 < w else []) + ([i + w] if y + 1 < h else []):
                d = float(((flat[i] - flat[j]) ** 2).sum())
                adj[i].append((d, j))
                adj[j].append((d, i))
    in_tree = {0}
    edges, total = set(), 0.0
    while len(in_tree) < n:
        d, i, j = min((d, i, j) for i in in_tree for d, j in adj[i] if j not in in_tree)
        in_tree.add(j)
        edges.add(frozenset((i, j)))
        total += d
    return edges, total


def _is_spanning_tree(edges, n):
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra == rb:
            return False
        parent[ra] = rb
    return len(edges) == n - 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grid_mst_equals_prim(seed):
    rng = np.random.default_rng(seed)
    guide = rng.random((5, 6, 3))  # distinct edge lengths: the MST is unique
    tree = grid_mst(guide)
    edges = {frozenset(map(int, e)) for e in tree.edges()}
    expected_edges, expected_total = _prim_mst(guide)
    assert edges == expected_edges
    assert math.isclose(tree.dist.sum(), expected_total, rel_tol=1e-12)
    assert tree.parent[tree.order[0]] == -1 and tree.dist[tree.order[0]] == 0
    # breadth-first: every parent comes before its child
    pos = np.empty(30, np.int64)
    pos[tree.order] = np.arange(30)
    child = tree.order[1:]
    assert (pos[tree.parent[child]] < pos[child]).all()


def test_grid_mst_spans_flat_regions():
    # zero-length edges (flat colour) must still be tree edges; scipy alone drops them
    guide = np.zeros((6, 7, 3))
    guide[:, 4:] = [0.9, 0.1, 0.3]
    tree = grid_mst(guide)
    assert _is_spanning_tree([tuple(e) for e in tree.edges()], 42)
    _, expected_total = _prim_mst(guide)
    assert math.isclose(tree.dist.sum(), expected_total) and math.isclose(expected_total, 0.91)


def _tree_filter_brute(features, guide, theta2):
    """sum_j exp(-D_tree(i,j)/theta2) x_j / sum_j exp(-D_tree(i,j)/theta2), D by scipy on the tree."""
    c, h, w = features.shape
    tree = grid_mst(guide.transpose(1, 2, 0))
    e = tree.edges()
    graph = coo_matrix((tree.dist[e[:, 0]], (e[:, 0], e[:, 1])), shape=(h * w, h * w))
    dist = shortest_path(graph, directed=False)
    s = np.exp(-dist / theta2)
    x = features.reshape(c, -1).T
    return ((s @ x) / s.sum(1, keepdims=True)).T.reshape(c, h, w)


@pytest.mark.parametrize("theta2", [0.02, 0.5])
def test_tree_filter_equals_brute_force(theta2):
    g = torch.Generator().manual_seed(3)
    feats = torch.rand(2, 3, 6, 7, generator=g, dtype=torch.float64)
    guide = torch.rand(2, 3, 6, 7, generator=g, dtype=torch.float64) * 0.4
    got = tree_filter(feats, guide, theta2)
    for b in range(2):
        expected = _tree_filter_brute(feats[b].numpy(), guide[b].numpy(), theta2)
        np.testing.assert_allclose(got[b].numpy(), expected, rtol=1e-9, atol=1e-12)


def test_tree_filter_gradient():
    g = torch.Generator().manual_seed(4)
    feats = torch.rand(1, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    guide = torch.rand(1, 3, 4, 5, generator=g, dtype=torch.float64) * 0.3
    assert torch.autograd.gradcheck(lambda f: tree_filter(f, guide, 0.1), (feats,))


def test_tree_loss_zero_for_region_constant_prediction():
    rgb = torch.zeros(1, 3, 16, 16)
    rgb[:, 0, :, 8:] = 1.0
    probs = torch.zeros(1, 2, 16, 16)
    probs[:, 0, :, :8] = 1
    probs[:, 1, :, 8:] = 1
    assert float(tree_loss(probs, rgb)) < 1e-6
    flipped = probs.clone()
    flipped[:, :, 4:8, 2:6] = flipped[:, :, 4:8, 2:6].flip(1)  # a wrong patch inside the red half
    assert float(tree_loss(flipped, rgb)) > 0.05


# --------------------------------------------------------------- boundary loss


def test_boundary_targets_hand_drawn():
    ids = torch.ones(1, 6, 6, dtype=torch.long)
    ids[0, 2:4, 2:4] = 2
    ids[0, 0, 5] = VOID
    ids[0, 5, 0] = VOID
    expected = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(boundary_targets(ids)[0], expected)


def _boundary_loss_brute(pb, ids, thing, eps):
    b, h, w = ids.shape
    losses = []
    for i in range(b):
        acc = {"thing": [], "stuff": [], "neg": []}
        for y, x in itertools.product(range(h), range(w)):
            for dy, dx in NEIGHBOURS_8:
                yy, xx = y + dy, x + dx
                if not (0 <= yy < h and 0 <= xx < w) or ids[i, y, x] == VOID or ids[i, yy, xx] == VOID:
                    continue
                a = 1 - max(pb[i, y, x], pb[i, yy, xx])
                if ids[i, y, x] == ids[i, yy, xx]:
                    acc["thing" if thing[i, y, x] else "stuff"].append(-math.log(a + eps))
                else:
                    acc["neg"].append(-math.log(1 + eps - a))
        loss = sum(acc["thing"]) / (2 * len(acc["thing"])) + sum(acc["stuff"]) / (2 * len(acc["stuff"]))
        losses.append(loss + sum(acc["neg"]) / len(acc["neg"]))
    return sum(losses) / b


def test_boundary_loss_matches_eq7_brute_force():
    g = torch.Generator().manual_seed(5)
    pb = torch.rand(2, 1, 5, 6, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 4, (2, 5, 6), generator=g)  # 0 = VOID
    ids[:, 0, :3] = 1  # make sure every set is non-empty
    ids[:, 4, :3] = 3
    thing = ids < 3  # ids 1, 2 are things, 3 is stuff
    got = boundary_loss(pb, ids, thing, eps=1e-5)
    expected = _boundary_loss_brute(pb[:, 0].numpy(), ids.numpy(), thing.numpy(), 1e-5)
    assert math.isclose(float(got), expected, rel_tol=1e-10)


def test_boundary_loss_prefers_boundary_on_segment_edges():
    ids = torch.ones(1, 8, 8, dtype=torch.long)
    ids[0, :, 4:] = 2
    target = boundary_targets(ids).float()[:, None]
    good = float(boundary_loss(target * 0.98 + 0.01, ids))
    none = float(boundary_loss(torch.full_like(target, 0.01), ids))
    bad = float(boundary_loss((1 - target) * 0.98 + 0.01, ids))
    # Eq. 7 also penalises same-segment pairs touching a boundary pixel, so even
    # the target map is not free; it still beats no boundary and the inverse.
    assert good < none < bad


# ------------------------------------------------------------------- the total


def _toy_batch(h=64, w=64):
    image = torch.zeros(1, 3, h, w)
    image[:, 0, :, : w // 2] = 0.9  # red left half
    image[:, 2, :, w // 2 :] = 0.8  # blue right half
    ids = torch.ones(1, h, w, dtype=torch.long)
    ids[:, :, w // 2 :] = 2
    return {
        "image": image,
        "point_yx": [torch.tensor([[h // 2, w // 4], [h // 2, 3 * w // 4]])],
        "point_labels": [torch.tensor([0, 1])],
        "pseudo_ids": ids,
        "thing_map": ids == 1,
    }


def test_point2mask_loss_terms_switches_and_gradients():
    torch.manual_seed(0)
    batch = _toy_batch(32, 32)
    logits = torch.randn(1, 3, 32, 32, requires_grad=True)
    braw = torch.randn(1, 1, 32, 32, requires_grad=True)
    outputs = {"sem_logits": logits, "boundary": torch.sigmoid(braw)}
    total, terms = point2mask_loss(outputs, batch)
    assert set(terms) == {"partial", "lab", "rgb", "boundary"}
    cfg = Point2MaskLossConfig()
    expected = terms["partial"] + cfg.alpha_lab * terms["lab"] + cfg.alpha_rgb * terms["rgb"] + terms["boundary"]
    assert math.isclose(float(total.detach()), float(expected), rel_tol=1e-6)
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert torch.isfinite(braw.grad).all() and braw.grad.abs().sum() > 0
    # ablation switches (Tables 3-4) and a coarser loss grid
    _, only = point2mask_loss(outputs, batch, Point2MaskLossConfig(use_lab=False, use_boundary=False, loss_stride=2))
    assert set(only) == {"partial", "rgb"}
    _, no_pseudo = point2mask_loss(outputs, {k: v for k, v in batch.items() if k != "pseudo_ids"})
    assert "boundary" not in no_pseudo
    with pytest.raises(Exception, match="alpha_1"):
        Point2MaskLossConfig(alpha_1=3.0)


def test_present_classes_terms_equal_all_class_terms_on_the_cut_logits():
    """present_classes: each image's terms are the all-class terms on its logits cut to the
    classes among its points (labels renumbered); L_partial is the mean over the batch's points."""
    torch.manual_seed(1)
    h = w = 24
    logits = torch.randn(2, 6, h, w)
    image = torch.rand(2, 3, h, w)
    yx = [torch.tensor([[3, 4], [10, 20], [20, 5]]), torch.tensor([[5, 5]])]
    labels = [torch.tensor([4, 1, 4]), torch.tensor([2])]
    batch = {"image": image, "point_yx": yx, "point_labels": labels}
    outputs = {"sem_logits": logits, "boundary": torch.rand(2, 1, h, w)}
    _, terms = point2mask_loss(outputs, batch, Point2MaskLossConfig(present_classes=True))
    all_cfg = Point2MaskLossConfig(present_classes=False)
    # image 0: classes {1, 4} -> channels [1, 4], labels 4->1, 1->0
    _, t0 = point2mask_loss({"sem_logits": logits[:1, [1, 4]], "boundary": outputs["boundary"][:1]},
                            {"image": image[:1], "point_yx": yx[:1], "point_labels": [torch.tensor([1, 0, 1])]}, all_cfg)
    # image 1: one class -> a 1-way softmax: every semantic term is 0
    _, t1 = point2mask_loss({"sem_logits": logits[1:, [2]], "boundary": outputs["boundary"][1:]},
                            {"image": image[1:], "point_yx": yx[1:], "point_labels": [torch.tensor([0])]}, all_cfg)
    assert float(t1["partial"]) == pytest.approx(0.0, abs=1e-6) and float(t1["lab"]) == pytest.approx(0.0, abs=1e-6)
    assert float(terms["partial"]) == pytest.approx((3 * float(t0["partial"]) + float(t1["partial"])) / 4, rel=1e-6)
    for name in ("lab", "rgb"):
        assert float(terms[name]) == pytest.approx((float(t0[name]) + float(t1[name])) / 2, rel=1e-6)
    # and the present-class CE is smaller than the 6-way CE on the same logits
    _, full = point2mask_loss(outputs, batch, all_cfg)
    assert float(terms["partial"]) < float(full["partial"])
