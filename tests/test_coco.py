"""COCO instance and panoptic readers, the overlap rule, and bad-input handling."""

from __future__ import annotations

import json
import re
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


# --------------------------------------------------------------------------- structured problems, paths, EXIF


def _box_polygon(r0, r1, c0, c1):
    """Polygon covering pixel rows r0..r1-1, columns c0..c1-1 (COCO: pixel (r, c) is [c, c+1) x [r, r+1))."""
    return [[c0, r0, c1, r0, c1, r1, c0, r1]]


def test_problems_are_per_image_items_naming_the_image(tmp_path):
    root = str(tmp_path)
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "segmentation": _box_polygon(0, 2, 0, 2)},  # good
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2]},  # box only
        {"id": 3, "image_id": 1, "category_id": 3, "segmentation": []},  # empty
        {"id": 4, "image_id": 2, "category_id": 3, "segmentation": [[0, 0, 2, 2, 4, 4]]},  # collinear: no pixel
        {"id": 5, "image_id": 2, "category_id": 99, "segmentation": _box_polygon(0, 1, 0, 1)},
        {"id": 6, "image_id": 77, "category_id": 3, "segmentation": _box_polygon(0, 1, 0, 1)},
        {"id": 7, "image_id": 2, "category_id": 3},  # neither box nor segmentation
    ]
    _, data = _coco_fixture(root, annotations=anns)
    data["images"].append({"id": 2, "file_name": "again.png", "height": 6, "width": 5})
    data["images"].append({"id": 9, "file_name": "c.png", "height": 0, "width": 5})
    _write_json(f"{root}/ann.json", data)
    with pytest.warns(CocoReadWarning):
        _, records = read_coco_instances(f"{root}/ann.json", f"{root}/img")
        recs = list(records)
    assert [r.image_id for r in recs] == [1, 2] and [len(r.segments) for r in recs] == [1, 0]
    got = {(p.image_id, p.kind) for p in records.report.items}
    assert got == {(1, "bbox_only"), (1, "empty_segmentation"), (2, "empty_mask"), (2, "unknown_category"),
                   (77, "unknown_image"), (2, "bad_annotation"), (2, "duplicate_image"), (9, "bad_image_entry")}
    for p in records.report.items:
        assert re.search(rf"image(_id| id)? {p.image_id}\b", p.reason) and p.reason.startswith(f"{root}/ann.json: "), p
    text = {p.kind: p.reason for p in records.report.items}
    assert "annotation 2 (image 1): only a 'bbox'" in text["bbox_only"]
    assert "annotation 3 (image 1): field 'segmentation' is empty" in text["empty_segmentation"]
    assert "annotation 4 (image 2)" in text["empty_mask"] and "covers no pixel" in text["empty_mask"]
    assert records.report.to_dict()["problems"][0] == records.report.items[0].to_dict()
    # each kind is fatal under strict, with the same message
    for i, ann in enumerate(anns[1:5] + anns[6:]):
        _write_json(f"{root}/one.json", {**data, "images": data["images"][:2], "annotations": [ann]})
        with pytest.raises(CocoFormatError, match=f"image {ann['image_id']}"):
            list(read_coco_instances(f"{root}/one.json", f"{root}/img", strict=True)[1])


def test_skipped_annotations_are_ignore_regions(tmp_path):
    """Unknown category keeps its decoded mask, a box-only or empty annotation its box; good masks are not in it."""
    root = str(tmp_path)
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "segmentation": _box_polygon(0, 2, 0, 2)},
        {"id": 2, "image_id": 1, "category_id": 99, "segmentation": _box_polygon(4, 6, 3, 5), "bbox": [0, 0, 5, 6]},
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0.5, 2.2, 1.0, 1.5]},  # touches cols 0-1, rows 2-3
        {"id": 4, "image_id": 1, "category_id": 3, "segmentation": [], "bbox": [4, 0, 1, 1]},
        {"id": 5, "image_id": 2, "category_id": 3, "segmentation": _box_polygon(0, 1, 0, 1)},
    ]
    _coco_fixture(root, annotations=anns)
    with pytest.warns(CocoReadWarning):
        a, b = list(read_coco_instances(f"{root}/ann.json", f"{root}/img")[1])
    expected = np.zeros((6, 5), bool)
    expected[4:6, 3:5] = True  # the mask, not the (whole-image) box
    expected[2:4, 0:2] = True
    expected[0, 4] = True
    np.testing.assert_array_equal(a.ignore_mask, expected)
    assert b.ignore_mask is None


def test_file_names_that_leave_the_image_folder_are_rejected(tmp_path):
    root = str(tmp_path)
    _coco_fixture(root, annotations=[])
    outside = tmp_path / "outside.png"
    outside.write_bytes((tmp_path / "img" / "a.png").read_bytes())
    (tmp_path / "img" / "sub").mkdir()
    names = {1: "a.png", 2: "sub/../b.png", 3: "../outside.png", 4: str(outside), 5: f"file://{outside}",
             6: "s3://bucket/x.png", 7: ""}
    images = [{"id": i, "file_name": n, "height": 6, "width": 5} for i, n in names.items()]
    _coco_fixture(root, images=images, annotations=[])
    with pytest.warns(CocoReadWarning):
        _, records = read_coco_instances(f"{root}/ann.json", f"{root}/img", load_images=True)
        recs = {r.image_id: r for r in records}
    assert recs[1].file_name == f"{root}/img/a.png" and recs[2].file_name == f"{root}/img/b.png"
    assert recs[1].image is not None and recs[2].image is not None
    for i in (3, 4, 5, 6, 7):
        assert recs[i].file_name == "" and recs[i].image is None  # nothing was read
        assert recs[i].original_file_name == names[i]
        assert "pointseg reads dataset files only under" in records.report.image_errors[i]
    kinds = {(p.image_id, p.kind) for p in records.report.items}
    assert kinds == {(i, "image_path") for i in (3, 4, 5, 6, 7)}
    reasons = records.report.image_errors
    assert "'..'" in reasons[3] and "absolute" in reasons[4] and "scheme" in reasons[5] and "empty" in reasons[7]
    # trusted dataset: the same names are followed
    with pytest.warns(CocoReadWarning, match="is empty"):
        _, trusted = read_coco_instances(f"{root}/ann.json", f"{root}/img", allow_outside_paths=True)
        by_id = {r.image_id: r.file_name for r in trusted}
    assert by_id[3] == f"{root}/img/../outside.png" and by_id[4] == str(outside) and by_id[5] == f"file://{outside}"
    assert trusted.report.counts == {"image_path": 1}  # the empty name stays an error
    with pytest.raises(CocoFormatError, match="'..'"):
        list(read_coco_instances(f"{root}/ann.json", f"{root}/img", strict=True)[1])


def test_load_images_uses_the_annotated_grid(tmp_path):
    """EXIF orientation 6: annotated in the stored grid -> stored pixels; in the shown grid -> rotated;
    a size matching neither -> an image_decode problem naming both sizes."""
    from PIL import Image

    stored = np.zeros((8, 12, 3), np.uint8)
    stored[:, :6] = (250, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "img").mkdir()
    Image.fromarray(stored).save(tmp_path / "img" / "r.jpg", exif=exif, quality=100)
    images = [{"id": 1, "file_name": "r.jpg", "height": 8, "width": 12},  # stored grid (COCO)
              {"id": 2, "file_name": "r.jpg", "height": 12, "width": 8},  # shown grid
              {"id": 3, "file_name": "r.jpg", "height": 5, "width": 5}]
    _write_json(f"{tmp_path}/ann.json", {"images": images, "annotations": [], "categories": [{"id": 1}]})
    with pytest.warns(CocoReadWarning, match="annotated as 5x5"):
        _, records = read_coco_instances(f"{tmp_path}/ann.json", f"{tmp_path}/img", load_images=True)
        a, b, c = list(records)
    assert a.image.shape == (8, 12, 3) and a.image[:, :4, 0].min() > 200 and a.image[:, 8:, 0].max() < 50
    # orientation 6 turns the stored image a quarter clockwise: its left half becomes the top
    assert b.image.shape == (12, 8, 3) and b.image[:4, :, 0].min() > 200 and b.image[8:, :, 0].max() < 50
    assert c.image is None and "annotated as 5x5" in records.report.image_errors[3]
    assert records.report.counts == {"image_decode": 1} and records.report.items[0].image_id == 3


def test_panoptic_unlisted_ids_outside_png_and_missing_ground_truth():
    root = "memory://pan_bad"
    ids = np.zeros((2, 3), np.int32)
    ids[0] = 7
    ids[1, :2] = 8  # not in segments_info
    with fsspec.open(f"{root}/png/1.png", "wb") as f:
        f.write(encode_panoptic_png(ids))
    with fsspec.open(f"{root}/secret.png", "wb") as f:
        f.write(encode_panoptic_png(ids))
    data = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": 2, "width": 3} for i in (1, 2, 3)],
        "annotations": [
            {"image_id": 1, "file_name": "1.png", "segments_info": [{"id": 7, "category_id": 1}]},
            {"image_id": 2, "file_name": "../secret.png", "segments_info": [{"id": 7, "category_id": 1}]},
        ],
        "categories": [{"id": 1, "name": "thing", "isthing": 1}],
    }
    _write_json(f"{root}/pan.json", data)
    with pytest.warns(CocoReadWarning):
        _, records = read_coco_panoptic(f"{root}/pan.json", f"{root}/png")
        a, b, c = list(records)
    assert [s.id for s in a.segments] == [7] and b.segments == [] and c.segments == []
    kinds = {(p.image_id, p.kind) for p in records.report.items}
    assert kinds == {(1, "unlisted_png_ids"), (2, "panoptic_png"), (3, "missing_annotation")}
    assert "ids [8] missing from segments_info" in records.report.messages[0]
    assert records.report.gt_missing == {2, 3}  # image 1's ground truth is known (and partly VOID)
