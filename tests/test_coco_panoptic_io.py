"""COCO panoptic reading/writing: round trips through fsspec and against COCO's own JSON."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pytest

from pointseg.data.coco_panoptic_io import (
    PanopticWriter,
    read_categories,
    read_id_map,
    read_panoptic_annotations,
)
from pointseg.data.record import Category

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-panoptic-samples"
needs_samples = pytest.mark.skipif(
    not (SAMPLES / "panoptic_examples.json").exists(),
    reason=f"shared COCO panoptic samples not found at {SAMPLES} (../shared/data is not part of the repo)",
)

CATS = {1: Category(1, "person", True, (220, 20, 60)), 7: Category(7, "sky", False, (70, 130, 180))}


def test_memory_round_trip():
    rng = np.random.default_rng(0)
    id_map = np.zeros((20, 30), np.int64)
    id_map[2:6, 3:9] = 5_000_000  # id needing all three bytes
    id_map[10:, :] = 3
    info = [
        {"id": 5_000_000, "category_id": 1, "iscrowd": 0, "source_segment": 4, "area": 999},
        {"id": 3, "category_id": 7},
        {"id": 8, "category_id": 1},  # not in the map: dropped
    ]
    other = rng.integers(0, 2, (20, 30)) * 9
    root = "memory://pio-roundtrip/out"
    with PanopticWriter(root, CATS) as wr:
        wr.add(11, "dir/000011.jpg", id_map, info)
        wr.add(12, "000012.jpg", other, [{"id": 9, "category_id": 7, "iscrowd": 1}])
    cats, images, anns = read_panoptic_annotations(f"{root}/panoptic.json")
    assert cats == CATS
    assert images == [
        {"id": 11, "file_name": "dir/000011.jpg", "height": 20, "width": 30},
        {"id": 12, "file_name": "000012.jpg", "height": 20, "width": 30},
    ]
    assert anns[11]["file_name"] == "000000000011.png"  # named by the image id, not the file name
    np.testing.assert_array_equal(read_id_map(f"{root}/panoptic", "000000000011.png"), id_map)
    np.testing.assert_array_equal(read_id_map(f"{root}/panoptic", "000000000012.png"), other)
    segs = {s["id"]: s for s in anns[11]["segments_info"]}
    assert set(segs) == {5_000_000, 3}
    assert segs[5_000_000] == {"id": 5_000_000, "category_id": 1, "iscrowd": 0, "source_segment": 4,
                               "area": 24, "bbox": [3, 2, 6, 4]}
    assert segs[3]["area"] == 300 and segs[3]["bbox"] == [0, 10, 30, 10] and segs[3]["iscrowd"] == 0
    assert anns[12]["segments_info"][0]["iscrowd"] == 1
    raw = json.loads(fsspec.open(f"{root}/panoptic.json", "r").open().read())
    assert {"id": 7, "name": "sky", "isthing": 0, "color": [70, 130, 180]} in raw["categories"]


def test_writer_errors_name_image_and_field(tmp_path):
    wr = PanopticWriter(str(tmp_path), CATS)
    m = np.ones((4, 4), np.int64)
    with pytest.raises(ValueError, match=r"image 3: id_map holds segment ids \[1\] missing from segments_info"):
        wr.add(3, "a.jpg", m, [])
    with pytest.raises(ValueError, match=r"image 3: segment 1 has unknown category_id 99"):
        wr.add(3, "a.jpg", m, [{"id": 1, "category_id": 99}])
    wr.add(3, "a.jpg", m, [{"id": 1, "category_id": 1}])
    with pytest.raises(ValueError, match="image_id 3 added twice"):
        wr.add(3, "b.jpg", m, [{"id": 1, "category_id": 1}])
    assert wr.close() == f"{tmp_path}/panoptic.json"
    assert sorted(p.name for p in (tmp_path / "panoptic").iterdir()) == ["000000000003.png"]


def test_same_basename_in_two_folders_gets_two_pngs(tmp_path):
    """PNG names come from image ids: ``a/x.jpg`` and ``b/x.jpg`` (and a hostile name) cannot collide or escape."""
    first, second = np.ones((3, 4), np.int64), np.full((3, 4), 2, np.int64)
    with PanopticWriter(str(tmp_path / "out"), CATS) as wr:
        wr.add(5, "a/x.jpg", first, [{"id": 1, "category_id": 1}])
        wr.add(6, "b/x.jpg", second, [{"id": 2, "category_id": 7}])
        wr.add(7, "../../escape.jpg", first, [{"id": 1, "category_id": 1}])
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["out/panoptic.json", "out/panoptic/000000000005.png", "out/panoptic/000000000006.png",
                       "out/panoptic/000000000007.png"]
    _, images, anns = read_panoptic_annotations(str(tmp_path / "out" / "panoptic.json"))
    assert [im["file_name"] for im in images] == ["a/x.jpg", "b/x.jpg", "../../escape.jpg"]  # kept as given
    np.testing.assert_array_equal(read_id_map(str(tmp_path / "out" / "panoptic"), anns[5]["file_name"]), first)
    np.testing.assert_array_equal(read_id_map(str(tmp_path / "out" / "panoptic"), anns[6]["file_name"]), second)


def test_read_id_map_stays_inside_its_folder(tmp_path):
    from pointseg.data.images import OutsidePathError
    from pointseg.data.panoptic_format import encode_png

    (tmp_path / "secret.png").write_bytes(encode_png(np.ones((2, 2), np.int64)))
    (tmp_path / "pngs").mkdir()
    for name in ("../secret.png", str(tmp_path / "secret.png"), f"file://{tmp_path}/secret.png"):
        with pytest.raises(OutsidePathError, match="pointseg reads dataset files only under"):
            read_id_map(str(tmp_path / "pngs"), name)


@needs_samples
def test_coco_samples_rewrite_reproduces_coco_area_and_bbox():
    """COCO's own area/bbox are the oracle for what the writer recomputes from the PNG."""
    cats, images, anns = read_panoptic_annotations(str(SAMPLES / "panoptic_examples.json"))
    assert len(cats) == 133 and sum(c.isthing for c in cats.values()) == 80
    assert read_categories(str(SAMPLES / "panoptic_coco_categories.json")) == cats
    assert [len(anns[i["id"]]["segments_info"]) for i in images] == [18, 32]
    root = "memory://pio-samples/out"
    with PanopticWriter(root, cats) as wr:
        for im in images:
            ann = anns[im["id"]]
            id_map = read_id_map(str(SAMPLES / "panoptic_examples"), ann["file_name"])
            assert id_map.shape == (im["height"], im["width"])
            stripped = [{k: s[k] for k in ("id", "category_id", "iscrowd")} for s in ann["segments_info"]]
            wr.add(im["id"], im["file_name"], id_map, stripped)
    _, _, new = read_panoptic_annotations(f"{root}/panoptic.json")
    for image_id, ann in anns.items():
        assert new[image_id]["file_name"] == ann["file_name"]
        want = sorted(ann["segments_info"], key=lambda s: s["id"])
        got = sorted(new[image_id]["segments_info"], key=lambda s: s["id"])
        assert got == want
