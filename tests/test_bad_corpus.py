"""The data layer on the bad-input corpus: what reaches the index, what is reported and why,
and that nothing is read from or written outside where it should be."""

from __future__ import annotations

import json
import re
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from bad_corpus import (
    IMAGE_ERROR,
    LABELLED,
    POINT_DROPPED,
    READER_PROBLEM,
    make_bad_corpus,
)

from pointseg.config import DatasetConfig, PointsConfig
from pointseg.data.coco import CocoFormatError, CocoReadWarning
from pointseg.data.coco_panoptic_io import read_id_map, read_panoptic_annotations
from pointseg.data.images import ImageDecodeError, read_image_as_annotated
from pointseg.data.points import validate_points
from pointseg.data.prepare import prepare_inputs, read_index
from pointseg.data.record import Points

REQUIRED = {
    "missing_file", "truncated_jpeg", "zero_bytes", "not_an_image", "exif_stored_grid", "size_mismatch",
    "same_basename", "dotdot_path", "absolute_path", "scheme_path", "annotation_unknown_image",
    "duplicate_image_id", "unknown_category", "bbox_only", "empty_segmentation", "crowd_only", "no_annotations",
    "grayscale", "palette", "rgba", "png16", "point_outside", "point_nan", "point_unknown_category",
    "malformed_points_line", "points_unknown_image", "no_points", "one_pixel_object", "degenerate_polygon",
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    corpus = make_bad_corpus(tmp / "data")
    before = corpus.tree()
    cfg = corpus.config()
    out = tmp / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CocoReadWarning)
        cats, report = prepare_inputs(DatasetConfig(**cfg["dataset"]), PointsConfig(**cfg["points"]), str(out))
    rows = {r["image_id"]: r for r in read_index(str(out / "index" / "index.parquet"))}
    return SimpleNamespace(corpus=corpus, before=before, tmp=tmp, out=out, cats=cats, report=report, rows=rows)


def _files(folder):
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_corpus_has_every_required_kind():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        corpus = make_bad_corpus(Path(d) / "c")
        kinds = [c.kind for c in corpus.cases]
        assert len(kinds) == len(set(kinds)) and REQUIRED <= set(kinds)
        assert len([k for k in kinds if corpus.by_kind(k).outcome != LABELLED]) >= 25
        assert len(corpus.labelled_ids) >= 8
        assert all(c.reason for c in corpus.cases if c.outcome != LABELLED)
        assert all(c.stage in ("prepare", "decode") for c in corpus.cases if c.outcome == IMAGE_ERROR)
        assert all(c.what for c in corpus.cases)
        assert {c.outcome for c in corpus.cases} == {LABELLED, IMAGE_ERROR, POINT_DROPPED, READER_PROBLEM}


def test_nothing_written_outside_the_output_folder(prepared):
    corpus = prepared.corpus
    before = prepared.before
    tmp = prepared.tmp
    out = prepared.out
    assert corpus.tree() == before  # the corpus, its outside/ folder included, is byte-for-byte unchanged
    assert {p.name for p in tmp.iterdir()} == {"data", "run"}
    written = _files(out)
    gt_pngs = {f"gt/panoptic/{i:012d}.png" for i in corpus.dataset_ids}
    assert written == {"gt/panoptic.json", "points.jsonl", "index/index.parquet", "categories.json"} | gt_pngs


def test_index_rows_and_prepare_errors(prepared):
    corpus = prepared.corpus
    report = prepared.report
    rows = prepared.rows
    assert set(rows) == corpus.dataset_ids and report.num_images == len(rows)
    assert 1 in rows and not {20, 37, 999, 1234} & set(rows)
    for case in corpus.cases:
        if case.outcome != IMAGE_ERROR:
            for i in set(case.image_ids) & corpus.dataset_ids:
                assert rows[i]["error"] == "", (case.kind, rows[i]["error"])
        elif case.stage == "prepare":
            (i,) = case.image_ids
            assert case.reason in rows[i]["error"], (case.kind, rows[i]["error"])
            assert report.image_errors[i] == rows[i]["error"]
        else:
            (i,) = case.image_ids
            assert rows[i]["error"] == "", case.kind  # the decoding stage finds it
    assert set(report.image_errors) == {i for c in corpus.cases if c.stage == "prepare" for i in c.image_ids}
    # a rejected name leaves nothing to read; every other row points inside the image folder
    for kind in ("dotdot_path", "absolute_path", "scheme_path"):
        (i,) = corpus.by_kind(kind).image_ids
        assert rows[i]["file_name"] == "" and "dataset.allow_outside_paths" in rows[i]["error"]
    inside = [r["file_name"] for r in rows.values() if r["file_name"]]
    assert all(f.startswith(str(corpus.images) + "/") and "/../" not in f for f in inside)
    assert rows[8]["file_name"] != rows[9]["file_name"]
    assert rows[10]["file_name"] == f"{corpus.images}/inner.png"
    (line_case,) = [c for c in corpus.cases if c.kind == "malformed_points_line"]
    assert f"{corpus.points}, line " in rows[line_case.image_ids[0]]["error"]


def test_problems_are_listed_per_image_with_reason(prepared):
    corpus = prepared.corpus
    report = prepared.report
    got = {(p["image_id"], p["kind"]) for p in report.problems}
    expected = {(i, c.problem_kind) for c in corpus.cases if c.problem_kind for i in c.image_ids}
    assert got == expected
    for c in corpus.cases:
        if c.problem_kind:
            texts = [p["reason"] for p in report.problems
                     if p["kind"] == c.problem_kind and p["image_id"] in c.image_ids]
            assert any(c.reason in t for t in texts), (c.kind, texts)
    assert json.loads(json.dumps(report.to_dict()))["problems"] == report.problems
    assert report.points_for_unknown_images == [1234]
    assert sorted(report.images_without_points) == [27, 28, 29, 30]


def test_decoding_stage_rule_on_every_row(prepared):
    """What the labelling stage sees: read_image_as_annotated on each row without an error."""
    corpus = prepared.corpus
    rows = prepared.rows
    decode_errors = {i: c.reason for c in corpus.cases if c.stage == "decode" for i in c.image_ids}
    for i, r in rows.items():
        if r["error"]:
            continue
        if i in decode_errors:
            with pytest.raises(ImageDecodeError, match=re.escape(decode_errors[i])):
                read_image_as_annotated(r["file_name"], r["height"], r["width"])
        else:
            image = read_image_as_annotated(r["file_name"], r["height"], r["width"])
            assert image.shape == (r["height"], r["width"], 3), i
            left, right = image[20, 10].astype(int), image[20, 50].astype(int)
            if i in (2, 5):  # grayscale: the red half is the brighter one
                assert left.sum() > right.sum(), i
            else:  # the annotated grid: red box on the left (swapped in b/same.png)
                assert (left[0] > left[2]) == (i != 9) and (right[2] > right[0]) == (i != 9), i
    assert set(decode_errors) | {i for i, r in rows.items() if r["error"]} == set(corpus.failed)


def test_dropped_points_and_kept_points(prepared):
    corpus = prepared.corpus
    cats = prepared.cats
    rows = prepared.rows
    for i, reason in corpus.dropped_points.items():
        pts = Points.from_list(json.loads(rows[i]["points"]))
        kept, problems = validate_points(pts, rows[i]["height"], rows[i]["width"], cats)
        assert len(kept) == 2 and len(problems) == 1 and reason in problems[0], (i, problems)
    assert len(json.loads(rows[2]["points"])) == 2  # the first line of image 2 was kept
    assert len(json.loads(rows[11]["points"])) == 3  # the click on the 1-pixel object


def test_ground_truth_is_named_by_id_and_keeps_file_names(prepared):
    corpus = prepared.corpus
    out = prepared.out
    gt_cats, images, anns = read_panoptic_annotations(str(out / "gt" / "panoptic.json"))
    assert set(gt_cats) == {1, 2}
    by_id = {im["id"]: im for im in images}
    assert set(by_id) == corpus.dataset_ids  # also images without segments (12) and failing ones
    assert by_id[8]["file_name"] == "a/same.png" and by_id[9]["file_name"] == "b/same.png"
    assert by_id[24]["file_name"] == "../outside/escape.png"  # kept as given, never used as a path
    assert by_id[10]["file_name"] == "sub/../inner.png"
    assert all(a["file_name"] == f"{i:012d}.png" for i, a in anns.items())

    def cat_map(i):
        id_map = read_id_map(str(out / "gt" / "panoptic"), anns[i]["file_name"])
        cat = {s["id"]: s["category_id"] for s in anns[i]["segments_info"]}
        return np.vectorize(lambda v: cat.get(v, 0))(id_map)

    left, right = (slice(2, 46), slice(2, 30)), (slice(2, 46), slice(34, 62))
    a, b = cat_map(8), cat_map(9)  # same basename, labels swapped: both survive
    assert (a[left] == 1).all() and (a[right] == 2).all() and (b[left] == 2).all() and (b[right] == 1).all()
    one = {s["area"] for s in anns[11]["segments_info"]}
    assert 1 in one and len(anns[11]["segments_info"]) == 3
    assert anns[12]["segments_info"] == []
    assert len(anns[13]["segments_info"]) == 4  # 5 annotations, one wholly covered
    assert [s["iscrowd"] for s in anns[27]["segments_info"]] == [1]


def test_allow_outside_paths_reads_the_hostile_names(tmp_path):
    """The rejected names point at real images: trusted, they are read like any other."""
    corpus = make_bad_corpus(tmp_path / "data")
    cfg = corpus.config(allow_outside_paths=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CocoReadWarning)
        _, report = prepare_inputs(DatasetConfig(**cfg["dataset"]), PointsConfig(**cfg["points"]), str(tmp_path / "o"))
    rows = {r["image_id"]: r for r in read_index(str(tmp_path / "o" / "index" / "index.parquet"))}
    for kind in ("dotdot_path", "absolute_path", "scheme_path"):
        (i,) = corpus.by_kind(kind).image_ids
        assert rows[i]["error"] == "" and "image_path" not in {p["kind"] for p in report.problems}
        assert read_image_as_annotated(rows[i]["file_name"], rows[i]["height"], rows[i]["width"]).shape == (48, 64, 3)


def test_strict_stops_at_the_first_problem(tmp_path):
    corpus = make_bad_corpus(tmp_path / "data")
    cfg = corpus.config()
    with pytest.raises(CocoFormatError, match="image id 1 listed twice"):
        prepare_inputs(DatasetConfig(**cfg["dataset"]), PointsConfig(**cfg["points"]), str(tmp_path / "o"), strict=True)

