"""Extreme-point baselines (box, extreme_polygon, grabcut) and the per-object parsing shared with EXITS."""

from __future__ import annotations

import numpy as np
import pytest

from pointseg.data.record import Category, Points
from pointseg.generators import GENERATORS, build_generator
from pointseg.generators.extreme_baselines import extreme_objects

CATS = {1: Category(1, "a", True), 2: Category(2, "b", True), 9: Category(9, "sky", False)}


def _points(objs):
    """objs: list of (segment, category, [(x, y) x k])."""
    xy, seg, cat = [], [], []
    for s, c, pts in objs:
        xy += pts
        seg += [s] * len(pts)
        cat += [c] * len(pts)
    return Points(xy, seg, cat)


DIAMOND = [(10, 2), (4, 8), (10, 14), (16, 8)]  # top, left, bottom, right


def test_box_and_polygon_hand_computed():
    img = np.zeros((20, 30, 3), np.uint8)
    pts = _points([(5, 1, DIAMOND)])
    box = build_generator("box", {}, CATS)([img], [pts])[0]
    expected = np.zeros((20, 30), bool)
    expected[2:15, 4:17] = True
    np.testing.assert_array_equal(box.id_map > 0, expected)
    assert box.segments_info[0]["source_segment"] == 5 and box.segments_info[0]["area"] == 13 * 13
    poly = build_generator("extreme_polygon", {}, CATS)([img], [pts])[0]
    yy, xx = np.mgrid[:20, :30]
    diamond = np.abs(xx - 10) + np.abs(yy - 8) <= 6  # the filled |dx| + |dy| <= 6 square, edges included
    np.testing.assert_array_equal(poly.id_map > 0, diamond)


def test_smaller_object_wins_an_overlap():
    img = np.zeros((30, 30, 3), np.uint8)
    big = [(15, 0), (0, 15), (15, 29), (29, 15)]
    small = [(15, 10), (10, 15), (15, 20), (20, 15)]
    lab = build_generator("box", {}, CATS)([img], [_points([(1, 1, big), (2, 2, small)])])[0]
    ids = {s["source_segment"]: s["id"] for s in lab.segments_info}
    assert (lab.id_map[10:21, 10:21] == ids[2]).all() and lab.id_map[0, 0] == ids[1]


def test_grabcut_finds_a_coloured_disc_in_its_box():
    rng = np.random.default_rng(0)
    img = (rng.random((80, 100, 3)) * 60 + 100).astype(np.uint8)  # grey noise
    yy, xx = np.mgrid[:80, :100]
    disc = (yy - 40) ** 2 + (xx - 50) ** 2 <= 20**2
    img[disc] = (220, 30, 30)
    r, c = np.nonzero(disc)
    pts = _points([(1, 1, [(50, r.min()), (c.min(), 40), (50, r.max()), (c.max(), 40)])])
    gc = build_generator("grabcut", {}, CATS)([img], [pts])[0]
    box = build_generator("box", {}, CATS)([img], [pts])[0]

    def iou(a, b):
        return (a & b).sum() / (a | b).sum()

    assert iou(gc.id_map > 0, disc) > 0.95
    assert iou(box.id_map > 0, disc) < 0.8  # pi/4 of the box: GrabCut did real work
    assert gc.diagnostics["grabcut_failed"] == 0 and gc.diagnostics["grabcut_empty"] == 0
    seeded = build_generator("grabcut", {"seed_extreme_points": True}, CATS)([img], [pts])[0]
    assert iou(seeded.id_map > 0, disc) > 0.95


@pytest.mark.parametrize("method", ["box", "extreme_polygon", "grabcut"])
def test_bad_objects_are_counted_and_the_rest_labelled(method):
    img = np.full((40, 40, 3), 128, np.uint8)
    img[5:25, 5:25] = (250, 0, 0)
    good = [(15, 5), (5, 15), (15, 24), (24, 15)]
    pts = _points([
        (1, 1, good),
        (2, 1, [(30, 30)] * 4),                                # one pixel
        (3, 1, [(30, 2), (32, 2), (38, 2), (35, 2)]),          # one line
        (4, 2, [(36, 36), (37, 37), (45, 38), (36, 39)]),      # a point outside the image (x = 45)
        (6, 1, [(2, 36), (3, 37), (4, 38), (3, 38)]),          # 3 x 3 px: small
        (7, 2, [(20, 35), (np.nan, 36)]),                      # incomplete, non-finite
        (8, 9, [(1, 1)]),                                      # stuff: not an extreme-point object
    ])
    lab = build_generator(method, {}, CATS)([img], [pts])[0]
    d = lab.diagnostics
    assert d["objects"] == 6 and d["labelled"] == 2  # 1 and the clipped 4
    assert (d["degenerate"], d["small"], d["points_clipped"], d["points_invalid"], d["incomplete"]) == (3, 1, 1, 1, 1)
    ids = {s["source_segment"]: s["id"] for s in lab.segments_info}
    assert set(ids) == {1, 2, 3, 4, 6, 7, 8}  # 8: the stuff click takes the rest
    assert (lab.id_map == ids[2]).sum() == 1 and (lab.id_map == ids[3]).sum() == 9
    if method != "grabcut":
        assert lab.id_map[38, 39] == ids[4]  # the right point, clipped to the image edge, is the object's
    summary = GENERATORS[method].summarize([d])
    assert summary["summary"]["degenerate"] == 3 and {r["problem"] for r in summary["table"]} >= {"small"}


def test_extreme_objects_roles_from_any_point_order():
    pts = _points([(1, 1, [DIAMOND[2], DIAMOND[0], DIAMOND[3], DIAMOND[1]])])
    _, objs = extreme_objects(pts, CATS, 20, 30)
    np.testing.assert_array_equal(objs[0].extremes, DIAMOND)
    assert objs[0].box == (4, 2, 16, 14) and objs[0].status == "ok"


def test_registered():
    for name in ("box", "extreme_polygon", "grabcut", "exits"):
        assert GENERATORS[name].name == name
    with pytest.raises(ValueError, match="iterations"):
        build_generator("grabcut", {"iterations": 0}, CATS)


def test_stuff_click_takes_the_unclaimed_pixels():
    img = np.zeros((20, 30, 3), np.uint8)
    pts = _points([(5, 1, DIAMOND), (8, 9, [(25, 18)])])
    lab = build_generator("box", {}, CATS)([img], [pts])[0]
    ids = {s["source_segment"]: s["id"] for s in lab.segments_info}
    assert (lab.id_map == ids[5]).sum() == 13 * 13 and (lab.id_map == ids[8]).sum() == 20 * 30 - 13 * 13
