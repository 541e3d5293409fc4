"""Semantic mIoU: a hand-worked case and an independent whole-dataset computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pointseg.data.record import Category
from pointseg.metrics import MIoUEvaluator

CATS = {1: Category(1, "person", True), 2: Category(2, "car", True), 5: Category(5, "sky", False)}


def test_hand_worked_example():
    # gt (ids): 1 = person, 2 = crowd car, 3 = sky, 0 = VOID
    gt = np.array([[1, 1, 3, 3],
                   [1, 1, 3, 3],
                   [2, 2, 0, 0]])
    gi = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2, "iscrowd": 1}, {"id": 3, "category_id": 5}]
    pred = np.array([[7, 0, 7, 8],
                     [7, 8, 8, 8],
                     [9, 9, 8, 7]])
    pi = [{"id": 7, "category_id": 1}, {"id": 8, "category_id": 5}, {"id": 9, "category_id": 2}]
    ev = MIoUEvaluator(CATS)
    ev.process(gt, gi, pred, pi)
    r = ev.evaluate()
    # crowd row and VOID row are ignored. person: gt 4 px, predicted person on (0,0),(1,0),(0,2) -> tp 2,
    # union = 4 + 3 - 2 = 5 (the unlabeled (0,1) is a miss). sky: gt 4, pred sky (1,1),(0,3),(1,2),(1,3) -> tp 3,
    # union = 4 + 4 - 3 = 5. car: only on ignored pixels -> absent -> nan.
    assert r["per_class"][1] == {"iou": 2 / 5, "tp": 2, "gt": 4, "pred": 3}
    assert r["per_class"][5] == {"iou": 3 / 5, "tp": 3, "gt": 4, "pred": 4}
    assert math.isnan(r["per_class"][2]["iou"])
    assert r["miou"] == pytest.approx((2 / 5 + 3 / 5) / 2)
    assert r["miou_th"] == pytest.approx(2 / 5) and r["miou_st"] == pytest.approx(3 / 5)
    assert r["pixel_accuracy"] == pytest.approx(5 / 8) and r["n"] == 2


def _random_pair(rng, h=30, w=40):
    gt = rng.integers(0, 6, (h, w))  # 0 = VOID
    gi = [{"id": i, "category_id": int(rng.choice(list(CATS))), "iscrowd": int(rng.random() < 0.2)} for i in range(1, 6)]
    pred = rng.integers(0, 5, (h, w)) * 10  # 0 = unlabeled
    pi = [{"id": i, "category_id": int(rng.choice(list(CATS)))} for i in range(10, 50, 10)]
    return gt, gi, pred, pi


def test_streaming_equals_whole_dataset_boolean_masks():
    rng = np.random.default_rng(0)
    ev = MIoUEvaluator(CATS)
    gts, preds = [], []
    for i in range(6):
        gt, gi, pred, pi = _random_pair(rng)
        ev.process(gt, gi, pred, pi, image_id=i)
        # independent per-pixel conversion: -1 = ignored / unlabeled
        g_cat = {s["id"]: (-1 if s.get("iscrowd") else s["category_id"]) for s in gi}
        p_cat = {s["id"]: s["category_id"] for s in pi}
        gts.append(np.vectorize(lambda v: g_cat.get(v, -1))(gt).ravel())
        preds.append(np.vectorize(lambda v: p_cat.get(v, -1))(pred).ravel())
    g, p = np.concatenate(gts), np.concatenate(preds)
    valid = g != -1
    r = ev.evaluate()
    ious = []
    for c in CATS:
        inter = np.sum((g == c) & (p == c) & valid)
        union = np.sum(((g == c) | (p == c)) & valid)
        if union:
            ious.append(inter / union)
            assert r["per_class"][c]["iou"] == pytest.approx(inter / union, abs=1e-12)
    assert r["miou"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert r["num_images"] == 6
    merged = MIoUEvaluator(CATS)
    merged.add_confusion(ev.confusion, num_images=6)
    assert merged.evaluate()["miou"] == r["miou"]


def test_unknown_predicted_category_raises():
    ev = MIoUEvaluator(CATS)
    gt = np.zeros((2, 2), np.int64)
    with pytest.raises(ValueError, match="image 4: segment 1 has unknown category_id 99"):
        ev.process(gt, [], np.ones_like(gt), [{"id": 1, "category_id": 99}], image_id=4)
