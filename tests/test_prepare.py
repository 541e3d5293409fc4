"""prepare_inputs: the VOC-panoptic protocol (dataset.background: stuff) on a hand-computed dataset,
and the index/ground-truth rules that do not need the bad-input corpus."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from pointseg.config import DatasetConfig, PointsConfig
from pointseg.data.coco import (
    CocoReadWarning,
    add_background_segment,
    background_category,
)
from pointseg.data.coco_panoptic_io import read_id_map, read_panoptic_annotations
from pointseg.data.images import encode_png
from pointseg.data.prepare import load_categories, prepare_inputs, read_index
from pointseg.data.record import Category, ImageRecord, Segment

H, W = 6, 8


def _poly(r0, r1, c0, c1):
    """Polygon covering rows r0..r1-1, columns c0..c1-1 (COCO: pixel (r, c) is [c, c+1) x [r, r+1))."""
    return [[c0, r0, c1, r0, c1, r1, c0, r1]]


def _write_tiny(root) -> tuple[dict, np.ndarray]:
    """One 6x8 image: instance A (cat 1, rows 1-2, cols 1-3), instance B (cat 2, rows 3-5, cols 5-7),
    a crowd region (cat 1, rows 0-1, cols 6-7), an annotation of unknown category 9 (rows 4-5, cols 0-1).

    Returns the dataset section and the hand-made expected panoptic map of the ``stuff`` protocol:
    segment ids 1 = A, 2 = B, 3 = crowd (annotation order of the kept annotations), 4 = background.
    """
    (root / "img").mkdir(parents=True)
    (root / "img" / "x.png").write_bytes(encode_png(np.zeros((H, W, 3), np.uint8)))
    anns = [
        {"id": 10, "image_id": 5, "category_id": 1, "iscrowd": 0, "segmentation": _poly(1, 3, 1, 4)},
        {"id": 11, "image_id": 5, "category_id": 2, "iscrowd": 0, "segmentation": _poly(3, 6, 5, 8)},
        {"id": 12, "image_id": 5, "category_id": 1, "iscrowd": 1, "segmentation": _poly(0, 2, 6, 8)},
        {"id": 13, "image_id": 5, "category_id": 9, "iscrowd": 0, "segmentation": _poly(4, 6, 0, 2)},
    ]
    data = {"images": [{"id": 5, "file_name": "x.png", "height": H, "width": W}], "annotations": anns,
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    (root / "ann.json").write_text(json.dumps(data))
    expected = np.array(
        [
            [4, 4, 4, 4, 4, 4, 3, 3],
            [4, 1, 1, 1, 4, 4, 3, 3],
            [4, 1, 1, 1, 4, 4, 4, 4],
            [4, 4, 4, 4, 4, 2, 2, 2],
            [0, 0, 4, 4, 4, 2, 2, 2],  # the unknown-category annotation stays VOID, never background
            [0, 0, 4, 4, 4, 2, 2, 2],
        ],
        np.int32,
    )
    return {"kind": "coco_instances", "annotations": str(root / "ann.json"), "images": str(root / "img")}, expected


def _prepare(dataset: dict, out, **points):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CocoReadWarning)
        return prepare_inputs(DatasetConfig(**dataset), PointsConfig(**points), str(out))


def test_stuff_background_is_every_non_instance_non_crowd_pixel(tmp_path):
    dataset, expected = _write_tiny(tmp_path / "data")
    cats, report = _prepare({**dataset, "background": "stuff"}, tmp_path / "run")
    assert cats[0] == Category(0, "background", False, (80, 80, 80))
    assert load_categories(str(tmp_path / "run" / "categories.json")) == cats
    gt_cats, _, anns = read_panoptic_annotations(str(tmp_path / "run" / "gt" / "panoptic.json"))
    assert gt_cats == cats
    id_map = read_id_map(str(tmp_path / "run" / "gt" / "panoptic"), anns[5]["file_name"])
    np.testing.assert_array_equal(id_map, expected)
    info = {s["id"]: (s["category_id"], s["iscrowd"], s["area"]) for s in anns[5]["segments_info"]}
    assert info == {1: (1, 0, 6), 2: (2, 0, 9), 3: (1, 1, 4), 4: (0, 0, 25)}
    # P1: one click per non-crowd segment, the background included, each on its own segment
    (row,) = read_index(str(tmp_path / "run" / "index" / "index.parquet"))
    points = json.loads(row["points"])
    assert sorted((p["segment"], p["category_id"]) for p in points) == [(1, 1), (2, 2), (4, 0)]
    for p in points:
        assert expected[int(p["y"]), int(p["x"])] == p["segment"]
    assert row["error"] == "" and report.num_points == 3
    assert {(p["image_id"], p["kind"]) for p in report.problems} == {(5, "unknown_category")}


def test_void_protocol_leaves_the_background_unlabelled(tmp_path):
    dataset, expected = _write_tiny(tmp_path / "data")
    cats, _ = _prepare(dataset, tmp_path / "run")
    assert set(cats) == {1, 2}
    _, _, anns = read_panoptic_annotations(str(tmp_path / "run" / "gt" / "panoptic.json"))
    id_map = read_id_map(str(tmp_path / "run" / "gt" / "panoptic"), anns[5]["file_name"])
    np.testing.assert_array_equal(id_map, np.where(expected == 4, 0, expected))
    (row,) = read_index(str(tmp_path / "run" / "index" / "index.parquet"))
    assert sorted(p["segment"] for p in json.loads(row["points"])) == [1, 2]


@pytest.mark.parametrize("kind", ["synthetic", "coco_panoptic"])
def test_stuff_background_needs_an_instance_dataset(tmp_path, kind):
    extra = {"annotations": "a.json", "panoptic_dir": "p"} if kind == "coco_panoptic" else {}
    with pytest.raises(ValueError, match=f"background=stuff applies to coco_instances datasets; {kind}"):
        _prepare({"kind": kind, "background": "stuff", **extra}, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_background_segment_rules():
    assert background_category({1: Category(1, "a", True)}).id == 0
    assert background_category({0: Category(0, "a", True), 7: Category(7, "b", True)}).id == 8  # 0 taken
    full = np.ones((2, 3), bool)
    rec = ImageRecord(1, 2, 3, segments=[Segment(1, 1, True, full)])
    assert add_background_segment(rec, 0) is rec  # no pixel left: no segment
    half = np.zeros((2, 3), bool)
    half[:, :2] = True
    ignore = np.zeros((2, 3), bool)
    ignore[0, 2] = True
    rec = ImageRecord(1, 2, 3, segments=[Segment(3, 1, True, half)], ignore_mask=ignore)
    bg = add_background_segment(rec, 0).segments[-1]
    assert (bg.id, bg.category_id, bg.isthing) == (4, 0, False)
    np.testing.assert_array_equal(bg.mask, [[False, False, False], [False, False, True]])


def test_max_images_limits_what_is_read_and_reported(tmp_path):
    """Problems of images beyond dataset.max_images are not reported: those images are not read."""
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    for i in (1, 2):
        (root / "img" / f"{i}.png").write_bytes(encode_png(np.zeros((H, W, 3), np.uint8)))
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": _poly(0, 2, 0, 2)},
            {"id": 2, "image_id": 2, "category_id": 77, "segmentation": _poly(0, 2, 0, 2)}]
    data = {"images": [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2)],
            "annotations": anns, "categories": [{"id": 1, "name": "cat"}]}
    (root / "ann.json").write_text(json.dumps(data))
    dataset = {"kind": "coco_instances", "annotations": str(root / "ann.json"), "images": str(root / "img")}
    _, report = _prepare({**dataset, "max_images": 1}, tmp_path / "one")
    assert report.num_images == 1 and report.problems == []
    _, report = _prepare(dataset, tmp_path / "two")
    kinds = [(p["image_id"], p["kind"]) for p in report.problems]
    assert report.num_images == 2 and kinds == [(2, "unknown_category"), (2, "no_points")]
    assert report.image_errors == {2: "no points: no non-crowd segment to put a 'p1' point on"}


def test_one_image_that_cannot_be_prepared_does_not_sink_the_run(tmp_path):
    """A negative image id cannot seed point simulation: that image gets an index error, the others are
    prepared; strict mode raises instead."""
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    (root / "img" / "x.png").write_bytes(encode_png(np.zeros((H, W, 3), np.uint8)))
    images = [{"id": i, "file_name": "x.png", "height": H, "width": W} for i in (-3, 4)]
    anns = [{"id": k, "image_id": i, "category_id": 1, "segmentation": _poly(0, 2, 0, 2)} for k, i in ((1, -3), (2, 4))]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns,
                                               "categories": [{"id": 1, "name": "cat"}]}))
    dataset = {"kind": "coco_instances", "annotations": str(root / "ann.json"), "images": str(root / "img")}
    _, report = _prepare(dataset, tmp_path / "run")
    rows = {r["image_id"]: r for r in read_index(str(tmp_path / "run" / "index" / "index.parquet"))}
    assert rows[4]["error"] == "" and len(json.loads(rows[4]["points"])) == 1
    assert rows[-3]["error"].startswith("prepare: ValueError: image -3: sampling needs a non-negative image_id")
    assert [(p["image_id"], p["kind"]) for p in report.problems] == [(-3, "prepare_error")]
    _, _, anns = read_panoptic_annotations(str(tmp_path / "run" / "gt" / "panoptic.json"))
    assert anns[-3]["file_name"] == "-00000000003.png" and len(anns[-3]["segments_info"]) == 1
    with pytest.raises(ValueError, match="non-negative image_id"):
        prepare_inputs(DatasetConfig(**dataset), PointsConfig(), str(tmp_path / "strict"), strict=True)
