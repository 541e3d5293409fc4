"""Point simulation (P1, P10, extreme), validation and the JSON Lines point file."""

from __future__ import annotations

import gzip
from pathlib import Path

import fsspec
import numpy as np
import pytest

from pointseg.data.coco import (
    instances_to_panoptic,
    read_coco_instances,
    read_coco_panoptic,
)
from pointseg.data.points import (
    PointsFileError,
    read_points_jsonl,
    sample_points,
    validate_points,
    write_points_jsonl,
)
from pointseg.data.record import Category, ImageRecord, Points, Segment

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MINI = DATA / "coco-mini"
PAN = DATA / "coco-panoptic-samples"


@pytest.fixture(scope="module")
def mini_records():
    """Six coco-mini images: (raw instance record, panoptic record, dropped ids)."""
    if not MINI.is_dir():
        pytest.skip(f"real COCO test data not found at {MINI}")
    _, records = read_coco_instances(
        str(MINI / "annotations" / "instances_train2017.json"), str(MINI / "train2017"), max_images=6
    )
    out = []
    for rec in records:
        pan, dropped = instances_to_panoptic(rec)
        out.append((rec, pan, dropped))
    return out


def _own_pixel(points: Points, id_map: np.ndarray) -> np.ndarray:
    rc = points.xy[:, ::-1].astype(np.int64)
    assert np.array_equal(rc, points.xy[:, ::-1])  # pixel centres are integers
    return id_map[rc[:, 0], rc[:, 1]]


@pytest.mark.parametrize("scheme,n", [("p1", 1), ("p10", 10)])
def test_uniform_points_on_own_visible_pixels(mini_records, scheme, n):
    total = 0
    for raw, pan, _ in mini_records:
        id_map, info = pan.panoptic()
        pts = sample_points(pan, scheme, seed=0)
        expected = sorted(i["id"] for i in info if not i["iscrowd"])  # every instance that kept pixels
        ids, counts = np.unique(pts.segment, return_counts=True)
        assert ids.tolist() == expected and (counts == n).all()
        np.testing.assert_array_equal(_own_pixel(pts, id_map), pts.segment)
        cat = {s.id: s.category_id for s in pan.segments}
        assert [cat[s] for s in pts.segment.tolist()] == pts.category_id.tolist()
        if n == 10:
            area = {i["id"]: i["area"] for i in info}
            for sid in expected:
                xy = pts.xy[pts.segment == sid]
                distinct = len({tuple(p) for p in xy.tolist()})
                assert distinct == (10 if area[sid] >= 10 else distinct)
        # the raw record (overlapping masks) gives the same points: same overlap rule
        np.testing.assert_array_equal(sample_points(raw, scheme, seed=0).xy, pts.xy)
        total += len(pts)
    assert total > 20 * n


def test_crowd_regions_get_no_points(mini_records):
    crowd_seen = 0
    for raw, pan, _ in mini_records:
        crowd = {s.id for s in raw.segments if s.iscrowd}
        crowd_seen += len(crowd)
        for scheme in ("p1", "p10", "extreme"):
            assert not crowd & set(sample_points(raw, scheme, 3).segment.tolist())
    assert crowd_seen >= 1  # the six images include a crowd region


def test_extreme_points_on_mask_boundary_with_median_ties(mini_records):
    checked = 0
    for raw, _, _ in mini_records:
        pts = sample_points(raw, "extreme", seed=0)
        things = [s for s in raw.segments if not s.iscrowd]
        assert len(pts) == 4 * len(things)
        for s in things:
            xy = pts.xy[pts.segment == s.id].astype(int)
            assert (pts.category_id[pts.segment == s.id] == s.category_id).all()
            rows, cols = np.nonzero(s.mask)
            (tx, ty), (lx, ly), (bx, by), (rx, ry) = xy
            assert ty == rows.min() and lx == cols.min() and by == rows.max() and rx == cols.max()
            for x, y in xy:
                assert s.mask[y, x]
            # median tie-break: as many tied pixels before the chosen one as after (lower median)
            for fixed, free, tied in [
                (ty, tx, cols[rows == ty]),
                (lx, ly, rows[cols == lx]),
                (by, bx, cols[rows == by]),
                (rx, ry, rows[cols == rx]),
            ]:
                before, after = (tied < free).sum(), (tied > free).sum()
                assert before == after or before == after - 1
            checked += 1
    assert checked > 20


def test_extreme_points_hand_computed():
    m = np.zeros((8, 10), bool)
    m[2, 3:7] = True  # top row: cols 3..6 -> lower median 4
    m[3:6, 1:9] = True  # left col 1 rows 3..5 -> 4; right col 8 rows 3..5 -> 4
    m[6, 5:8] = True  # bottom row: cols 5..7 -> 6
    stuff = Segment(2, 9, False, np.ones((8, 10), bool))
    crowd = Segment(3, 1, True, m.copy(), iscrowd=True)
    rec = ImageRecord(1, 8, 10, segments=[Segment(1, 1, True, m), stuff, crowd])
    pts = sample_points(rec, "extreme", seed=0)
    np.testing.assert_array_equal(pts.xy, [[4, 2], [1, 4], [6, 6], [8, 4]])
    assert pts.segment.tolist() == [1] * 4 and pts.category_id.tolist() == [1] * 4


def test_small_segments_and_stuff():
    m_small = np.zeros((6, 6), bool)
    m_small[0, :3] = True  # 3 pixels
    m_stuff = ~m_small
    rec = ImageRecord(5, 6, 6, segments=[Segment(1, 1, True, m_small), Segment(2, 7, False, m_stuff)])
    pts = sample_points(rec, "p10", seed=1)
    small = pts.xy[pts.segment == 1]
    assert len(small) == 10 and set(map(tuple, small.tolist())) <= {(0.0, 0.0), (1.0, 0.0), (2.0, 0.0)}
    stuff = pts.xy[pts.segment == 2]
    assert len({tuple(p) for p in stuff.tolist()}) == 10  # 33 pixels: drawn without replacement
    assert set(pts.category_id[pts.segment == 2].tolist()) == {7}


def test_seeded_and_order_independent(mini_records):
    recs = [pan for _, pan, _ in mini_records]
    first = [sample_points(r, "p10", seed=11) for r in recs]
    again = [sample_points(r, "p10", seed=11) for r in reversed(recs)][::-1]
    for a, b in zip(first, again):
        assert a.xy.tobytes() == b.xy.tobytes() and a.segment.tobytes() == b.segment.tobytes()
    other = [sample_points(r, "p10", seed=12) for r in recs]
    assert any(not np.array_equal(a.xy, b.xy) for a, b in zip(first, other))
    # two images with identical content but different ids get different points
    r0 = recs[0]
    twin = ImageRecord(r0.image_id + 1, r0.height, r0.width, segments=r0.segments)
    assert not np.array_equal(sample_points(twin, "p10", 11).xy, first[0].xy)
    with pytest.raises(ValueError, match="unknown point scheme 'p5'"):
        sample_points(r0, "p5", 0)
    with pytest.raises(ValueError, match="seed"):
        sample_points(r0, "p1", -1)


def test_panoptic_samples_stuff_and_things_get_points():
    if not PAN.is_dir():
        pytest.skip(f"COCO panoptic samples not found at {PAN}")
    _, records = read_coco_panoptic(str(PAN / "panoptic_examples.json"), str(PAN / "panoptic_examples"))
    for rec in records:
        id_map, info = rec.panoptic()
        pts = sample_points(rec, "p1", seed=0)
        assert sorted(pts.segment.tolist()) == sorted(i["id"] for i in info if not i["iscrowd"])
        np.testing.assert_array_equal(_own_pixel(pts, id_map), pts.segment)
        ext = sample_points(rec, "extreme", seed=0)
        assert len(ext) == 4 * sum(1 for i in info if i["isthing"] and not i["iscrowd"])


# --------------------------------------------------------------------------- validation


def test_validate_points_drops_and_reports():
    cats = {1: Category(1, "person", True), 2: Category(2, "grass", False)}
    pts = Points(
        [[0, 0], [np.nan, 3], [-0.6, 1], [-0.4, 1], [9.4, 4.4], [9.6, 1], [3, 4.6], [2, 2]],
        [1, 2, 3, 4, 5, 6, 7, 8],
        [1, 1, 1, 2, 2, 1, 1, 99],
    )
    clean, problems = validate_points(pts, height=5, width=10, categories=cats)
    assert clean.segment.tolist() == [1, 4, 5]
    np.testing.assert_array_equal(clean.xy, [[0, 0], [-0.4, 1], [9.4, 4.4]])
    assert len(problems) == 5
    assert problems[0].startswith("point 1:") and "nan" in problems[0]
    assert problems[1].startswith("point 2:") and "-0.6" in problems[1] and "outside" in problems[1]
    assert problems[2].startswith("point 5:") and "9.6" in problems[2]
    assert problems[3].startswith("point 6:") and "4.6" in problems[3]
    assert problems[4] == "point 7: category_id 99 is not a known category"
    same, none = validate_points(clean, 5, 10, [1, 2])
    assert none == [] and same is clean


# --------------------------------------------------------------------------- JSON Lines


def _example_items():
    a = Points([[0.1, 1 / 3], [1e-300, 639.5], [2.0, 7.0]], [1, 1, 2], [17, 17, 3])
    return [(42, a, "000000000042.jpg"), (7, Points.empty()), (9, Points([[np.pi, np.e]], [5], [1]))]


@pytest.mark.parametrize("where", ["memory", "local", "gzip"])
def test_jsonl_round_trip_exact(tmp_path, where):
    uri = {
        "memory": "memory://points_test/p.jsonl",
        "local": str(tmp_path / "p.jsonl"),
        "gzip": str(tmp_path / "p.jsonl.gz"),
    }[where]
    items = _example_items()
    assert write_points_jsonl(uri, items) == 3
    back = read_points_jsonl(uri)
    assert list(back) == [42, 7, 9]
    for image_id, pts, *_ in items:
        got = back[image_id]
        assert got.xy.tobytes() == pts.xy.tobytes()
        assert got.segment.tolist() == pts.segment.tolist()
        assert got.category_id.tolist() == pts.category_id.tolist()
    if where == "gzip":
        first = gzip.decompress((tmp_path / "p.jsonl.gz").read_bytes()).decode().splitlines()[0]
    else:
        with fsspec.open(uri, "rt") as f:
            first = f.readline()
    assert first.startswith('{"image_id":42,"file_name":"000000000042.jpg","points":[{"x":0.1,"y":0.3333333333333333,')


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "bad_line,line,field,reason,image_id",
    [
        ('{"image_id": 3, "points": [}', 3, None, "invalid JSON", 3),
        ('{"image_id": 3, "points": [{"x": 1, "y": 2, "segment": 1}]}', 3, "points[0].category_id", "missing", 3),
        (
            '{"image_id": 3, "points": [{"x": 1, "y": "2", "segment": 1, "category_id": 1}]}',
            3,
            "points[0].y",
            "number",
            3,
        ),
        (
            '{"image_id": 3, "points": [{"x": 1, "y": 2, "segment": true, "category_id": 1}]}',
            3,
            "points[0].segment",
            "integer",
            3,
        ),
        ('{"image_id": "3", "points": []}', 3, "image_id", "integer", None),
        ('{"image_id": 3}', 3, "points", "missing", 3),
        ('{"image_id": 3, "points": [], "score": 1}', 3, "score", "unknown key", 3),
        ('[1, 2]', 3, None, "JSON object", None),
        ('{"image_id": 1, "points": []}', 3, "image_id", "already given on line 1", 1),
    ],
)
def test_jsonl_malformed_lines_named(tmp_path, bad_line, line, field, reason, image_id):
    good = '{"image_id": 1, "points": [{"x": 1.5, "y": 2, "segment": 1, "category_id": 1}]}'
    path = _write_lines(tmp_path / "bad.jsonl", [good, "", bad_line])
    with pytest.raises(PointsFileError) as e:
        read_points_jsonl(path, strict=True)
    err = e.value
    assert (err.line, err.field) == (line, field)
    assert reason in str(err) and path in str(err) and f"line {line}" in str(err)
    assert isinstance(err, ValueError)
    # non-strict: the same line is skipped and listed, the good line is kept
    lenient = read_points_jsonl(path)
    assert list(lenient) == [1] and len(lenient[1]) == 1
    (skipped,) = lenient.problems
    assert str(skipped) == str(err) and skipped.image_id == err.image_id == image_id


def test_jsonl_lenient_names_image_line_and_true_column(tmp_path):
    """A truncated line used to be reported at 'column 1' of a phantom next line; the
    column now counts on the line itself (1-based characters), and the image is named."""
    lines = [
        '{"image_id": 1, "points": [{"x": 1.5, "y": 2, "segment": 1, "category_id": 1}]}',
        '{"image_id": 2, "points": [',  # truncated: 27 characters
        '{"image_id": 3, "points": [{"x": 1, "y": "2", "segment": 1, "category_id": 1}]}',
        '{"image_id": 4, "points": [}',  # the bad character is the 28th
        '{"points": [], "image_id": 5} trailing',  # 'Extra data' at the 31st character
        '{"image_id": 1, "points": []}',  # repeated: the first line wins
        'garbage without an id',
    ]
    path = _write_lines(tmp_path / "p.jsonl", lines)
    got = read_points_jsonl(path)
    assert list(got) == [1] and len(got[1]) == 1
    by_line = {e.line: e for e in got.problems}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7]
    assert (by_line[2].image_id, by_line[2].field) == (2, None)
    assert "invalid JSON: Expecting value at column 28" in str(by_line[2])
    assert (by_line[3].image_id, by_line[3].field) == (3, "points[0].y")
    assert by_line[4].image_id == 4 and "Expecting value at column 28" in str(by_line[4])
    assert by_line[5].image_id == 5 and "Extra data at column 31" in str(by_line[5])
    assert by_line[6].image_id == 1 and "already given on line 1" in str(by_line[6])
    assert by_line[7].image_id is None and "at column 1" in str(by_line[7])
    assert f"{path}, line 2 (image 2): invalid JSON" in str(by_line[2])
    import pickle

    back = pickle.loads(pickle.dumps(by_line[3]))
    assert (back.line, back.field, back.image_id, str(back)) == (3, "points[0].y", 3, str(by_line[3]))


def test_jsonl_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "bom.jsonl"
    line = b'{"image_id": 8, "points": [{"x": 1, "y": 2, "segment": 1, "category_id": 1}]}\n'
    path.write_bytes(b"\xef\xbb\xbf" + line)
    got = read_points_jsonl(str(path), strict=True)
    assert list(got) == [8] and got[8].xy.tolist() == [[1.0, 2.0]] and got.problems == []


def test_jsonl_write_rejects_duplicates_and_keeps_nan_as_null(tmp_path):
    with pytest.raises(ValueError, match="image_id 1 given twice"):
        write_points_jsonl(str(tmp_path / "d.jsonl"), [(1, Points.empty()), (1, Points.empty())])
    write_points_jsonl(str(tmp_path / "n.jsonl"), [(4, Points([[0, 0], [np.nan, 1]], [1, 1], [1, 1]))])
    assert '"x":null' in (tmp_path / "n.jsonl").read_text()  # strict JSON, no NaN token
    back = read_points_jsonl(str(tmp_path / "n.jsonl"))[4]
    assert np.isnan(back.xy[1, 0]) and back.xy[1, 1] == 1 and back.xy[0].tolist() == [0, 0]
    with pytest.raises(FileNotFoundError):
        read_points_jsonl(str(tmp_path / "absent.jsonl"))
