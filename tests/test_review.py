"""The review page's data: per-image table, worst-first order, suggestions file, failed images, shards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import fsspec
import numpy as np
import pytest
from conftest import ROOT, label_run

from pointseg.data.coco_panoptic_io import read_id_map, read_panoptic_annotations
from pointseg.data.panoptic_format import decode_png
from pointseg.data.points import read_points_jsonl
from pointseg.data.record import Category
from pointseg.data.shards import SHARD_SCHEMA, decode_uncertainty, iter_verified_rows
from pointseg.metrics import PQEvaluator
from pointseg.review.page import write_review
from pointseg.review.table import image_quality, sort_key, worst_first


@pytest.fixture(scope="module")
def run(review_run):
    out, cats = review_run
    return out, cats, json.loads((out / "report.json").read_text())["review"]


def test_shards_have_the_pipeline_columns_and_uncertainty(run):
    out, _, _ = run
    rows = list(iter_verified_rows(str(out / "shards")))
    assert set(rows[0]) == set(SHARD_SCHEMA.names)
    ok = [r for r in rows if not r["error"]]
    assert len(ok) == 8 and len(rows) == 9  # 10 images: one never labelled, one broken
    u = decode_uncertainty(ok[0]["uncertainty_png"])
    assert u.shape == decode_png(ok[0]["label_png"]).shape and 0 <= u.min() and u.max() <= 1
    assert [r["error"].split(":")[0] for r in rows if r["error"]] == ["decode"]


def test_per_image_table_scores_equal_an_independent_evaluation(run):
    out, cats, result = run
    rows = {r["image_id"]: r for r in result["per_image"]}
    assert len(rows) == 10 and result["images"] == 10 and result["failed"] == 2
    assert rows[3]["stage"] == "decode" and "decode" in rows[3]["error"]
    assert rows[7]["stage"] == "missing" and rows[7]["pq"] == 0.0  # no label: every segment missed
    _, _, gt = read_panoptic_annotations(str(out / "gt" / "panoptic.json"))
    shard = {r["image_id"]: r for r in iter_verified_rows(str(out / "shards")) if not r["error"]}
    total = PQEvaluator(cats)
    for image_id, s in shard.items():
        gt_map = read_id_map(str(out / "gt" / "panoptic"), gt[image_id]["file_name"])
        pred, info = decode_png(s["label_png"]), json.loads(s["segments_info"])
        one = PQEvaluator(cats)
        one.process(gt_map, gt[image_id]["segments_info"], pred, info)
        assert rows[image_id]["pq"] == pytest.approx(one.evaluate()["pq"], abs=1e-4)
        total.process(gt_map, gt[image_id]["segments_info"], pred, info)
        u = decode_uncertainty(s["uncertainty_png"])
        assert rows[image_id]["uncertainty_mean"] == pytest.approx(float(u.mean()), abs=1e-4)
        assert rows[image_id]["fp"] + rows[image_id]["fn"] + rows[image_id]["tp"] > 0
    assert result["correlation"]["images"] == 8


def test_image_quality_best_iou_by_hand():
    cats = {1: Category(1, "a", True), 2: Category(2, "bg", False)}
    gt = np.zeros((4, 4), int)
    gt[:2, :2] = 5  # a thing of 4 px
    gt[2:, :] = 9  # stuff
    gt_info = [{"id": 5, "category_id": 1}, {"id": 9, "category_id": 2}]
    pred = np.zeros((4, 4), int)
    pred[:2, :3] = 1  # 6 px: the thing and 2 VOID pixels
    q = image_quality(gt, gt_info, pred, [{"id": 1, "category_id": 1}], cats)
    assert q["mean_best_iou"] == pytest.approx(4 / 6)  # plain IoU
    # PQ leaves the prediction's VOID pixels out of the union: IoU 4 / (6 + 4 - 4 - 2) = 1; stuff missed: 0
    assert q["pq"] == pytest.approx((1 + 0) / 2)
    assert (q["tp"], q["fp"], q["fn"]) == (1, 0, 1)


def test_worst_first_order():
    rows = [{"image_id": 1, "error": "", "pq": 0.5, "uncertainty_mean": 0.2, "mean_best_iou": 0.1},
            {"image_id": 2, "error": "", "pq": 0.5, "uncertainty_mean": 0.4, "mean_best_iou": None},
            {"image_id": 3, "error": "decode: x", "pq": None, "uncertainty_mean": None, "mean_best_iou": None},
            {"image_id": 4, "error": "", "pq": None, "uncertainty_mean": 0.9, "mean_best_iou": 0.3},
            {"image_id": 5, "error": "", "pq": 0.1, "uncertainty_mean": None, "mean_best_iou": 0.2}]
    ids = lambda by: [r["image_id"] for r in worst_first(rows, by)]  # noqa: E731
    assert ids("pq") == [3, 5, 2, 1, 4]  # failed; PQ up (tie: more uncertain first); no PQ last
    assert ids(None) == ids("pq")
    assert ids("uncertainty") == [3, 4, 2, 1, 5]
    assert ids("best_iou") == [3, 1, 5, 4, 2]
    assert ids("image_id") == [1, 2, 3, 4, 5]
    no_gt = [{**r, "pq": None} for r in rows]
    assert [r["image_id"] for r in worst_first(no_gt)] == ids("uncertainty")
    with pytest.raises(ValueError, match="unknown sort"):
        sort_key(rows[0], "colour")


def test_default_order_of_the_table_is_worst_first(run):
    _, _, result = run
    rows = result["per_image"]
    assert result["sort"] == "pq"
    assert rows == worst_first(rows, "pq")
    assert {rows[0]["image_id"], rows[1]["image_id"]} == {3, 7}  # failed first


def test_suggestions_file_is_valid_point_labels(run):
    out, cats, result = run
    sugg = read_points_jsonl(result["suggestions"])
    assert set(sugg) == {r["image_id"] for r in result["per_image"] if not r["error"]}
    clicks = {}
    for line in (out / "points.jsonl").read_text().splitlines():
        row = json.loads(line)
        clicks[row["image_id"]] = {(p["segment"], p["category_id"]) for p in row["points"]}
    for image_id, pts in sugg.items():
        assert 1 <= len(pts) <= 2
        assert (pts.xy >= 0).all() and (pts.xy < 48).all()
        # each suggestion names a clicked segment of the image (the one it would join) and its class
        assert {(int(s), int(c)) for s, c in zip(pts.segment, pts.category_id)} <= clicks[image_id]


def test_page_files_and_per_image_json(run):
    out, _, result = run
    review = out / "review"
    html = (review / "index.html").read_text()
    assert '<script src="data.js"></script>' in html and "http" not in html.replace("http://www.w3.org/2000/svg", "")
    data = json.loads((review / "data.js").read_text().removeprefix("window.REVIEW = ").rstrip().rstrip(";"))
    assert [r["id"] for r in data["rows"]] == [r["image_id"] for r in result["per_image"]]
    assert json.loads((review / "per_image.json").read_text()) == result["per_image"]
    labelled = [r["image_id"] for r in result["per_image"] if not r["error"]]
    for kind in ("thumb", "img", "label", "unc", "gt"):
        assert {int(p.stem) for p in (review / "a" / kind).glob("*.jpg")} >= set(labelled)
    assert not (review / "a" / "img" / "3.jpg").exists()  # the unreadable image
    chunk = (review / "details" / "chunk-00000.js").read_text()
    assert chunk.startswith("window.reviewDetails(0, ")


def test_review_flow_cli(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run[0], out)  # the browser test reads the original page
    res = subprocess.run([sys.executable, str(ROOT / "flows" / "review.py"), "--output", str(out), "--page-size", "3"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary["images"] == 10 and summary["failed"] == 2 and summary["index"].endswith("review/index.html")


def test_a_run_in_an_fsspec_bucket_gets_its_page_there():
    out = "memory://review-bucket/run"
    label_run(out, 3, 32)
    result = write_review(out, progress=False)
    fs = fsspec.filesystem("memory")
    assert result["index"] == f"{out}/review/index.html" and fs.exists("/review-bucket/run/review/index.html")
    assert len(fs.find("/review-bucket/run/review/a/thumb")) == 3
    assert fs.exists("/review-bucket/run/suggestions.jsonl") and result["sort"] == "pq"
    fs.rm("/review-bucket", recursive=True)
