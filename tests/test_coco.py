"""COCO instance and panoptic readers, the overlap rule, and bad-input handling."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pytest

from pointseg.data.coco import (
    CocoFormatError,
    CocoReadWarning,
    instances_to_panoptic,
    panoptic_id_map,
    read_categories,
    read_coco_instances,
    read_coco_panoptic,
    rle_counts_from_string,
    rle_to_mask,
)
from pointseg.data.images import encode_png
from pointseg.data.panoptic_format import encode_png as encode_panoptic_png
from pointseg.data.record import ImageRecord, Segment

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MINI = DATA / "coco-mini"
PAN = DATA / "coco-panoptic-samples"
needs_mini = pytest.mark.skipif(not MINI.is_dir(), reason=f"real COCO test data not found at {MINI}")
needs_pan = pytest.mark.skipif(not PAN.is_dir(), reason=f"COCO panoptic samples not found at {PAN}")


def _rle_uncompressed_decode(counts: list[int], h: int, w: int) -> np.ndarray:
    """Independent oracle: COCO uncompressed RLE = alternating 0/1 runs, column-major."""
    flat = np.zeros(h * w, bool)
    pos, val = 0, False
    for c in counts:
        flat[pos : pos + c] = val
        pos, val = pos + c, not val
    return flat.reshape(w, h).T


# --------------------------------------------------------------------------- coco-mini


@needs_mini
def test_coco_mini_all_images_and_annotations():
    ann_uri = str(MINI / "annotations" / "instances_train2017.json")
    raw = json.loads(Path(ann_uri).read_text())
    anns = {a["id"]: a for a in raw["annotations"]}
    cats, records = read_coco_instances(ann_uri, str(MINI / "train2017"))
    assert len(cats) == 80 and all(c.isthing for c in cats.values())
    assert len(records) == 80
    n_seg = n_crowd = 0
    seen = set()
    for rec in records:
        seen.add(rec.image_id)
        assert Path(rec.file_name).is_file()
        image_anns = [a for a in raw["annotations"] if a["image_id"] == rec.image_id]
        assert [s.id for s in rec.segments] == list(range(1, len(image_anns) + 1))
        for seg, a in zip(rec.segments, image_anns):  # annotation order is kept
            assert seg.mask.shape == (rec.height, rec.width) and seg.mask.dtype == bool
            assert seg.category_id == a["category_id"] and seg.iscrowd == bool(a["iscrowd"])
            if a["iscrowd"]:
                n_crowd += 1
                s = a["segmentation"]
                np.testing.assert_array_equal(seg.mask, _rle_uncompressed_decode(s["counts"], *s["size"]))
                # (COCO's crowd ``area`` field is not the RLE pixel count, so it is no oracle)
        n_seg += len(rec.segments)
    assert n_seg == len(anns) == 739 and n_crowd == 8
    assert len(seen) == 80
    assert records.report.counts == {} and records.report.yielded == 80
    assert records.report.annotations == 739


@needs_mini
def test_coco_mini_polygons_match_independent_rasteriser():
    """Oracle: matplotlib point-in-polygon at pixel centres; COCO polygon
    coordinates put pixel (r, c) on the square [c, c+1) x [r, r+1)."""
    from matplotlib.path import Path as MplPath

    ann_uri = str(MINI / "annotations" / "instances_train2017.json")
    raw = json.loads(Path(ann_uri).read_text())
    _, records = read_coco_instances(ann_uri, str(MINI / "train2017"), max_images=2)
    checked = 0
    for rec in records:
        rows, cols = np.mgrid[: rec.height, : rec.width]
        centres = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], axis=1)
        image_anns = [a for a in raw["annotations"] if a["image_id"] == rec.image_id]
        for seg, a in zip(rec.segments, image_anns):
            if a["iscrowd"]:
                continue
            oracle = np.zeros(rec.height * rec.width, bool)
            for poly in a["segmentation"]:
                oracle |= MplPath(np.reshape(poly, (-1, 2))).contains_points(centres)
            oracle = oracle.reshape(rec.height, rec.width)
            iou = (oracle & seg.mask).sum() / max((oracle | seg.mask).sum(), 1)
            assert iou > 0.95, (rec.image_id, a["id"], iou)
            checked += 1
    assert checked > 20


@needs_mini
def test_coco_mini_crowd_is_void_and_load_images():
    ann_uri = str(MINI / "annotations" / "instances_train2017.json")
    raw = json.loads(Path(ann_uri).read_text())
    crowd_images = {a["image_id"] for a in raw["annotations"] if a["iscrowd"]}
    first = next(im for im in raw["images"] if im["id"] in crowd_images)
    n = [im["id"] for im in raw["images"]].index(first["id"]) + 1
    _, records = read_coco_instances(ann_uri, str(MINI / "train2017"), load_images=True, max_images=n)
    rec = list(records)[-1]
    assert rec.image_id == first["id"]
    assert rec.image.shape == (first["height"], first["width"], 3) and rec.image.dtype == np.uint8
    pan, dropped = instances_to_panoptic(rec)
    id_map, info = pan.panoptic()
    crowd = [i for i in info if i["iscrowd"]]
    assert crowd and all(i["isthing"] for i in info)
    for seg in rec.segments:
        if not seg.iscrowd:  # crowd never takes a pixel from an instance
            assert not np.isin(id_map[seg.mask], [c["id"] for c in crowd]).any()


# --------------------------------------------------------------------------- overlap rule


def _seg(sid, box, h=10, w=10, crowd=False, cat=1):
    m = np.zeros((h, w), bool)
    r0, r1, c0, c1 = box
    m[r0:r1, c0:c1] = True
    return Segment(sid, cat, True, m, crowd)


def test_instances_to_panoptic_smaller_wins_crowd_never_overwrites():
    big = _seg(1, (0, 8, 0, 8))  # 64 px
    small = _seg(2, (2, 4, 2, 4))  # 4 px, inside big
    crowd = _seg(3, (6, 10, 6, 10), crowd=True)  # overlaps big on [6:8, 6:8]
    covered = _seg(4, (8, 10, 0, 2))  # 4 px, fully covered by two smaller ones
    left = _seg(5, (8, 10, 0, 1))  # 2 px
    right = _seg(6, (8, 10, 1, 2))  # 2 px
    segs = [big, small, crowd, covered, left, right]
    expected = np.zeros((10, 10), np.int32)
    expected[0:8, 0:8] = 1
    expected[2:4, 2:4] = 2
    expected[6:10, 6:10] = 3
    expected[0:8, 0:8] = 1  # crowd does not take big's pixels
    expected[2:4, 2:4] = 2
    expected[8:10, 0] = 5
    expected[8:10, 1] = 6
    for order in (segs, segs[::-1]):  # the rule does not depend on list order
        copies = [Segment(s.id, s.category_id, s.isthing, s.mask.copy(), s.iscrowd) for s in order]
        rec = ImageRecord(7, 10, 10, segments=copies)
        pan, dropped = instances_to_panoptic(rec)
        assert dropped == [4]
        id_map, info = pan.panoptic()
        np.testing.assert_array_equal(id_map, expected)
        np.testing.assert_array_equal(panoptic_id_map(rec.segments, 10, 10), expected)
        assert {i["id"]: i["area"] for i in info} == {1: 64 - 4, 2: 4, 3: 12, 5: 2, 6: 2}
        # visible masks are disjoint and the input record is untouched
        assert sum(s.area for s in pan.segments) == (expected > 0).sum()
        assert rec.segments[[s.id for s in order].index(1)].area == 64


# --------------------------------------------------------------------------- synthetic JSON, bad input


def _write_json(uri, obj):
    with fsspec.open(uri, "w") as f:
        json.dump(obj, f)


def _coco_fixture(root: str, images=None, annotations=None, categories=None):
    h, w = 6, 5
    rgb = np.full((h, w, 3), 100, np.uint8)
    for name in ("a.png", "b.png"):
        with fsspec.open(f"{root}/img/{name}", "wb") as f:
            f.write(encode_png(rgb))
    mask = np.zeros((h, w), np.uint8)
    mask[1:4, 2:5] = 1
    from pycocotools import mask as mask_utils

    comp = mask_utils.encode(np.asfortranarray(mask))
    data = {
        "images": images
        if images is not None
        else [
            {"id": 1, "file_name": "a.png", "height": h, "width": w},
            {"id": 2, "file_name": "b.png", "height": h, "width": w},
        ],
        "annotations": annotations
        if annotations is not None
        else [
            {"id": 10, "image_id": 1, "category_id": 3, "iscrowd": 0,
             "segmentation": {"size": [h, w], "counts": comp["counts"].decode("ascii")}},
            {"id": 11, "image_id": 1, "category_id": 4, "iscrowd": 1,
             "segmentation": {"size": [h, w], "counts": [6, 2, 4, 2, 16]}},
            {"id": 12, "image_id": 2, "category_id": 3, "iscrowd": 0,
             "segmentation": [[0.5, 0.5, 3.5, 0.5, 3.5, 2.5, 0.5, 2.5]]},
        ],
        "categories": categories if categories is not None else [{"id": 3, "name": "cat"}, {"id": 4, "name": "dog"}],
    }
    _write_json(f"{root}/ann.json", data)
    return mask.astype(bool), data


def test_compressed_and_uncompressed_rle_and_polygon(tmp_path):
    root = str(tmp_path)
    mask, data = _coco_fixture(root)
    cats, records = read_coco_instances(f"{root}/ann.json", f"{root}/img", load_images=True)
    assert set(cats) == {3, 4} and cats[4].name == "dog" and cats[4].isthing
    recs = list(records)
    assert [r.image_id for r in recs] == [1, 2]
    a, b = recs
    np.testing.assert_array_equal(a.segments[0].mask, mask)  # compressed RLE string
    np.testing.assert_array_equal(a.segments[1].mask, _rle_uncompressed_decode([6, 2, 4, 2, 16], 6, 5))
    assert a.segments[1].iscrowd and not a.segments[0].iscrowd
    assert 4 <= b.segments[0].area <= 12  # 3x2 polygon
    assert a.image.shape == (6, 5, 3) and a.file_name == f"{root}/img/a.png"


def test_memory_uri_reader():
    root = "memory://coco_mem"
    mask, _ = _coco_fixture(root)
    _, records = read_coco_instances(f"{root}/ann.json", f"{root}/img", load_images=True)
    recs = list(records)
    assert recs[0].file_name == "memory://coco_mem/img/a.png"
    assert recs[0].image.shape == (6, 5, 3)
    np.testing.assert_array_equal(recs[0].segments[0].mask, mask)


def test_bad_input_is_reported_not_lost(tmp_path):
    root = str(tmp_path)
    _, data = _coco_fixture(root)
    data["images"].append({"id": 1, "file_name": "dup.png", "height": 6, "width": 5})  # duplicate id
    data["images"].append({"id": 3, "file_name": "missing.png", "height": 6, "width": 5})  # no file
    data["annotations"].append({"id": 20, "image_id": 999, "category_id": 3, "segmentation": [[0, 0, 1, 0, 1, 1]]})
    data["annotations"].append({"id": 21, "image_id": 2, "category_id": 77, "segmentation": [[0, 0, 1, 0, 1, 1]]})
    _write_json(f"{root}/bad.json", data)
    with pytest.warns(CocoReadWarning) as caught:
        _, records = read_coco_instances(f"{root}/bad.json", f"{root}/img", load_images=True)
        recs = list(records)
    text = " | ".join(str(w.message) for w in caught)
    assert "image_id 999" in text and "category_id 77" in text and "image id 1 listed twice" in text
    assert "missing.png" in text
    rep = records.report
    assert rep.counts == {"duplicate_image": 1, "unknown_image": 1, "unknown_category": 1, "image_decode": 1}
    assert [r.image_id for r in recs] == [1, 2, 3]  # no image lost
    assert recs[0].file_name.endswith("a.png")  # the first entry was kept
    assert len(recs[1].segments) == 1  # the unknown-category annotation was skipped
    assert recs[2].image is None and recs[2].file_name.endswith("missing.png")
    assert "file not found" in rep.image_errors[3]
    assert json.loads(json.dumps(rep.to_dict()))["counts"]["unknown_image"] == 1

    with pytest.raises(CocoFormatError, match="listed twice"):
        read_coco_instances(f"{root}/bad.json", f"{root}/img", strict=True)


def test_strict_raises_on_missing_image_file(tmp_path):
    root = str(tmp_path)
    _coco_fixture(root, images=[{"id": 5, "file_name": "gone.jpg", "height": 6, "width": 5}], annotations=[])
    _, records = read_coco_instances(f"{root}/ann.json", f"{root}/img", load_images=True, strict=True)
    with pytest.raises(CocoFormatError, match="gone.jpg"):
        next(records)


def test_bad_segmentation_is_skipped_with_reason(tmp_path):
    root = str(tmp_path)
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "segmentation": {"size": [9, 9], "counts": [81]}},
        {"id": 2, "image_id": 1, "category_id": 3, "segmentation": [[1, 1, 2, 2]]},
        {"id": 3, "image_id": 1, "category_id": 3, "segmentation": {"size": [6, 5], "counts": [3, 4]}},
        {"id": 4, "image_id": 1, "category_id": 3, "segmentation": [[0, 0, 4, 0, 4, 5, 0, 5]]},
    ]
    _coco_fixture(root, annotations=anns)
    with pytest.warns(CocoReadWarning) as caught:
        _, records = read_coco_instances(f"{root}/ann.json", f"{root}/img")
        rec = next(records)
    assert len(caught) == 3 and "annotation 1 (image 1): field 'segmentation.size'" in str(caught[0].message)
    assert [s.id for s in rec.segments] == [1] and rec.segments[0].area > 10
    assert records.report.counts["bad_annotation"] == 3
    assert "sum to 7" in " ".join(records.report.messages)


def test_rle_string_decoder_matches_pycocotools():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(3)
    for h, w in [(1, 1), (7, 5), (40, 33)]:
        m = rng.random((h, w)) < 0.3
        m[: h // 2, : w // 2] = True  # long runs exercise multi-group numbers and deltas
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        np.testing.assert_array_equal(rle_to_mask(rle_counts_from_string(rle["counts"]), h, w), m)
    with pytest.raises(ValueError, match="invalid character"):
        rle_counts_from_string("ab c")


# --------------------------------------------------------------------------- panoptic


@needs_pan
def test_panoptic_samples_counts_and_ids():
    raw = json.loads((PAN / "panoptic_examples.json").read_text())
    cats, records = read_coco_panoptic(
        str(PAN / "panoptic_examples.json"), str(PAN / "panoptic_examples"), str(PAN / "images")
    )
    assert len(cats) == 133 and sum(c.isthing for c in cats.values()) == 80
    recs = {r.image_id: r for r in records}
    expected = {142238: (18, 15, 3), 439180: (32, 28, 4)}
    for iid, (n, things, stuff) in expected.items():
        rec = recs[iid]
        assert len(rec.segments) == n
        assert sum(s.isthing for s in rec.segments) == things
        assert sum(not s.isthing for s in rec.segments) == stuff
        assert Path(rec.file_name).is_file()
        ann = next(a for a in raw["annotations"] if a["image_id"] == iid)
        info = {s["id"]: s for s in ann["segments_info"]}
        for seg in rec.segments:  # the file's area and bbox agree with the decoded ids
            assert seg.area == info[seg.id]["area"]
            assert seg.bbox == info[seg.id]["bbox"]
            assert seg.iscrowd == bool(info[seg.id]["iscrowd"])
            assert seg.category_id == info[seg.id]["category_id"]
        # masks are disjoint
        assert sum(s.area for s in rec.segments) == (panoptic_id_map(rec.segments, rec.height, rec.width) > 0).sum()
    assert records.report.counts == {}


@needs_pan
def test_panoptic_categories_file_and_missing_categories(tmp_path):
    raw = json.loads((PAN / "panoptic_examples.json").read_text())
    raw.pop("categories")
    raw["images"] = raw["images"][:1]
    raw["annotations"] = raw["annotations"][:1]
    (tmp_path / "nocats.json").write_text(json.dumps(raw))
    cats_uri = str(PAN / "panoptic_coco_categories.json")
    cats, records = read_coco_panoptic(
        str(tmp_path / "nocats.json"), str(PAN / "panoptic_examples"), categories_uri=cats_uri
    )
    assert cats == read_categories(cats_uri) and len(cats) == 133
    assert cats[1].color == (220, 20, 60)
    (rec,) = list(records)
    assert len(rec.segments) == 18 and rec.file_name == "000000142238.jpg"
    with pytest.raises(CocoFormatError, match="categories"):
        read_coco_panoptic(str(tmp_path / "nocats.json"), str(PAN / "panoptic_examples"))


def test_panoptic_synthetic_memory_and_missing_png():
    root = "memory://pan_syn"
    ids = np.zeros((4, 6), np.int32)
    ids[:2] = 5 + 256 * 3  # uses the G channel
    ids[2:, :3] = 70000  # uses the B channel
    with fsspec.open(f"{root}/png/1.png", "wb") as f:
        f.write(encode_panoptic_png(ids))
    data = {
        "images": [{"id": 1, "file_name": "1.jpg", "height": 4, "width": 6},
                   {"id": 2, "file_name": "2.jpg", "height": 4, "width": 6}],
        "annotations": [
            {"image_id": 1, "file_name": "1.png", "segments_info": [
                {"id": 5 + 256 * 3, "category_id": 1, "iscrowd": 0},
                {"id": 70000, "category_id": 2, "iscrowd": 1}]},
            {"image_id": 2, "file_name": "2.png", "segments_info": []},
        ],
        "categories": [{"id": 1, "name": "person", "isthing": 1}, {"id": 2, "name": "grass", "isthing": 0}],
    }
    _write_json(f"{root}/pan.json", data)
    with pytest.warns(CocoReadWarning, match="2.png"):
        _, records = read_coco_panoptic(f"{root}/pan.json", f"{root}/png")
        a, b = list(records)
    got = [(s.id, s.isthing, s.iscrowd, s.area) for s in a.segments]
    assert got == [(5 + 256 * 3, True, False, 12), (70000, False, True, 6)]
    assert b.segments == [] and records.report.counts == {"panoptic_png": 1}
