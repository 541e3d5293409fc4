"""In-process labelling and scoring (pointseg.evaluation) against independent oracles.

Oracles: ``panopticapi.evaluation.pq_compute`` on COCO panoptic files written
with :class:`~pointseg.data.coco_panoptic_io.PanopticWriter` (a failed image's
prediction written as an empty PNG: all its segments false negatives),
pycocotools ``COCOeval`` called directly on RLEs of the same masks, and hand
computations on an 8x10 toy set.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pointseg.data.coco_panoptic_io import PanopticWriter
from pointseg.data.prepare import join, write_index
from pointseg.data.record import Category
from pointseg.evaluation import (GroundTruth, comparison_sheet, contrasting_images, evaluate_generator, label_rows,
                                 labels_by_id, score, split_rows)
from pointseg.generators.base import (
    PseudoLabel,
    PseudoLabelGenerator,
    TrainableGenerator,
    TrainableGeneratorConfig,
    assemble,
    seed_groups,
)
from pointseg.train.engine import EngineConfig, Trainable
from pointseg.train.rows import IndexCollate

panoptic_eval = pytest.importorskip("panopticapi.evaluation")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

H, W = 8, 10
CATS = {1: Category(1, "thing_a", True, (200, 0, 0)), 2: Category(2, "thing_b", True, (0, 200, 0)),
        3: Category(3, "road", False, (0, 0, 200))}
TOL = 1e-9


def _rect(m, rows, cols, v):
    m[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = v


def toy_set():
    """``{image_id: (gt_map, gt_info, pred_map, pred_info)}``; pred None = the generator raises.

    Image 1: void column 0; things g1 (a, 4x4), g2 (a, 4x5), a crowd of b; road elsewhere.
      p1 covers g1 plus the 4 void pixels beside it (PQ IoU 1, plain IoU 16/20); p2 is 12 of
      g2's 20 pixels (IoU 0.6, TP); p3 (b) lies 6 of 9 pixels on b's crowd (not a FP).
    Image 2: thing b predicted with the right pixels but class a (FN for b, FP for a).
    Image 3: the generator raises. Image 4: its image file is missing. Image 5: the label
      has an id missing from its segments_info.
    """
    out = {}
    g = np.full((H, W), 4, np.int32)
    g[:, 0] = 0
    _rect(g, (0, 3), (1, 4), 1)
    _rect(g, (4, 7), (5, 9), 2)
    _rect(g, (0, 1), (7, 9), 3)
    gi = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1}, {"id": 3, "category_id": 2, "iscrowd": 1},
          {"id": 4, "category_id": 3}]
    p = np.full((H, W), 4, np.int32)
    _rect(p, (0, 3), (0, 4), 1)
    _rect(p, (4, 7), (5, 7), 2)
    _rect(p, (0, 2), (7, 9), 3)
    pi = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1}, {"id": 3, "category_id": 2},
          {"id": 4, "category_id": 3}]
    out[1] = (g, gi, p, pi)
    g = np.full((H, W), 2, np.int32)
    _rect(g, (2, 5), (2, 5), 1)
    out[2] = (g, [{"id": 1, "category_id": 2}, {"id": 2, "category_id": 3}], g.copy(),
              [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 3}])
    for image_id, (rows, cols, cat) in {3: ((0, 2), (0, 2), 1), 4: ((1, 3), (1, 3), 2), 5: ((3, 5), (3, 5), 1)}.items():
        g = np.full((H, W), 2, np.int32)
        _rect(g, rows, cols, 1)
        info = [{"id": 1, "category_id": cat}, {"id": 2, "category_id": 3}]
        bad = np.where(g == 1, 7, g)  # image 5: id 7 is not in segments_info
        out[image_id] = (g, info, bad if image_id == 5 else None, info if image_id == 5 else None)
    return out


def write_toy(root: Path):
    """Images (image k filled with red 10*k; image 4 missing), gt/, index/ under ``root``; P1 points."""
    data = toy_set()
    rows = []
    with PanopticWriter(str(root / "gt"), CATS) as gt:
        for image_id, (g, gi, _, _) in data.items():
            gt.add(image_id, f"{image_id:04d}.png", g, gi)
            uri = str(root / "images" / f"{image_id:04d}.png")
            if image_id != 4:
                (root / "images").mkdir(exist_ok=True)
                Image.fromarray(np.full((H, W, 3), (10 * image_id, 0, 0), np.uint8)).save(uri)
            points = []
            for s in gi:
                if s.get("iscrowd"):
                    continue
                r, c = np.argwhere(g == s["id"])[0]
                points.append({"x": float(c), "y": float(r), "segment": s["id"], "category_id": s["category_id"]})
            if image_id == 1:  # outside the image: dropped by validate_points before the generator sees it
                points.append({"x": 50.0, "y": 1.0, "segment": 9, "category_id": 1})
            rows.append({"image_id": image_id, "file_name": uri, "height": H, "width": W,
                         "points": json.dumps(points), "error": ""})
    write_index(str(root / "index" / "index.parquet"), rows[::-1])  # index order is not id order
    return data, rows


class Canned(PseudoLabelGenerator):
    """Returns the toy predictions (image k is recognised by its red value 10*k); batched ``__call__``
    that records the size of every call and fails a whole batch holding image 3."""

    name = "canned"

    def __init__(self, config, categories, data=None):
        super().__init__(config, categories)
        self.data, self.calls, self.points_seen = data, [], {}

    def generate(self, image, points):
        image_id = int(image[0, 0, 0]) // 10
        if image_id == 3:
            raise RuntimeError("boom on image 3")
        self.points_seen[image_id] = len(points)
        _, _, p, pi = self.data[image_id]
        return PseudoLabel(p.copy(), [dict(s) for s in pi])

    def __call__(self, images, points):
        self.calls.append(len(images))
        return [self.generate(im, pts) for im, pts in zip(images, points)]


@pytest.fixture()
def toy(tmp_path):
    data, rows = write_toy(tmp_path)
    return tmp_path, data, rows


def _score_toy(root, data, batch_size=8):
    gen = Canned(None, CATS, data)
    gt = GroundTruth(str(root))
    index = sorted(gt.rows(json_rows(root)), key=lambda r: r["image_id"])
    res = score(label_rows(gen, index, batch_size=batch_size, progress=False), gt)
    return res, gen


def json_rows(root):
    from pointseg.data.prepare import read_index

    return read_index(str(root / "index" / "index.parquet"))


def test_pq_equals_panopticapi_with_failed_images_as_empty_predictions(toy, tmp_path_factory):
    root, data, _ = toy
    res, _ = _score_toy(root, data)
    pred_root = tmp_path_factory.mktemp("pred")
    with PanopticWriter(str(pred_root), CATS) as pw:
        for image_id, (g, _, p, pi) in data.items():
            if image_id in (3, 4, 5):  # failed: an empty prediction
                p, pi = np.zeros_like(g), []
            pw.add(image_id, f"{image_id:04d}.png", p, pi)
    with contextlib.redirect_stdout(io.StringIO()):
        ref = panoptic_eval.pq_compute(str(root / "gt" / "panoptic.json"), str(pred_root / "panoptic.json"),
                                       str(root / "gt" / "panoptic"), str(pred_root / "panoptic"))
    for name, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for m in ("pq", "sq", "rq"):
            assert abs(res[m + suffix] - ref[name][m]) < TOL, (m + suffix, res[m + suffix], ref[name][m])
    for cid, row in ref["per_class"].items():
        assert abs(res["per_class"][cid]["pq"] - row["pq"]) < TOL
    # the same files through the library's file-based path: mIoU agrees with the in-process one
    from pointseg.metrics import evaluate_panoptic

    files = evaluate_panoptic(str(root / "gt" / "panoptic.json"), str(root / "gt" / "panoptic"),
                              str(pred_root / "panoptic.json"), str(pred_root / "panoptic"), CATS, progress=False)
    assert abs(files["miou"]["miou"] - res["miou"]) < TOL


def test_failed_images_listed_with_reasons_and_scored_as_false_negatives(toy):
    root, data, _ = toy
    res, gen = _score_toy(root, data)
    assert res["num_images"] == 5
    assert sorted(res["failed"]) == [3, 4, 5]
    assert "boom on image 3" in res["failed"][3] and res["failed"][3].startswith("generate[canned]")
    assert res["failed"][4].startswith("input: ImageDecodeError") and "0004.png" in res["failed"][4]
    assert "[7]" in res["failed"][5] and res["failed"][5].startswith("label:")
    # thing_a: TP g1 (IoU 1), TP g2 (0.6); FN on images 3 and 5; FP on image 2 -> PQ = 1.6 / (2 + 1/2 + 2/2)
    assert res["per_class"][1]["tp"] == 2 and res["per_class"][1]["fn"] == 2 and res["per_class"][1]["fp"] == 1
    assert abs(res["per_class"][1]["pq"] - 1.6 / 3.5) < TOL
    # thing_b: FN on image 2 and on image 4 (missing file), the crowd-covering p3 no FP
    assert (res["per_class"][2]["tp"], res["per_class"][2]["fp"], res["per_class"][2]["fn"]) == (0, 0, 2)
    # the point outside the image was dropped before the generator saw it (3 valid of 4)
    assert gen.points_seen[1] == 3


def test_per_image_pq_and_mean_best_iou_by_hand(toy):
    root, data, _ = toy
    res, _ = _score_toy(root, data)
    per = res["per_image"]
    # image 2: thing_b FN (0), thing_a FP (0), road TP with IoU 1 -> (0 + 0 + 1) / 3
    assert abs(per[2]["pq"] - 1 / 3) < TOL
    assert per[3]["pq"] == 0.0 and per[4]["pq"] == 0.0
    # plain IoU, VOID counts: g1 16/20, g2 12/20; image 2: 1 (any class); failed images 0; the crowd is no object
    assert abs(per[1]["mean_best_iou"] - 0.7) < TOL
    assert per[2]["mean_best_iou"] == 1.0 and per[3]["mean_best_iou"] == 0.0
    assert abs(res["mean_best_iou"] - 2.4 / 6) < TOL and res["num_objects"] == 6


def test_mask_ap_equals_pycocotools(toy):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root, data, _ = toy
    res, _ = _score_toy(root, data)

    def enc(m):
        r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        r["counts"] = r["counts"].decode("ascii")
        return r

    images, anns, dets = [], [], []
    for image_id, (g, gi, p, pi) in data.items():
        images.append({"id": image_id, "height": H, "width": W})
        for s in gi:
            if CATS[s["category_id"]].isthing:
                m = g == s["id"]
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": s["category_id"],
                             "iscrowd": int(s.get("iscrowd", 0)), "segmentation": enc(m), "area": int(m.sum()),
                             "bbox": list(mask_utils.toBbox(enc(m)))})
        if image_id in (3, 4, 5):  # failed: no detection, its objects stay unmatched
            continue
        for s in pi:
            if CATS[s["category_id"]].isthing:
                dets.append({"image_id": image_id, "category_id": s["category_id"], "score": 1.0,
                             "segmentation": enc(p == s["id"])})
    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO()
        cg.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": c.id, "name": c.name} for c in CATS.values() if c.isthing]}
        cg.createIndex()
        ev = COCOeval(cg, cg.loadRes(dets), iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for key, ref in zip(("mask_ap", "mask_ap50", "mask_ap75"), ev.stats[:3]):
        assert abs(res[key] - max(float(ref), 0.0)) < TOL, (key, res[key], ref)
    assert res["mask_ap50"] > 0  # the toy has true positives at IoU 0.5


def test_class_agnostic_mask_ap_ignores_the_class_by_hand():
    """Two objects with perfect masks, one of them given the wrong class: class-aware AP is the
    mean over the two classes (class 1: nothing found, 0; class 2: its object first, 1) = 0.5;
    class-agnostic AP (pycocotools useCats = 0) finds both objects, 1.0."""
    from pointseg.metrics.instances import coco_mask_ap, mask_bbox, rle

    a = np.zeros((8, 8), bool)
    a[:4, :4] = True
    b = np.zeros((8, 8), bool)
    b[4:, 4:] = True
    cats = {1: Category(1, "a", True), 2: Category(2, "b", True)}
    gt = [{"image_id": 1, "category_id": c, "iscrowd": 0, "segmentation": rle(m), "area": int(m.sum()),
           "bbox": mask_bbox(m)} for c, m in ((1, a), (2, b))]
    dets = [{"image_id": 1, "category_id": 2, "score": 0.9, "segmentation": rle(b)},
            {"image_id": 1, "category_id": 2, "score": 0.8, "segmentation": rle(a)}]
    images = [{"id": 1, "height": 8, "width": 8}]
    assert coco_mask_ap(images, gt, dets, cats)["ap50"] == pytest.approx(0.5)
    agnostic = coco_mask_ap(images, gt, dets, cats, use_cats=False)
    assert agnostic["ap"] == pytest.approx(1.0) and agnostic["ap50"] == pytest.approx(1.0)


def test_batched_calls_reach_the_generator_and_a_failure_is_isolated(toy):
    root, data, _ = toy
    _, gen = _score_toy(root, data, batch_size=8)
    # images 1, 2, 3, 5 decode (4 is missing): one call of 4 fails on image 3, then one call per image
    assert gen.calls == [4, 1, 1, 1, 1]
    res, gen = _score_toy(root, data, batch_size=2)
    # chunks (1, 2), (3, 4: missing), (5): a failing single call is not retried
    assert gen.calls == [2, 1, 1] and sorted(res["failed"]) == [3, 4, 5]


def test_label_rows_keeps_order_and_flags_rows_without_valid_points(toy):
    root, data, rows = toy
    bad = dict(rows[0], points=json.dumps([{"x": -5.0, "y": 1.0, "segment": 1, "category_id": 1}]))
    out = list(label_rows(Canned(None, CATS, data), [bad] + rows[1:], batch_size=3, progress=False))
    assert [int(r["image_id"]) for r, _, _ in out] == [1, 2, 3, 4, 5]
    assert out[0][1] is None and "no valid points" in out[0][2]
    assert out[1][1] is not None and out[1][2] == ""


def test_contrasting_images_by_hand():
    """Largest gains first, then the largest losses; images without a value left out; ties in id order."""
    per = {1: {"mean_best_iou": 0.5}, 2: {"mean_best_iou": 0.9}, 3: {"mean_best_iou": 0.2},
           4: {"mean_best_iou": None}, 5: {"mean_best_iou": 0.4}, 6: {"mean_best_iou": 0.6}}
    ref = {1: {"mean_best_iou": 0.5}, 2: {"mean_best_iou": 0.3}, 3: {"mean_best_iou": 0.6},
           4: {"mean_best_iou": 0.1}, 5: {"mean_best_iou": 0.4}, 6: {"mean_best_iou": 0.5}}
    # differences: 2 +0.6, 6 +0.1, 1 0, 5 0, 3 -0.4 (4 has no value)
    assert contrasting_images(per, ref, 3) == [2, 6, 3]
    assert contrasting_images(per, ref, 2) == [2, 3]
    assert contrasting_images(per, ref, 1) == [2]
    assert contrasting_images(per, ref, 9) == [2, 6, 1, 5, 3]
    assert contrasting_images(per, ref, 0) == []
    assert contrasting_images({**per, 7: {"pq": 1.0, "mean_best_iou": 0.0}}, ref, 9) == [2, 6, 1, 5, 3]  # 7: no ref


def test_comparison_sheet_places_each_label_in_its_tile_and_greys_failures(toy):
    """Rows in the given order; per row image+clicks | ground truth | method; a generator error or an unreadable
    image is a grey tile, never a crash or a missing row."""
    from pointseg.viz.overlay import blend, colorize

    root, data, rows = toy
    res, _ = _score_toy(root, data)
    gt = GroundTruth(str(root))
    by_id = {int(r["image_id"]): r for r in rows}
    chosen = [by_id[i] for i in (1, 3, 4)]
    labels = labels_by_id(Canned(None, CATS, data), chosen)
    assert labels[3] is None and labels[4] is None and labels[1] is not None
    sheet = comparison_sheet(chosen, [("canned", labels, res["per_image"])], gt, CATS, max_side=None)
    f = 26  # 8x10 toy images are enlarged to 256 px on the long side: ceil(256 / 10)
    th, tw = f * H + 18, f * W
    assert sheet.shape == (3 * th + 2 * 6, 3 * tw, 3)

    def tile(row, col):
        return sheet[row * (th + 6) + 18:row * (th + 6) + th, col * tw:(col + 1) * tw]

    def big(a):
        return np.repeat(np.repeat(a, f, 0), f, 1)

    image1 = big(np.full((H, W, 3), (10, 0, 0), np.uint8))
    g, gi, p, pi = data[1]
    assert np.array_equal(tile(0, 1), blend(image1, colorize(big(g), gi, CATS)))
    assert np.array_equal(tile(0, 2), blend(image1, colorize(big(p), pi, CATS)))
    assert (tile(1, 2) == 128).all()  # image 3: the generator raised
    assert (tile(2, 0) == 128).all() and (tile(2, 2) == 128).all()  # image 4: its file is missing
    assert not (tile(2, 1) == 128).all()  # ... but its ground truth is drawn


def test_side_by_side_shrinks_large_images_to_max_side():
    from pointseg.data.record import Points
    from pointseg.viz.overlay import side_by_side

    image = np.zeros((400, 600, 3), np.uint8)
    ids = np.ones((400, 600), np.int32)
    ids[:, 300:] = 2
    info = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 3}]
    out = side_by_side(image, Points.empty(), [("a", (ids, info)), ("b", None)], CATS, max_side=300)
    assert out.shape == (200 + 18, 3 * 300, 3)
    label = out[18:, 300:600]
    assert (label[:, :140] == label[0, 0]).all() and (label[:, 160:] == label[0, -1]).all()  # nearest, no blur
    assert not np.array_equal(label[0, 0], label[0, -1])
    assert side_by_side(image, Points.empty(), [], CATS).shape == (400 + 18, 600, 3)  # no max_side: as it is


def test_split_rows_sorted_halves():
    rows = [{"image_id": i} for i in (9, 2, 7, 4, 5)]
    assert [r["image_id"] for r in split_rows(rows, "choose")] == [2, 4]
    assert [r["image_id"] for r in split_rows(rows, "report")] == [5, 7, 9]
    assert [r["image_id"] for r in split_rows(rows, "all")] == [2, 4, 5, 7, 9]
    with pytest.raises(ValueError, match="split"):
        split_rows(rows, "test")


def test_evaluate_generator_on_prepared_synthetic_matches_per_image_loop(tmp_path):
    """The one-call path equals labelling each prepared image by hand and scoring with PQEvaluator."""
    from pointseg.config import DatasetConfig, PointsConfig, SyntheticDataConfig
    from pointseg.data.images import read_image
    from pointseg.data.points import validate_points
    from pointseg.data.prepare import prepare_inputs, read_index
    from pointseg.data.record import Points
    from pointseg.generators import build_generator
    from pointseg.metrics import PQEvaluator

    out = str(tmp_path)
    cats, _ = prepare_inputs(DatasetConfig(synthetic=SyntheticDataConfig(num_images=4, height=48, width=48)),
                             PointsConfig(), out)
    gen = build_generator("psps", {}, cats)
    res = evaluate_generator(gen, out, split="report", batch_size=3, progress=False)
    gt = GroundTruth(out)
    ev = PQEvaluator(cats)
    for r in sorted(read_index(join(out, "index", "index.parquet")), key=lambda r: r["image_id"])[2:]:
        image = read_image(r["file_name"])
        pts, _ = validate_points(Points.from_list(json.loads(r["points"])), 48, 48, cats)
        lab = gen.generate(image, pts)
        ev.process(*gt.load(r["image_id"]), lab.id_map, lab.segments_info)
    ref = ev.evaluate()
    assert res["num_images"] == 2 and not res["failed"]
    for k in ("pq", "pq_th", "pq_st", "sq", "rq"):
        assert abs(res[k] - ref[k]) < TOL


# ------------------------------------------------------------------ the harness with a trainable generator


class TinyStage1Config(EngineConfig):
    steps: int = 3
    batch_size: int = 2


class TinyStage1(Trainable):
    """A 3->1 linear map trained to score the colour under each click: enough to exercise the engine."""

    name = "tiny_stage1"
    Config = TinyStage1Config
    seen_ids: list[int] = []
    contexts: list[dict] = []

    def build(self, pretrained=True):
        TinyStage1.contexts.append(self.context)
        return torch.nn.Linear(3, 1)

    def collate(self, train=True):
        def make_batch(records):
            TinyStage1.seen_ids.extend(r.image_id for r in records)
            cols = [torch.as_tensor(r.image[r.points.pixels(r.height, r.width)[:, 0],
                                             r.points.pixels(r.height, r.width)[:, 1]], dtype=torch.float32)
                    for r in records]
            return {"colour": torch.cat(cols) / 255}

        return IndexCollate(self.categories, make_batch)

    def loss(self, model, batch, step):
        return {"loss": (model(batch["colour"]) - 1).pow(2).mean()}


class TinyConfig(TrainableGeneratorConfig):
    fill: str = "first"


class TinyTrainable(TrainableGenerator):
    """Every pixel to the first point's segment; needs its stage-1 net (loaded from the checkpoint)."""

    name = "tiny_trainable"
    Config = TinyConfig
    stage1 = TinyStage1

    def generate(self, image, points):
        assert self.net is not None
        groups = seed_groups(points, self.categories)
        return assemble(np.zeros(image.shape[:2], np.int64), groups)


def test_harness_trains_stage1_on_all_rows_then_labels_and_reuses_everything(tmp_path):
    import pseudo_label_quality as plq  # benchmarks/ on sys.path below

    TinyStage1.seen_ids.clear()
    TinyStage1.contexts.clear()
    argv = ["--dataset", "synthetic", "--images", "4", "--size", "48", "--method", "test_evaluation:TinyTrainable",
            "--set", "fill=first", "--train-set", "steps=4", "--baselines", "voronoi", "--workdir", str(tmp_path),
            "--quiet", "--json", str(tmp_path / "r.json")]
    res = plq.main(argv + ["--gallery", "2"])
    proto = res["protocols"]["native"]
    assert sorted(set(TinyStage1.seen_ids)) == [0, 1, 2, 3]  # all rows, though only 2 are scored
    # the gallery: the two report-half images, relabelled by the trained generator and the baseline
    assert sorted(proto["gallery"]["image_ids"]) == [2, 3] and proto["gallery"]["reference"] == "voronoi"
    png = np.asarray(Image.open(proto["gallery"]["png"]))
    assert png.shape == (2 * (6 * 48 + 18) + 6, 4 * 6 * 48, 3)  # 48 px enlarged 6x; clicks, truth, 2 methods
    assert TinyStage1.contexts[0]["generator"].fill == "first"
    assert proto["stage1"]["steps"] == 4
    assert Path(proto["stage1"]["checkpoint"], "meta.json").exists()
    assert set(proto["rows"]) == {"test_evaluation:TinyTrainable", "voronoi"}
    r = proto["rows"]["test_evaluation:TinyTrainable"]
    assert r["num_images"] == 2 and not r["failed"]  # the report half of 4
    assert sorted(r["per_image"]) == [2, 3]
    assert json.loads((tmp_path / "r.json").read_text())["protocols"]["native"]["rows"]["voronoi"]["num_images"] == 2
    # a rerun reuses the prepared data and the finished checkpoint (no new step)
    marker = Path(proto["data"]) / "prepared.json"
    stamp = marker.stat().st_mtime_ns
    TinyStage1.seen_ids.clear()
    res2 = plq.main(argv)
    assert marker.stat().st_mtime_ns == stamp
    assert res2["protocols"]["native"]["stage1"]["start_step"] == 4 and TinyStage1.seen_ids == []


def test_harness_takes_the_generator_from_a_pipeline_config_under_the_command_line(tmp_path):
    """``--config`` measures what a pipeline config trains and labels: its method, params and stage-1 train
    settings, with ``--set`` / ``--train-set`` on top; a config the pipeline would refuse is refused here too."""
    import pseudo_label_quality as plq

    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text("generator:\n  method: test_evaluation:TinyTrainable\n  params: {fill: second}\n"
                   "  train: {steps: 3, batch_size: 1}\n")
    TinyStage1.contexts.clear()
    base = ["--dataset", "synthetic", "--images", "4", "--size", "48", "--config", str(cfg), "--baselines", "",
            "--workdir", str(tmp_path / "w"), "--quiet"]
    res = plq.main(base + ["--train-set", "steps=5"])
    stage1 = res["protocols"]["native"]["stage1"]
    assert stage1["steps"] == 5  # --train-set over the config's 3
    meta = json.loads(Path(stage1["checkpoint"], "meta.json").read_text())
    assert meta["config"]["batch_size"] == 1  # the config's, not TinyStage1Config's 2
    assert TinyStage1.contexts[0]["generator"].fill == "second"  # the stage-1 build sees the labelling params
    assert set(res["protocols"]["native"]["rows"]) == {"test_evaluation:TinyTrainable"}
    TinyStage1.contexts.clear()
    plq.main(base + ["--set", "fill=third", "--train-only"])
    assert TinyStage1.contexts[0]["generator"].fill == "third"  # --set over the config's params
    with pytest.raises(SystemExit, match="--method psps but .* has generator.method test_evaluation:TinyTrainable"):
        plq.main(base + ["--method", "psps"])
    cfg.write_text("generator:\n  method: test_evaluation:TinyTrainable\n  train: {stepz: 3}\n")
    with pytest.raises(SystemExit, match="generator.train.stepz|train.stepz"):
        plq.main(base)


def test_harness_fails_clearly_on_a_bad_param_and_without_the_shared_data(tmp_path):
    import pseudo_label_quality as plq

    with pytest.raises(SystemExit, match=r"(?s)psps params \(--config / --set\):.*betaa"):
        plq.main(["--dataset", "synthetic", "--method", "psps", "--set", "betaa=2", "--workdir", str(tmp_path)])

    with pytest.raises(SystemExit, match="coco-mini not found at .*--data-root"):
        plq.main(["--dataset", "coco-mini", "--data-root", str(tmp_path / "nowhere"), "--workdir", str(tmp_path)])


@pytest.fixture(autouse=True, scope="module")
def _benchmarks_on_path():
    import sys

    path = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, path)
    yield
    sys.path.remove(path)


def test_harness_k_error_equals_the_point2mask_ablation(tmp_path):
    """``--k-error`` reuses the ablation's oracle: same k err and PQ on the same synthetic images and points."""
    import point2mask_ablation as abl
    import pseudo_label_quality as plq

    res = plq.main(["--dataset", "synthetic", "--images", "3", "--size", "64", "--split", "all", "--method",
                    "point2mask", "--k-error", "--baselines", "", "--workdir", str(tmp_path), "--quiet"])
    ours = res["protocols"]["native"]["rows"]["point2mask"]
    cats, records, _ = abl.load_dataset("synthetic", 3, 0, size=64)
    ref = abl.score("point2mask", {}, cats, records)
    assert ours["k_err_problems"] > 0
    assert abs(ours["k_err"] - ref["k_err"]) < 1e-12
    assert abs(ours["pq"] - ref["pq"]) < TOL


@pytest.mark.parametrize("ids", [[0, 3, 7], [5], [0, 2**22 - 1], [0, 2**22, 256**3 - 1], [-1, 4]])
def test_unique_ids_equals_numpy_unique(ids):
    from pointseg.data.panoptic_format import unique_ids

    rng = np.random.default_rng(len(ids))
    a = rng.choice(np.asarray(ids, np.int64), size=(13, 17)).astype(np.int32)
    u, inv = unique_ids(a)
    ref_u, ref_inv = np.unique(a, return_inverse=True)
    assert u.tolist() == ref_u.tolist() and inv.shape == a.shape
    assert (inv.ravel() == ref_inv.ravel()).all() and (u[inv] == a).all()


def test_harness_coco_mini_both_protocols(tmp_path):
    """Real data (skipped without ../shared/data): void scores things only, stuff adds the background class."""
    import pseudo_label_quality as plq

    if not (plq.SHARED / "coco-mini").exists():
        pytest.skip(f"real test data not found at {plq.SHARED / 'coco-mini'} (../shared/data is not part of the repo)")
    res = plq.main(["--dataset", "coco-mini", "--images", "4", "--background", "both", "--split", "all",
                    "--baselines", "voronoi", "--workdir", str(tmp_path), "--quiet"])
    void, stuff = res["protocols"]["void"], res["protocols"]["stuff"]
    assert void["data"] != stuff["data"]
    for proto in (void, stuff):
        assert set(proto["rows"]) == {"psps", "voronoi"}
        assert proto["rows"]["psps"]["num_images"] == 4 and not proto["rows"]["psps"]["failed"]
    assert void["rows"]["psps"]["pq_st"] is None and void["rows"]["psps"]["pq"] == void["rows"]["psps"]["pq_th"]
    assert stuff["rows"]["psps"]["pq_st"] is not None and stuff["rows"]["psps"]["n_st"] == 1


def test_harness_trains_a_source_stage_first_and_hands_its_checkpoint_over(tmp_path):
    """P2Seg with an EPLD source and ``semantic_train``: the harness trains EPLD's stage 1, then P2Seg's on
    that EPLD map (its trainable builds the source from the checkpoint, or raises), then labels."""
    import pseudo_label_quality as plq

    argv = ["--dataset", "synthetic", "--images", "4", "--size", "64", "--method", "p2seg",
            "--set", "semantic_source=epld", "--set", "rounds=0",
            "--set", "semantic_train={steps: 1, batch_size: 2, input_size: 64, hidden_dim: 16, layers: 1, "
                     "mask_stride: 8}",
            "--train-set", "steps=1", "--train-set", "batch_size=2", "--train-set", "image_size=64",
            "--train-set", "affinity_grid=8", "--train-set", "width=16",
            "--baselines", "voronoi", "--workdir", str(tmp_path), "--quiet"]
    proto = plq.main(argv)["protocols"]["native"]
    source = proto["source_stage1"]
    assert source["steps"] == 1 and Path(source["checkpoint"], "meta.json").exists()
    assert Path(source["checkpoint"]).name.startswith("epld-")
    assert proto["stage1"]["steps"] == 1 and Path(proto["stage1"]["checkpoint"]).name.startswith("p2seg-")
    assert proto["rows"]["p2seg"]["num_images"] == 2 and not proto["rows"]["p2seg"]["failed"]


def test_foreground_ceiling_reproduces_psps_and_the_ground_truth_foreground_lifts_it(tmp_path):
    """benchmarks/foreground_ceiling.py on 4 real images: its open split is PSPS exactly (same PQ and best IoU as
    the harness's PSPS generator); kept inside the ground-truth foreground the split scores a higher best IoU in
    both protocols, and in the stuff protocol a higher PQ (the background becomes one clean segment)."""
    import foreground_ceiling as fc
    import pseudo_label_quality as plq

    if not (plq.SHARED / "coco-mini").exists():
        pytest.skip(f"real test data not found at {plq.SHARED / 'coco-mini'} (../shared/data is not part of the repo)")
    common = ["--images", "4", "--background", "both", "--split", "all", "--workdir", str(tmp_path), "--quiet"]
    ours = fc.main(common + ["--dilate", "0"])
    ref = plq.main(common + ["--dataset", "coco-mini", "--baselines", ""])["protocols"]
    for proto in ("void", "stuff"):
        psps, ceiling = ours[proto]["psps"], ours[proto]["gt fg dilated 0"]
        assert psps["pq"] == pytest.approx(ref[proto]["rows"]["psps"]["pq"], abs=1e-12)
        assert psps["mean_best_iou"] == pytest.approx(ref[proto]["rows"]["psps"]["mean_best_iou"], abs=1e-12)
        assert ceiling["mean_best_iou"] > psps["mean_best_iou"] + 0.1
    assert ours["stuff"]["gt fg dilated 0"]["pq"] > ours["stuff"]["psps"]["pq"] + 0.1


def test_split_cost_controls_psps_row_is_the_harness_s_psps_and_the_terms_change_the_split(tmp_path):
    """benchmarks/split_cost_controls.py on 4 real images: its ``psps`` row is the harness's PSPS generator
    exactly; a constant step and the frozen ImageNet feature distance each change the labels; the features are
    unit vectors per pixel with the chosen levels' channels; bad flags are refused."""
    import pseudo_label_quality as plq
    import split_cost_controls as scc

    if not (plq.SHARED / "coco-mini").exists():
        pytest.skip(f"real test data not found at {plq.SHARED / 'coco-mini'} (../shared/data is not part of the repo)")
    common = ["--images", "4", "--background", "void", "--split", "all", "--workdir", str(tmp_path), "--quiet"]
    ours = scc.main(common + ["--steps", "0.03", "--imagenet", "0.3"])
    ref = plq.main(common + ["--dataset", "coco-mini", "--baselines", ""])["protocols"]["void"]["rows"]["psps"]
    assert ours["psps"]["pq"] == pytest.approx(ref["pq"], abs=1e-12)
    assert ours["psps"]["mean_best_iou"] == pytest.approx(ref["mean_best_iou"], abs=1e-12)
    for row in ("step 0.03", "imagenet 0.3"):
        assert ours[row]["num_images"] == 4 and not ours[row]["failed"]
        assert ours[row]["mean_best_iou"] != pytest.approx(ours["psps"]["mean_best_iou"], abs=1e-6)
    from pointseg.models.backbones import build_timm_backbone

    net, channels = build_timm_backbone("efficientnet_lite0", pretrained=False, out_indices=(0, 1, 2, 3, 4))
    img = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    f = scc.imagenet_features(net.eval(), torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), img, 64, [1, 2], (25, 35))
    assert f.shape == (channels[1] + channels[2], 25, 35)
    np.testing.assert_allclose(np.linalg.norm(f[: channels[1]], axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(f[channels[1]:], axis=0), 1.0, atol=1e-5)
    for bad in (["--levels", "7"], ["--steps", "-1"], ["--imagenet", "x"], ["--input-size", "100"]):
        with pytest.raises(SystemExit):
            scc.main(common + bad)


def test_foreground_ceiling_fill_gives_the_outside_the_open_split_and_keeps_the_inside():
    """``split_inside(..., fill=True)`` on a 12 x 12 toy with two thing clicks and a foreground of the
    left half: inside the foreground the labels are those of the VOID-outside split, outside they are PSPS's open
    split, and no pixel is VOID."""
    import foreground_ceiling as fc

    from pointseg.data.record import Category, Points
    from pointseg.generators.base import seed_groups
    from pointseg.generators.psps import PSPSConfig

    image = np.repeat((np.arange(12) * 8)[:, None, None], 12, axis=1).repeat(3, axis=2).astype(np.uint8)
    image[:, 6:] = 200  # a vertical ramp on the left (no ties in the cost), flat on the right
    cats = {1: Category(id=1, name="a", isthing=True)}
    points = Points(xy=np.array([[2.0, 2.0], [3.0, 9.0]]), segment=np.array([1, 2]), category_id=np.array([1, 1]))
    groups = seed_groups(points, cats)
    fg = np.zeros((12, 12), bool)
    fg[:, :6] = True
    cfg = PSPSConfig(downscale=1.0)
    void_out = fc.split_inside(image, points, groups, fg, cfg)
    filled = fc.split_inside(image, points, groups, fg, cfg, fill=True)
    open_split = fc.split_inside(image, points, groups, None, cfg)
    assert (void_out[~fg] == -1).all() and (void_out[fg] >= 0).all()
    assert (filled >= 0).all()
    assert (filled[fg] == void_out[fg]).all() and (filled[~fg] == open_split[~fg]).all()
    assert set(np.unique(filled[fg]).tolist()) == {0, 1}  # both clicks keep a part of the foreground


def test_pu_classifier_is_the_weighted_logistic_optimum_of_scipy_and_ranks_the_positives_first():
    """``pu_classifier`` on a 2-D toy: labelled positives from a cluster at (+2, +1), unlabelled samples half from
    it and half from a cluster at (-2, -1). Its (w, b) is the minimum of the same class-weighted, L2-regularised
    logistic loss found by scipy's BFGS, and its score separates the unlabelled samples' hidden classes."""
    import foreground_ceiling as fc
    from scipy.optimize import minimize
    from scipy.special import log_expit

    rng = np.random.default_rng(0)
    pos = rng.normal([2.0, 1.0], 1.0, (40, 2))
    hidden = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    unl = np.where(hidden[:, None], rng.normal([2.0, 1.0], 1.0, (200, 2)), rng.normal([-2.0, -1.0], 1.0, (200, 2)))
    w, b = fc.pu_classifier(pos, unl, l2=1e-3)

    def loss(theta):
        z_pos, z_unl = pos @ theta[:2] + theta[2], unl @ theta[:2] + theta[2]
        return (-0.5 * log_expit(z_pos).mean() - 0.5 * log_expit(-z_unl).mean() + 1e-3 * theta[:2] @ theta[:2])

    ref = minimize(loss, np.zeros(3), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(np.r_[w, b], ref, atol=1e-5)
    assert fc.foreground_auc(unl @ w + b, hidden) > 0.95


def test_foreground_auc_and_void_least_foreground_by_hand():
    """The AUC counts every (foreground, background) pair, a tie as half; the VOID cut takes the lowest-scoring
    fraction of the pixels but never a click pixel."""
    import foreground_ceiling as fc

    assert fc.foreground_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 1, 0, 1])) == 1.0
    assert fc.foreground_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([1, 0, 1, 0])) == 0.0
    assert fc.foreground_auc(np.array([1.0, 1.0, 0.0]), np.array([1, 0, 0])) == 0.75  # (0.5 + 1) / 2
    assert np.isnan(fc.foreground_auc(np.ones(3), np.ones(3)))
    label = np.array([[0, 0, 1], [1, 1, 0]])
    score = np.array([[0.5, 0.1, 0.9], [0.2, 0.8, 0.3]])
    # the lowest third scores 0.1 and 0.2 (below the 1/3 quantile, 0.27); the click at (1, 0) is kept
    np.testing.assert_array_equal(fc.void_least_foreground(label, score, 1 / 3, np.array([[1, 0]])),
                                  [[0, -1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(fc.void_least_foreground(label, score, 0.0, np.zeros((0, 2), int)), label)


def test_foreground_ceiling_clicks_only_rows_cut_the_open_split_and_refuse_bad_flags(tmp_path):
    """``--pu-checkpoint`` with a void-protocol EPLD network on 4 real images: the ``void 0`` row is PSPS's open
    split exactly, a VOID cut changes the labels, the AUC is a probability; bad flags are refused."""
    import foreground_ceiling as fc
    import pseudo_label_quality as plq

    if not (plq.SHARED / "coco-mini").exists():
        pytest.skip(f"real test data not found at {plq.SHARED / 'coco-mini'} (../shared/data is not part of the repo)")
    common = ["--images", "4", "--split", "all", "--workdir", str(tmp_path), "--quiet"]
    trained = plq.main(common + ["--dataset", "coco-mini", "--background", "void", "--method", "epld",
                                 "--train-set", "steps=2", "--train-set", "input_size=64", "--train-set", "hidden_dim=16",
                                 "--train-set", "layers=1", "--baselines", ""])["protocols"]["void"]
    ckpt = trained["stage1"]["checkpoint"]
    ours = fc.main(common + ["--background", "void", "--dilate", "", "--pu-checkpoint", ckpt, "--pu-void", "0,0.5"])
    rows = ours["void"]
    assert rows["clicks-only fg, void 0"]["pq"] == pytest.approx(rows["psps"]["pq"], abs=1e-12)
    assert rows["clicks-only fg, void 0"]["mean_best_iou"] == pytest.approx(rows["psps"]["mean_best_iou"], abs=1e-12)
    assert rows["clicks-only fg, void 0.5"]["mean_best_iou"] != pytest.approx(rows["psps"]["mean_best_iou"], abs=1e-6)
    assert 0.0 <= ours["clicks_only_auc"] <= 1.0
    for bad in (["--background", "both", "--pu-checkpoint", ckpt], ["--pu-void", "1.5"], ["--pu-distance", "-1"],
                ["--dilate", "x"]):
        with pytest.raises(SystemExit):
            fc.main(common + ["--background", "void"] + bad)


def test_foreground_ceiling_learned_foreground_reproduces_the_epld_labels_in_the_stuff_protocol(tmp_path):
    """``--foreground-checkpoint``: PSPS's split inside the thing pixels of an EPLD network's stuff-protocol labels
    (the kept config's labelling: ``split_within: foreground``, the same geodesic) scores what the EPLD generator
    itself scores with that checkpoint on the same images; the void protocol has both learned rows."""
    import foreground_ceiling as fc
    import pseudo_label_quality as plq

    if not (plq.SHARED / "coco-mini").exists():
        pytest.skip(f"real test data not found at {plq.SHARED / 'coco-mini'} (../shared/data is not part of the repo)")
    common = ["--images", "4", "--split", "all", "--workdir", str(tmp_path), "--quiet"]
    config = str(Path(fc.ROOT) / "configs" / "epld_coco_mini.yaml")
    trained = plq.main(common + ["--dataset", "coco-mini", "--background", "stuff", "--config", config,
                                 "--train-set", "steps=2", "--train-set", "input_size=64", "--train-set", "hidden_dim=16",
                                 "--train-set", "layers=1", "--baselines", ""])["protocols"]["stuff"]
    ckpt = trained["stage1"]["checkpoint"]
    ours = fc.main(common + ["--background", "both", "--dilate", "", "--foreground-checkpoint", ckpt,
                             "--foreground-config", config])
    epld = trained["rows"]["epld"]
    for key in ("pq", "pq_th", "mask_ap50", "mean_best_iou"):
        assert ours["stuff"]["learned fg"][key] == pytest.approx(epld[key], abs=1e-9), key
    assert set(ours["void"]) == {"psps", "learned fg", "learned fg, outside filled"}
