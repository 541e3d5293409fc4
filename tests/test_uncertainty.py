"""pointseg.uncertainty by hand and against independent oracles; PSPS and Voronoi uncertainty maps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.sparse.csgraph import dijkstra
from scipy.stats import entropy

from pointseg.data.record import Category, Points
from pointseg.generators import build_generator, seed_groups
from pointseg.generators.point2mask.costs import group_costs
from pointseg.generators.psps import low_level_maps
from pointseg.geodesic import edge_costs, to_csgraph
from pointseg.uncertainty import (
    assigned_cost_ratio,
    cost_gap,
    distance_ratio,
    image_summary,
    margin_uncertainty,
    runner_up_segments,
    segment_summary,
    suggest_clicks,
    transport_entropy,
)

CATS = {1: Category(1, "thing", True), 2: Category(2, "other", True), 10: Category(10, "sky", False)}


def test_distance_ratio_by_hand():
    inf = np.inf
    d1 = np.array([[0.0, 1.0, 2.0, 3.0, 0.0, inf]])
    d2 = np.array([[1.0, 4.0, 2.0, inf, 0.0, inf]])
    # clicked pixel, a quarter, a tie, one label only, two labels on one pixel, unreached
    np.testing.assert_allclose(distance_ratio(d1, d2), [[0.0, 0.25, 1.0, 0.0, 1.0, 1.0]])
    # scale-free
    np.testing.assert_allclose(distance_ratio(7 * d1, 7 * d2), distance_ratio(d1, d2))
    with pytest.raises(ValueError, match="nearest <= second"):
        distance_ratio(np.array([2.0]), np.array([1.0]))
    with pytest.raises(ValueError, match="NaN"):
        distance_ratio(np.array([np.nan]), np.array([1.0]))


def test_cost_gap_is_the_ratio_of_the_two_smallest_costs():
    costs = np.array([[[4.0, 1.0]], [[2.0, 5.0]], [[8.0, 2.0]]])  # (N=3, 1, 2)
    np.testing.assert_allclose(cost_gap(costs), [[2 / 4, 1 / 2]])
    np.testing.assert_allclose(cost_gap(np.moveaxis(costs, 0, -1), axis=-1), [[0.5, 0.5]])
    assert (cost_gap(costs[:1]) == 0).all()


def test_assigned_cost_ratio_by_hand():
    costs = np.array([[[4.0, 1.0, 3.0, 0.0]], [[2.0, 5.0, 3.0, 0.0]], [[8.0, 2.0, 6.0, 1.0]]])  # (G=3, 1, 4)
    # cheapest given: C_(1)/C_(2); pixel 0 given the dearer group 0 (4 vs rival 2): 1; a tie; clicked pixel
    u = assigned_cost_ratio(costs, np.array([[0, 0, 1, 0]]))
    np.testing.assert_allclose(u, [[1.0, 1 / 2, 1.0, 1.0]])
    u = assigned_cost_ratio(costs, np.array([[1, 0, 0, 0]]))
    np.testing.assert_allclose(u, [[2 / 4, 1 / 2, 1.0, 1.0]])  # pixel 3: own 0, rival 0 -> tie
    u = assigned_cost_ratio(costs, np.array([[1, 0, 2, -1]]))
    np.testing.assert_allclose(u, [[0.5, 0.5, 1.0, 1.0]])  # 6/3 > 1 -> 1; unlabelled -> 1
    # where the assignment is the argmin it is cost_gap
    np.testing.assert_allclose(assigned_cost_ratio(costs[:, :, :3], costs[:, :, :3].argmin(0)),
                               cost_gap(costs[:, :, :3]))
    assert (assigned_cost_ratio(costs[:1], np.zeros((1, 4), int)) == 0).all()
    with pytest.raises(ValueError, match="must be"):
        assigned_cost_ratio(costs, np.zeros((2, 4), int))


def test_point2mask_uncertainty_is_the_cost_ratio_of_its_assignment():
    img, pts = scene()
    cfg = {"downscale": 1.0, "assignment": "mincost"}
    gen = build_generator("point2mask", cfg, CATS)
    label = gen.generate(img, pts)
    assert label.uncertainty is not None and label.uncertainty.shape == img.shape[:2]
    rc = pts.pixels(*img.shape[:2])
    assert (label.uncertainty[rc[:, 0], rc[:, 1]] == 0).all()
    # MinCost: every pixel takes its cheapest group, so u = C_(1) / C_(2) of the group costs (Eq. 3),
    # recomputed here from the maps and a scipy-free cost_gap
    maps = gen.maps(img, img.shape[:2])
    costs = group_costs(maps, rc, seed_groups(pts, CATS), 0.1, True, True, "class")
    np.testing.assert_allclose(label.uncertainty, cost_gap(costs), atol=1e-6)
    ot = build_generator("point2mask", {"downscale": 1.0}, CATS).generate(img, pts)
    assert ot.uncertainty is not None and ot.diagnostics["uncertainty_mean"] == pytest.approx(
        float(ot.uncertainty.mean()), rel=1e-5)
    off = build_generator("point2mask", {"uncertainty": False}, CATS).generate(img, pts)
    assert off.uncertainty is None


def test_transport_entropy_equals_scipy_entropy_in_base_n():
    rng = np.random.default_rng(0)
    plan = rng.random((5, 7, 3)) * (rng.random((5, 7, 3)) > 0.3)
    plan[:, 0, 0] = 0  # a pixel with no mass
    u = transport_entropy(plan)
    ref = np.zeros((7, 3))
    for y in range(7):
        for x in range(3):
            col = plan[:, y, x]
            ref[y, x] = entropy(col, base=5) if col.sum() > 0 else 1.0
    np.testing.assert_allclose(u, ref, atol=1e-6)
    assert transport_entropy(np.full((4, 2, 2), 0.25))[0, 0] == pytest.approx(1.0)
    one_hot = np.zeros((4, 1, 1))
    one_hot[2] = 3.0
    assert transport_entropy(one_hot)[0, 0] == 0.0
    assert (transport_entropy(plan[:1]) == 0).all()
    with pytest.raises(ValueError, match=">= 0"):
        transport_entropy(-plan)


def test_margin_uncertainty_by_hand():
    probs = np.array([[0.7, 0.5, 0.9], [0.2, 0.5, 0.05], [0.1, 0.0, 0.05]])[:, None, :]  # (K=3, 1, 3)
    np.testing.assert_allclose(margin_uncertainty(probs)[0], [1 - 0.5, 1.0, 1 - 0.85], atol=1e-6)
    np.testing.assert_allclose(margin_uncertainty(probs[:1])[0], [0.3, 0.5, 0.1], atol=1e-6)  # K = 1: 1 - P
    np.testing.assert_allclose(margin_uncertainty(np.moveaxis(probs, 0, -1), axis=-1), margin_uncertainty(probs))


def test_summaries_against_a_pixel_loop():
    rng = np.random.default_rng(1)
    u = rng.random((9, 11)).astype(np.float32)
    ids = rng.integers(0, 4, (9, 11))
    got = segment_summary(u, ids, threshold=0.6)
    assert set(got) == {1, 2, 3}  # VOID left out
    for s in (1, 2, 3):
        vals = [u[y, x] for y in range(9) for x in range(11) if ids[y, x] == s]
        assert got[s]["area"] == len(vals)
        assert got[s]["uncertainty_mean"] == pytest.approx(np.mean(vals), rel=1e-6)
        assert got[s]["uncertain_fraction"] == pytest.approx(np.mean(np.array(vals) > 0.6))
    img = image_summary(u, threshold=0.6)
    assert img["uncertainty_mean"] == pytest.approx(float(u.mean()), rel=1e-6)
    assert img["uncertain_fraction"] == pytest.approx(float((u > 0.6).mean()))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_summary(u + 1)


def test_suggestions_prefer_a_broad_uncertain_region_and_are_kept_apart():
    u = np.zeros((100, 100), np.float32)
    u[:, 10] = 1.0  # a thin line: the highest pixels, but a click there changes little
    u[60:90, 55:85] = 0.7  # a broad uncertain region
    picks = suggest_clicks(u, k=3, radius=0.05, separation=0)  # r = 5 px: window 11 x 11, suppression 10 px
    first = picks[0]
    assert 60 <= first["row"] < 90 and 55 <= first["col"] < 85
    assert first["score"] == pytest.approx(0.7) and first["uncertainty"] == pytest.approx(0.7)
    for a in range(len(picks)):
        for b in range(a):
            assert np.hypot(picks[a]["row"] - picks[b]["row"], picks[a]["col"] - picks[b]["col"]) > 10
    assert [p["score"] for p in picks] == sorted((p["score"] for p in picks), reverse=True)
    apart = suggest_clicks(u, k=3, radius=0.05, separation=0.3)
    for a in range(len(apart)):
        for b in range(a):
            assert np.hypot(apart[a]["row"] - apart[b]["row"], apart[a]["col"] - apart[b]["col"]) > 30
    assert apart[0] == first
    assert suggest_clicks(np.zeros((20, 20)), k=3) == []
    assert len(suggest_clicks(u, k=1)) == 1 and suggest_clicks(u, k=0) == []


def test_runner_up_is_the_nearest_other_segment():
    ids = np.zeros((5, 9), int)
    ids[:, :3] = 1
    ids[:, 3:6] = 2
    ids[:, 7:] = 3  # column 6 is VOID
    assert runner_up_segments(ids, [2, 2, 0], [3, 5, 8]) == [1, 3, 2]
    assert runner_up_segments(np.ones((3, 3), int), [1], [1]) == [1]  # no other segment


def scene():
    rng = np.random.default_rng(3)
    img = np.zeros((20, 30, 3), np.uint8)
    img[:, :12] = (200, 40, 40)
    img[:, 12:] = (40, 40, 200)
    img[8:14, 20:26] = (40, 200, 40)
    img = np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    pts = Points([[3, 4], [5, 15], [17, 5], [22, 10]], [7, 7, 8, 20], [1, 1, 2, 10])
    return img, pts


def test_psps_uncertainty_is_the_ratio_of_per_group_geodesic_distances():
    img, pts = scene()
    cfg = {"downscale": 1.0, "blur_sigma": 0.5, "beta": 0.1}
    label = build_generator("psps", cfg, CATS).generate(img, pts)
    assert label.uncertainty is not None and label.uncertainty.shape == img.shape[:2]
    # oracle: scipy Dijkstra from each seed group's points on the same PSPS edge costs
    lab, boundary = low_level_maps(img, img.shape[:2], cfg["blur_sigma"])
    graph = to_csgraph(edge_costs(lab, boundary, beta=cfg["beta"]))
    rc = pts.pixels(*img.shape[:2])
    per_group = np.stack([
        dijkstra(graph, directed=True, indices=rc[g.point_index, 0] * img.shape[1] + rc[g.point_index, 1],
                 min_only=True).reshape(img.shape[:2])
        for g in seed_groups(pts, CATS)])
    two = np.sort(per_group, axis=0)
    np.testing.assert_allclose(label.uncertainty, two[0] / two[1], atol=1e-5)
    assert (label.uncertainty[rc[:, 0], rc[:, 1]] == 0).all()


def test_psps_uncertainty_at_half_size_is_upsampled_into_range():
    img, pts = scene()
    label = build_generator("psps", {"downscale": 0.5}, CATS).generate(img, pts)
    assert label.uncertainty.shape == img.shape[:2]
    assert 0 <= label.uncertainty.min() and label.uncertainty.max() <= 1


def test_voronoi_uncertainty_is_the_ratio_of_euclidean_group_distances():
    img, pts = scene()
    label = build_generator("voronoi", {}, CATS).generate(img, pts)
    h, w = img.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    rc = pts.pixels(h, w)
    per_group = np.stack([np.min([np.hypot(yy - rc[i, 0], xx - rc[i, 1]) for i in g.point_index], axis=0)
                          for g in seed_groups(pts, CATS)])
    two = np.sort(per_group, axis=0)
    np.testing.assert_allclose(label.uncertainty, two[0] / two[1], atol=1e-6)
    one = build_generator("voronoi", {}, CATS).generate(img, Points([[3, 4]], [7], [1]))
    assert (one.uncertainty == 0).all()
    # exact EDT check of the distance transform the generator relies on
    assert ndimage.distance_transform_edt(np.array([[0, 1, 1]]))[0, 2] == 2


def test_generator_diagnostics_carry_the_uncertainty_summaries():
    img, pts = scene()
    label = build_generator("psps", {}, CATS).generate(img, pts)
    d = label.diagnostics
    assert d["uncertainty_mean"] == pytest.approx(float(label.uncertainty.mean()), rel=1e-6)
    segs = segment_summary(label.uncertainty, label.id_map)
    assert set(d["segment_uncertainty"]) == {str(s["id"]) for s in label.segments_info} == {str(k) for k in segs}
    for k, (mean, frac) in d["segment_uncertainty"].items():
        assert mean == pytest.approx(segs[int(k)]["uncertainty_mean"]) and frac == segs[int(k)]["uncertain_fraction"]
