"""PQ against the COCO reference implementation (panopticapi) and hand-worked cases.

Oracle: ``panopticapi.evaluation.pq_compute_single_core`` + ``PQStat.pq_average``
(the body of ``pq_compute`` without its process pool), run on the same COCO
panoptic files; one test also runs the full multiprocessing ``pq_compute``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pointseg.data.coco_panoptic_io import PanopticWriter, read_id_map, read_panoptic_annotations
from pointseg.data.record import Category
from pointseg.metrics import PQEvaluator, PQStat, evaluate_panoptic, pq_compute_files, pq_stat_image

panoptic_eval = pytest.importorskip("panopticapi.evaluation")

REPO = Path(__file__).resolve().parents[1]
SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-panoptic-samples"
needs_samples = pytest.mark.skipif(
    not (SAMPLES / "panoptic_examples.json").exists(),
    reason=f"shared COCO panoptic samples not found at {SAMPLES} (../shared/data is not part of the repo)",
)

TOL = 1e-9

# ---------------------------------------------------------------- oracle


def panopticapi_pq(gt_json, gt_folder, pred_json, pred_folder):
    """panopticapi's pq_compute on one core: (results, PQStat of panopticapi)."""
    gt = json.loads(Path(gt_json).read_text())
    pred = json.loads(Path(pred_json).read_text())
    categories = {el["id"]: el for el in gt["categories"]}
    pred_by_image = {el["image_id"]: el for el in pred["annotations"]}
    matched = [(a, pred_by_image[a["image_id"]]) for a in gt["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        stat = panoptic_eval.pq_compute_single_core(0, matched, str(gt_folder), str(pred_folder), categories)
    results = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        try:
            results[name], per_class = stat.pq_average(categories, isthing=isthing)
        except ZeroDivisionError:  # panopticapi divides by n = 0 for an empty group; we report nan
            results[name] = {"pq": math.nan, "sq": math.nan, "rq": math.nan, "n": 0}
            continue
        if name == "All":
            results["per_class"] = per_class
    return results, stat


def assert_matches_panopticapi(ours, ref, ref_stat):
    for name, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for m in ("pq", "sq", "rq"):
            if math.isnan(ref[name][m]):
                assert math.isnan(ours[m + suffix]), m + suffix
            else:
                assert abs(ours[m + suffix] - ref[name][m]) < TOL, (m + suffix, ours[m + suffix], ref[name][m])
        assert ours["n" + suffix] == ref[name]["n"]
    assert set(ours["per_class"]) == set(ref["per_class"])
    for cid, row in ref["per_class"].items():
        for m in ("pq", "sq", "rq"):
            assert abs(ours["per_class"][cid][m] - row[m]) < TOL, (cid, m)
        s = ref_stat.pq_per_cat[cid]
        assert (ours["per_class"][cid]["tp"], ours["per_class"][cid]["fp"], ours["per_class"][cid]["fn"]) == (
            s.tp,
            s.fp,
            s.fn,
        ), cid


# ---------------------------------------------------------------- synthetic panoptic data


def make_categories(n_things=5, n_stuff=4):
    cats = {}
    for i in range(1, n_things + 1):
        cats[i] = Category(i, f"thing{i}", True, (10 * i, 0, 0))
    for i in range(n_things + 1, n_things + n_stuff + 1):
        cats[i] = Category(i, f"stuff{i}", False, (0, 10 * i, 0))
    return cats


def _blob(rng, h, w):
    """A random rectangle or ellipse mask."""
    y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
    bh, bw = rng.integers(4, max(5, h // 2)), rng.integers(4, max(5, w // 2))
    if rng.random() < 0.5:
        m = np.zeros((h, w), bool)
        m[y0 : y0 + bh, x0 : x0 + bw] = True
        return m
    yy, xx = np.mgrid[:h, :w]
    return ((yy - y0) / (bh / 2 + 1)) ** 2 + ((xx - x0) / (bw / 2 + 1)) ** 2 <= 1


def _segments_of(id_map, segs):
    present = set(np.unique(id_map).tolist())
    return [s for s in segs if s["id"] in present]


def _new_id(rng, used):
    while True:
        i = int(rng.integers(1, 256**3))
        if i not in used:
            used.add(i)
            return i


def random_scene(rng, cats, h=48, w=64):
    """Ground truth: stuff regions, overlapping things (some crowd), VOID holes."""
    things = [c for c in cats if cats[c].isthing]
    stuff = [c for c in cats if not cats[c].isthing]
    id_map = np.zeros((h, w), np.int64)
    segs, used = [], set()
    cuts = np.sort(rng.integers(0, h, size=rng.integers(1, 4)))
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, h]):
        sid = _new_id(rng, used)
        id_map[lo:hi] = sid
        segs.append({"id": sid, "category_id": int(rng.choice(stuff)), "iscrowd": 0})
    for _ in range(rng.integers(2, 8)):
        sid = _new_id(rng, used)
        id_map[_blob(rng, h, w)] = sid
        segs.append({"id": sid, "category_id": int(rng.choice(things)), "iscrowd": int(rng.random() < 0.2)})
    for _ in range(rng.integers(0, 3)):
        id_map[_blob(rng, h, w)] = 0
    return id_map, _segments_of(id_map, segs)


def perturb(rng, id_map, segs, cats):
    """A prediction made from the ground truth by random edits (all seeded)."""
    h, w = id_map.shape
    pred = np.zeros_like(id_map)
    out, used = [], {s["id"] for s in segs}
    for s in segs:
        m = id_map == s["id"]
        cat = s["category_id"]
        op = rng.choice(["keep", "erode", "dilate", "shift", "drop", "relabel"], p=[0.2, 0.15, 0.15, 0.25, 0.1, 0.15])
        if op == "drop":
            continue
        if op == "erode":
            m = ndimage.binary_erosion(m, iterations=int(rng.integers(1, 4)))
        elif op == "dilate":
            m = ndimage.binary_dilation(m, iterations=int(rng.integers(1, 4)))
        elif op == "shift":
            m = np.roll(m, (int(rng.integers(-6, 7)), int(rng.integers(-6, 7))), axis=(0, 1))
        elif op == "relabel":
            cat = int(rng.choice(list(cats)))
        if s.get("iscrowd") and rng.random() < 0.7:
            # a prediction on a crowd region: same class (ignored if >half inside) or another one
            keep_cat = rng.random() < 0.7
            cat = s["category_id"] if keep_cat else int(rng.choice(list(cats)))
            if rng.random() < 0.5:
                m = m & (rng.random(m.shape) < rng.uniform(0.3, 1.0)) | (_blob(rng, h, w) & (rng.random() < 0.5))
        sid = _new_id(rng, used)
        pred[m] = sid
        out.append({"id": sid, "category_id": cat, "iscrowd": 0})
    # merge two predicted segments into one
    present = _segments_of(pred, out)
    if len(present) >= 2 and rng.random() < 0.6:
        a, b = rng.choice(len(present), 2, replace=False)
        pred[pred == present[b]["id"]] = present[a]["id"]
    # fake segments, one of them often inside VOID
    for _ in range(rng.integers(0, 3)):
        sid = _new_id(rng, used)
        m = _blob(rng, h, w)
        if rng.random() < 0.5 and (id_map == 0).any():
            m = m | ((id_map == 0) & (rng.random((h, w)) < 0.9))
        pred[m] = sid
        out.append({"id": sid, "category_id": int(rng.choice(list(cats))), "iscrowd": 0})
    return pred, _segments_of(pred, out)


def write_dataset(root, cats, items):
    """items: list of (image_id, id_map, segments_info) -> (json path, png folder)."""
    with PanopticWriter(str(root), cats) as wr:
        for image_id, id_map, segs in items:
            wr.add(image_id, f"{image_id:012d}.jpg", id_map, segs)
    return root / "panoptic.json", root / "panoptic"


# ---------------------------------------------------------------- tests: reference equality


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_random_data_equals_panopticapi(tmp_path, seed):
    rng = np.random.default_rng(seed)
    cats = make_categories()
    gt_items, pred_items = [], []
    for image_id in range(1, 7):
        gt_map, gt_segs = random_scene(rng, cats)
        if image_id == 6:  # an unrelated prediction: mostly FP/FN
            pred_map, pred_segs = random_scene(rng, cats)
        else:
            pred_map, pred_segs = perturb(rng, gt_map, gt_segs, cats)
        gt_items.append((image_id, gt_map, gt_segs))
        pred_items.append((image_id, pred_map, pred_segs))
    gt_json, gt_dir = write_dataset(tmp_path / "gt", cats, gt_items)
    pred_json, pred_dir = write_dataset(tmp_path / "pred", cats, pred_items)

    ref, ref_stat = panopticapi_pq(gt_json, gt_dir, pred_json, pred_dir)
    ours = pq_compute_files(str(gt_json), str(gt_dir), str(pred_json), str(pred_dir), progress=False)
    assert_matches_panopticapi(ours, ref, ref_stat)
    assert ours["num_images"] == 6 and ours["missing_predictions"] == []
    # the data must exercise the rules, or the comparison proves little
    totals = ref_stat.pq_per_cat
    assert sum(s.tp for s in totals.values()) > 0
    assert sum(s.fp for s in totals.values()) > 0
    assert sum(s.fn for s in totals.values()) > 0


def _sample_predictions(rng, gt_anns, gt_dir, cats):
    items = []
    for image_id, ann in gt_anns.items():
        gt_map = read_id_map(str(gt_dir), ann["file_name"])
        segs = ann["segments_info"]
        pred, pred_segs = perturb(rng, gt_map, segs, cats)
        # crowd overlap on purpose: a same-class segment covering each crowd region plus a margin
        used = {s["id"] for s in pred_segs} | set(np.unique(pred).tolist())
        for s in segs:
            if s["iscrowd"]:
                sid = _new_id(rng, used)
                pred[ndimage.binary_dilation(gt_map == s["id"], iterations=2)] = sid
                pred_segs.append({"id": sid, "category_id": s["category_id"], "iscrowd": 0})
        items.append((image_id, pred, _segments_of(pred, pred_segs)))
    return items


@needs_samples
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_samples_equal_panopticapi(tmp_path, seed):
    gt_json, gt_dir = SAMPLES / "panoptic_examples.json", SAMPLES / "panoptic_examples"
    cats, _, gt_anns = read_panoptic_annotations(str(gt_json))
    rng = np.random.default_rng(100 + seed)
    pred_json, pred_dir = write_dataset(tmp_path / "pred", cats, _sample_predictions(rng, gt_anns, gt_dir, cats))

    ref, ref_stat = panopticapi_pq(gt_json, gt_dir, pred_json, pred_dir)
    ours = pq_compute_files(str(gt_json), str(gt_dir), str(pred_json), str(pred_dir), progress=False)
    assert_matches_panopticapi(ours, ref, ref_stat)
    assert ours["n_th"] > 0 and ours["n_st"] > 0


@needs_samples
def test_coco_samples_full_pq_compute(tmp_path):
    """The multiprocessing entry point itself, not only its single-core body."""
    gt_json, gt_dir = SAMPLES / "panoptic_examples.json", SAMPLES / "panoptic_examples"
    cats, _, gt_anns = read_panoptic_annotations(str(gt_json))
    rng = np.random.default_rng(7)
    pred_json, pred_dir = write_dataset(tmp_path / "pred", cats, _sample_predictions(rng, gt_anns, gt_dir, cats))
    with contextlib.redirect_stdout(io.StringIO()):
        ref = panoptic_eval.pq_compute(str(gt_json), str(pred_json), str(gt_dir), str(pred_dir))
    ours = pq_compute_files(str(gt_json), str(gt_dir), str(pred_json), str(pred_dir), progress=False)
    for name, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for m in ("pq", "sq", "rq"):
            assert abs(ours[m + suffix] - ref[name][m]) < TOL
    for cid, row in ref["per_class"].items():
        assert abs(ours["per_class"][cid]["pq"] - row["pq"]) < TOL


@needs_samples
def test_coco_samples_gt_against_itself():
    gt_json, gt_dir = str(SAMPLES / "panoptic_examples.json"), str(SAMPLES / "panoptic_examples")
    ours = pq_compute_files(gt_json, gt_dir, gt_json, gt_dir, progress=False)
    assert ours["pq"] == ours["sq"] == ours["rq"] == 1.0
    # 142238: 15 things + 3 stuff, 439180: 28 things + 4 stuff; crowd never counts
    tp = sum(r["tp"] for r in ours["per_class"].values())
    assert tp == 18 + 32 - 3


# ---------------------------------------------------------------- tests: hand-worked rules


def _cats():
    return {1: Category(1, "person", True), 2: Category(2, "car", True), 3: Category(3, "sky", False)}


def test_hand_worked_iou_with_void_subtraction():
    # gt: person 12 px (rows 0-2, cols 0-3), VOID at rows 3, cols 0-3
    gt = np.zeros((6, 6), np.int64)
    gt[0:3, 0:4] = 1
    gt[4:6, :] = 2  # sky, 12 px
    pred = np.zeros_like(gt)
    pred[1:4, 0:4] = 7  # person: 8 px on gt person, 4 px on VOID
    pred[4:6, :3] = 8  # sky, 6 of 12 px -> IoU exactly 0.5, not a match
    gi = [{"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 3, "iscrowd": 0}]
    pi = [{"id": 7, "category_id": 1}, {"id": 8, "category_id": 3}]
    stat = pq_stat_image(gt, gi, pred, pi, _cats())
    # person IoU = 8 / (12 + 12 - 8 - 4) = 2/3 > 0.5
    assert stat[1].tp == 1 and stat[1].fp == 0 and stat[1].fn == 0
    assert stat[1].iou == pytest.approx(2 / 3, abs=1e-15)
    # sky IoU = 6 / (6 + 12 - 6) = 0.5: not > 0.5, so 1 FN and 1 FP
    assert (stat[3].tp, stat[3].fp, stat[3].fn) == (0, 1, 1)
    ev = PQEvaluator(_cats())
    ev.process(gt, gi, pred, pi)
    r = ev.evaluate()
    # person PQ = (2/3)/1; sky PQ = 0/(0+.5+.5) = 0; car absent -> skipped
    assert r["n"] == 2 and r["n_th"] == 1 and r["n_st"] == 1
    assert r["pq"] == pytest.approx((2 / 3 + 0) / 2, abs=1e-15)
    assert r["sq_th"] == pytest.approx(2 / 3) and r["rq_st"] == 0.0
    assert r["per_class"][2] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 0, "fn": 0}


def test_crowd_region_absorbs_same_class_prediction_only():
    gt = np.zeros((4, 8), np.int64)
    gt[:, :4] = 5  # crowd of persons
    gi = [{"id": 5, "category_id": 1, "iscrowd": 1}]
    pred = np.zeros_like(gt)
    pred[:, 1:6] = 9  # 20 px: 12 on the crowd (cols 1-3), 8 on VOID (cols 4-5)
    # same class: (8 VOID + 12 crowd) / 20 > 0.5 -> ignored; the crowd itself is never a FN
    stat = pq_stat_image(gt, gi, pred, [{"id": 9, "category_id": 1}], _cats())
    assert (stat[1].tp, stat[1].fp, stat[1].fn) == (0, 0, 0)
    # a car on the person crowd: only VOID counts, 8/20 = 0.4 -> FP
    stat = pq_stat_image(gt, gi, pred, [{"id": 9, "category_id": 2}], _cats())
    assert (stat[2].fp, stat[1].fn) == (1, 0)


def test_ignore_fraction_must_exceed_half():
    gt = np.zeros((2, 10), np.int64)
    gt[:, 5:] = 3
    gi = [{"id": 3, "category_id": 3}]
    pred = np.full_like(gt, 4)  # 20 px, exactly 10 on VOID: 0.5 is not > 0.5 -> FP
    stat = pq_stat_image(gt, gi, pred, [{"id": 4, "category_id": 2}], _cats())
    assert stat[2].fp == 1
    pred[0, 5] = 0  # 19 px, 10 on VOID -> ignored
    stat = pq_stat_image(gt, gi, pred, [{"id": 4, "category_id": 2}], _cats())
    assert stat[2].fp == 0


def _edit_and_compare(tmp_path, cats, gt_items, pred_items, edit_gt_json):
    gt_json, gt_dir = write_dataset(tmp_path / "gt", cats, gt_items)
    pred_json, pred_dir = write_dataset(tmp_path / "pred", cats, pred_items)
    data = json.loads(gt_json.read_text())
    edit_gt_json(data)
    gt_json.write_text(json.dumps(data))
    ref, ref_stat = panopticapi_pq(gt_json, gt_dir, pred_json, pred_dir)
    ours = pq_compute_files(str(gt_json), str(gt_dir), str(pred_json), str(pred_dir), progress=False)
    assert_matches_panopticapi(ours, ref, ref_stat)
    return ours


def test_gt_area_is_taken_from_json_like_panopticapi(tmp_path):
    """panopticapi puts the JSON ``area`` of a gt segment in the union, not its pixel count."""
    rng = np.random.default_rng(21)
    cats = make_categories()
    gt_items, pred_items = [], []
    for image_id in range(4):
        g, gs = random_scene(rng, cats)
        p, ps = perturb(rng, g, gs, cats)
        gt_items.append((image_id, g, gs))
        pred_items.append((image_id, p, ps))

    def scale_areas(data):
        for ann in data["annotations"]:
            for seg in ann["segments_info"]:
                seg["area"] = int(seg["area"] * rng.uniform(0.6, 1.3))

    _edit_and_compare(tmp_path, cats, gt_items, pred_items, scale_areas)


def test_last_crowd_region_of_a_class_wins_like_panopticapi(tmp_path):
    """With two crowd regions of one class, panopticapi only credits the last listed one."""
    cats = _cats()
    gt = np.zeros((8, 8), np.int64)
    gt[:4, :4], gt[4:, 4:], gt[:4, 4:] = 11, 12, 13
    gs = [{"id": 11, "category_id": 1, "iscrowd": 1}, {"id": 12, "category_id": 1, "iscrowd": 1},
          {"id": 13, "category_id": 3, "iscrowd": 0}]
    pred = np.zeros_like(gt)
    pred[:4, :4] = 21  # on the first crowd: a FP, because only crowd 12 is looked at
    ps = [{"id": 21, "category_id": 1}]
    ours = _edit_and_compare(tmp_path / "a", cats, [(1, gt, gs)], [(1, pred, ps)], lambda d: None)
    assert ours["per_class"][1]["fp"] == 1 and ours["per_class"][3]["fn"] == 1
    pred[:4, :4], pred[4:, 4:] = 0, 22  # on the last crowd: ignored
    ps = [{"id": 22, "category_id": 1}]
    ours = _edit_and_compare(tmp_path / "b", cats, [(1, gt, gs)], [(1, pred, ps)], lambda d: None)
    assert ours["per_class"][1]["fp"] == 0


def test_errors_name_image_and_segment():
    gt = np.zeros((3, 3), np.int64)
    pred = np.ones((3, 3), np.int64)
    with pytest.raises(ValueError, match=r"image 42: predicted segment 1 has unknown category_id 99"):
        pq_stat_image(gt, [], pred, [{"id": 1, "category_id": 99}], _cats(), image_id=42)
    with pytest.raises(ValueError, match=r"image 42: predicted segment ids \[1\] are in the id map"):
        pq_stat_image(gt, [], pred, [], _cats(), image_id=42)
    with pytest.raises(ValueError, match=r"ids \[4\] are in segments_info but not in the id map"):
        pq_stat_image(gt, [], pred, [{"id": 1, "category_id": 1}, {"id": 4, "category_id": 1}], _cats(), image_id=42)


def test_pqstat_merges_through_json_like_ray_rows():
    rng = np.random.default_rng(11)
    cats = make_categories()
    ev = PQEvaluator(cats)
    merged = PQEvaluator(cats)
    for i in range(5):
        g, gs = random_scene(rng, cats)
        p, ps = perturb(rng, g, gs, cats)
        ev.process(g, gs, p, ps, image_id=i)
        row = json.loads(json.dumps(pq_stat_image(g, gs, p, ps, cats, image_id=i).to_dict()))
        merged.add_stat(row)
    assert ev.evaluate() == merged.evaluate()
    assert PQStat.from_dict(ev.stat.to_dict()) == ev.stat
    ev.reset()
    assert ev.num_images == 0 and ev.stat.per_cat == {}


def test_missing_prediction_counts_as_fn_or_raises_in_memory_fs():
    rng = np.random.default_rng(3)
    cats = make_categories()
    scenes = [random_scene(rng, cats) for _ in range(3)]
    gt_root, pred_root = "memory://pq-missing/gt", "memory://pq-missing/pred"
    with PanopticWriter(gt_root, cats) as wr:
        for i, (m, s) in enumerate(scenes):
            wr.add(i, f"im{i}.jpg", m, s)
    with PanopticWriter(pred_root, cats) as wr:
        for i, (m, s) in enumerate(scenes[:2]):  # image 2 has no prediction
            wr.add(i, f"im{i}.jpg", m, s)
    args = (f"{gt_root}/panoptic.json", f"{gt_root}/panoptic", f"{pred_root}/panoptic.json", f"{pred_root}/panoptic")
    with pytest.warns(UserWarning, match="1 of 3 images have no prediction"):
        r = pq_compute_files(*args, progress=False)
    assert r["missing_predictions"] == [2]
    n_fn = sum(1 for s in scenes[2][1] if not s["iscrowd"])
    assert sum(c["fn"] for c in r["per_class"].values()) == n_fn
    assert sum(c["fp"] for c in r["per_class"].values()) == 0
    with pytest.raises(ValueError, match="no prediction for image 2"):
        pq_compute_files(*args, missing="raise", progress=False)


def test_things_only_data_gives_nan_stuff_mean():
    cats = _cats()
    gt = np.zeros((4, 4), np.int64)
    gt[:2] = 1
    gi = [{"id": 1, "category_id": 1}]
    ev = PQEvaluator(cats)
    ev.process(gt, gi, gt, gi)
    r = ev.evaluate()
    assert r["pq"] == 1.0 and r["n_st"] == 0 and math.isnan(r["pq_st"])


def test_cli_prints_pq_and_miou(tmp_path):
    rng = np.random.default_rng(5)
    cats = make_categories()
    g, gs = random_scene(rng, cats)
    p, ps = perturb(rng, g, gs, cats)
    gt_json, gt_dir = write_dataset(tmp_path / "gt", cats, [(1, g, gs)])
    pred_json, pred_dir = write_dataset(tmp_path / "pred", cats, [(1, p, ps)])
    out = subprocess.run(
        [sys.executable, str(REPO / "flows" / "evaluate.py"), "--gt-json", str(gt_json), "--gt-dir", str(gt_dir),
         "--pred-json", str(pred_json), "--pred-dir", str(pred_dir), "--no-progress"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )
    printed = json.loads(out.stdout)
    lib = evaluate_panoptic(str(gt_json), str(gt_dir), str(pred_json), str(pred_dir), progress=False)
    ref, _ = panopticapi_pq(gt_json, gt_dir, pred_json, pred_dir)
    assert abs(printed["pq"]["pq"] - ref["All"]["pq"]) < TOL
    assert printed["miou"]["miou"] == pytest.approx(lib["miou"]["miou"], abs=1e-12)
