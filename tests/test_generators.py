"""The generator interface, PSPS and the Voronoi baseline, on toys and on real COCO images."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_data

from pointseg.data.record import Category, Points
from pointseg.generators import GENERATORS, build_generator, seed_groups
from pointseg.metrics import PQEvaluator

CATS = {1: Category(1, "thing", True), 2: Category(2, "other", True), 10: Category(10, "sky", False)}


def two_halves(width=40, split=28):
    """Left: red up to column ``split``; right: blue. Points sit far from the border."""
    img = np.zeros((24, width, 3), np.uint8)
    img[:, :split] = (200, 30, 30)
    img[:, split:] = (30, 30, 200)
    pts = Points([[2, 12], [width - 3, 12]], [5, 6], [1, 2])
    return img, pts, split


def test_seed_groups_merge_stuff_and_keep_instances():
    pts = Points([[0, 0], [1, 1], [2, 2], [3, 3], [4, 4]], [7, 7, 8, 20, 21], [1, 1, 1, 10, 10])
    groups = seed_groups(pts, CATS)
    assert [(g.category_id, g.isthing, list(g.point_index)) for g in groups] == [
        (1, True, [0, 1]),
        (1, True, [2]),
        (10, False, [3, 4]),
    ]
    assert [g.id for g in groups] == [1, 2, 3]
    with pytest.raises(ValueError, match=r"unknown category id\(s\) \[99\]"):
        seed_groups(Points([[0, 0]], [1], [99]), CATS)


def test_assemble_by_hand_unlabeled_is_void_and_a_bad_index_is_an_error():
    from pointseg.generators.base import SeedGroup, assemble

    groups = [SeedGroup(1, 1, True, np.array([0]), 5), SeedGroup(2, 10, False, np.array([1]), 6),
              SeedGroup(3, 2, True, np.array([2]), 7)]
    assignment = np.array([[0, 0, -1, 1],
                           [-1, 0, 1, 1],
                           [-2, -1, 1, 0]])  # group 2 (id 3) is never assigned; -2 counts as unlabeled too
    label = assemble(assignment, groups)
    assert label.id_map.dtype == np.int32
    assert label.id_map.tolist() == [[1, 1, 0, 2], [0, 1, 2, 2], [0, 0, 2, 1]]
    assert label.segments_info == [
        {"id": 1, "category_id": 1, "isthing": 1, "iscrowd": 0, "area": 4, "bbox": [0, 0, 4, 3], "source_segment": 5},
        {"id": 2, "category_id": 10, "isthing": 0, "iscrowd": 0, "area": 4, "bbox": [2, 0, 2, 3], "source_segment": 6},
    ]
    with pytest.raises(ValueError, match="group index 3 but there are 3 groups"):
        assemble(np.array([[0, 3]]), groups)
    assert assemble(np.zeros((2, 2), np.int64), []).id_map.tolist() == [[0, 0], [0, 0]]  # no groups: all VOID


def test_psps_follows_the_colour_edge_where_voronoi_cannot():
    img, pts, split = two_halves()
    psps = build_generator("psps", {"downscale": 1.0, "blur_sigma": 0.0}, CATS).generate(img, pts)
    vor = build_generator("voronoi", {}, CATS).generate(img, pts)
    truth = np.where(np.arange(img.shape[1]) < split, 1, 2)[None].repeat(img.shape[0], 0)
    assert (psps.id_map == truth).mean() == 1.0
    assert (vor.id_map == truth).mean() < 0.9  # the Voronoi border sits half way between the points
    assert {s["category_id"] for s in psps.segments_info} == {1, 2}
    assert sum(s["area"] for s in psps.segments_info) == img.shape[0] * img.shape[1]


def test_every_generator_has_the_same_output_schema():
    img, pts, _ = two_halves()
    for name, cls in GENERATORS.items():
        if cls.trains(cls.Config()):
            continue  # needs a trained stage-1 checkpoint: the method's own tests check its schema
        label = build_generator(name, {}, CATS)([img], [pts])[0]
        assert label.id_map.shape == img.shape[:2] and label.id_map.dtype == np.int32
        assert set(np.unique(label.id_map)) <= {0} | {s["id"] for s in label.segments_info}
        for s in label.segments_info:
            assert {"id", "category_id", "isthing", "iscrowd", "area", "bbox", "source_segment"} <= set(s)


def test_wrong_config_key_is_named():
    with pytest.raises(Exception, match="betta"):
        build_generator("psps", {"betta": 1.0}, CATS)
    with pytest.raises(ValueError, match="unknown generator method 'nope'"):
        build_generator("nope", {}, CATS)


def test_psps_beats_voronoi_on_synthetic_scenes():
    from pointseg.data.points import sample_points
    from pointseg.data.synthetic import SyntheticDataset, synthetic_categories

    cats = synthetic_categories()
    scores = {}
    for name in ("psps", "voronoi"):
        gen, ev = build_generator(name, {}, cats), PQEvaluator(cats)
        for rec in SyntheticDataset(12, 96, 96, seed=3):
            gt = rec.panoptic()
            label = gen.generate(rec.image, sample_points(rec, "p1", seed=0))
            ev.process(*gt, label.id_map, label.segments_info)
        scores[name] = ev.evaluate()["pq"]
    assert scores["psps"] > scores["voronoi"] + 0.02, scores


def test_psps_beats_voronoi_on_coco_mini():
    """Things only, the rest VOID: Voronoi is a strong baseline there; PSPS must use the image."""
    from pointseg.data.coco import instances_to_panoptic, read_coco_instances
    from pointseg.data.points import sample_points

    root = shared_data("coco-mini")
    cats, records = read_coco_instances(str(root / "annotations/instances_train2017.json"), str(root / "train2017"))
    evs = {name: PQEvaluator(cats) for name in ("psps", "voronoi")}
    gens = {name: build_generator(name, {}, cats) for name in evs}
    from pointseg.data.images import read_image

    for rec in records:  # all 80 images: on a handful either method can win by chance
        rec, _ = instances_to_panoptic(rec)
        image = read_image(rec.file_name)
        pts = sample_points(rec, "p1", seed=0)
        if len(pts) == 0:
            continue
        gt = rec.panoptic()
        for name, gen in gens.items():
            label = gen.generate(image, pts)
            evs[name].process(*gt, label.id_map, label.segments_info)
    pq = {name: ev.evaluate()["pq_th"] for name, ev in evs.items()}
    assert pq["psps"] > pq["voronoi"], pq


def test_cells_read_by_covers_every_mask_pixel_after_upsampling():
    """Labels written on the cells ``cells_read_by`` returns reach every pixel of the mask through
    ``upsample_labels``; a nearest downscale of the mask misses some border pixels (7 x 9 -> 4 x 5 by hand)."""
    from pointseg.generators.psps import cells_read_by, upsample_labels

    mask = np.zeros((7, 9), bool)
    mask[1:4, 3:6] = True
    cells = cells_read_by(mask, 4, 5)
    assert upsample_labels(cells.astype(np.int32), 7, 9)[mask].all()
    assert not upsample_labels((upsample_labels(mask.astype(np.int32), 4, 5) > 0).astype(np.int32), 7, 9)[mask].all()
    assert cells.sum() <= mask.sum() and not cells_read_by(np.zeros((7, 9), bool), 4, 5).any()
