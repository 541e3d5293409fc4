"""Does the suggested next click help more than a random one? Does uncertainty rank quality?

A simulated user, in process, through the library:

1. prepare the dataset with ``prepare_inputs`` (P1 clicks, ``points.seed = seed``);
2. label every image with the generator (PSPS by default) -> PQ before;
3. take the top suggestion of :func:`pointseg.uncertainty.suggest_clicks` on the
   label's uncertainty map; the user clicks it and gives it its ground-truth
   segment and category (a click on VOID or a crowd region adds nothing: the
   user has no segment to name there); relabel -> PQ after one suggested click;
4. the same with one uniformly random pixel per image
   (``default_rng([seed, image_id])``) -> PQ after one random click.

Prints, per dataset and seed, the dataset PQ (and mean best IoU per
ground-truth thing) before and after each extra click, the gains, how many
clicks landed on a segment, and Spearman's rank correlation between per-image
mean uncertainty and per-image PQ (:mod:`pointseg.review.table`; negative: the
uncertainty finds the bad labels without ground truth).

    python benchmarks/next_click.py                           # synthetic seeds 0 1 2, coco-mini void + stuff
    python benchmarks/next_click.py --datasets synthetic --seeds 0 --num-images 24
    python benchmarks/next_click.py --data /path/to/shared/data --method voronoi
    python benchmarks/next_click.py --datasets coco-void coco-stuff --split report   # the held-out half
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing

from pointseg.config import DatasetConfig, PointsConfig  # noqa: E402
from pointseg.data.images import read_image_as_annotated  # noqa: E402
from pointseg.data.prepare import join, prepare_inputs, read_index  # noqa: E402
from pointseg.evaluation import SPLITS, GroundTruth, split_rows  # noqa: E402
from pointseg.data.record import Points  # noqa: E402
from pointseg.generators import build_generator  # noqa: E402
from pointseg.metrics import PQEvaluator  # noqa: E402
from pointseg.review.table import image_quality, uncertainty_quality_correlation  # noqa: E402
from pointseg.uncertainty import SUGGESTION_RADIUS, image_summary, suggest_clicks  # noqa: E402

DATASETS = ("synthetic", "coco-void", "coco-stuff")


def dataset_config(name: str, data: Path, num_images: int, seed: int) -> DatasetConfig:
    if name == "synthetic":
        return DatasetConfig(kind="synthetic", synthetic={"num_images": num_images, "height": 128, "width": 128,
                                                          "seed": seed})
    coco = data / "coco-mini"
    if not coco.exists():
        raise SystemExit(f"coco-mini not found at {coco} (pass --data; ../shared/data is not part of the repo)")
    return DatasetConfig(kind="coco_instances", annotations=str(coco / "annotations" / "instances_train2017.json"),
                         images=str(coco / "train2017"), background=name.split("-")[1])


def gt_click(points: Points, gt_map: np.ndarray, gt_segments: dict[int, dict], row: int, col: int) -> Points | None:
    """``points`` plus a click at (row, col) carrying its ground-truth segment; None on VOID or crowd."""
    seg = gt_segments.get(int(gt_map[row, col]))
    if seg is None or int(seg.get("iscrowd", 0)):
        return None
    return Points(np.concatenate([points.xy, [[float(col), float(row)]]]),
                  np.concatenate([points.segment, [int(seg["id"])]]),
                  np.concatenate([points.category_id, [int(seg["category_id"])]]))


def run(name: str, seed: int, args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cats, _ = prepare_inputs(dataset_config(name, args.data, args.num_images, seed),
                                 PointsConfig(scheme="p1", seed=seed), out)
        gt = GroundTruth(out)
        gen = build_generator(args.method, json.loads(args.params), cats)
        evals = {k: PQEvaluator(cats) for k in ("before", "suggested", "random")}
        ious = {k: [] for k in evals}
        hits = {"suggested": 0, "random": 0}
        table, n, t0 = [], 0, time.perf_counter()
        rows = split_rows(gt.rows(read_index(join(out, "index", "index.parquet"))),
                          "all" if name == "synthetic" else args.split)  # settings were chosen on "choose"
        for r in rows:
            if r["error"]:
                continue
            image = read_image_as_annotated(r["file_name"], r["height"], r["width"])
            points = Points.from_list(json.loads(r["points"]))
            if len(points) == 0:
                continue
            gt_map, gt_info = gt.load(r["image_id"])
            by_id = {int(s["id"]): s for s in gt_info}
            base = gen.generate(image, points)
            if base.uncertainty is None:
                raise SystemExit(f"{args.method} gives no uncertainty map")
            q = image_quality(gt_map, gt_info, base.id_map, base.segments_info, cats, r["image_id"])
            table.append({"image_id": r["image_id"], "error": "", "pq": q["pq"],
                          **image_summary(base.uncertainty)})
            h, w = gt_map.shape
            picks = suggest_clicks(base.uncertainty, 1, args.radius)
            rng = np.random.default_rng([seed, int(r["image_id"])])
            clicks = {"suggested": (picks[0]["row"], picks[0]["col"]) if picks else None,
                      "random": (int(rng.integers(h)), int(rng.integers(w)))}
            labels = {"before": base}
            for k, rc in clicks.items():
                more = gt_click(points, gt_map, by_id, *rc) if rc is not None else None
                hits[k] += more is not None
                labels[k] = gen.generate(image, more) if more is not None else base
            for k, lab in labels.items():
                evals[k].process(gt_map, gt_info, lab.id_map, lab.segments_info, r["image_id"])
                iou = image_quality(gt_map, gt_info, lab.id_map, lab.segments_info, cats)["mean_best_iou"]
                if iou is not None:
                    ious[k].append(iou)
            n += 1
        res = {k: e.evaluate() for k, e in evals.items()}
    corr = uncertainty_quality_correlation(table)
    return {"dataset": name, "seed": seed, "images": n, "seconds": time.perf_counter() - t0,
            "pq": {k: res[k]["pq"] for k in res}, "best_iou": {k: float(np.mean(v)) if v else None for k, v in ious.items()},
            "hits": hits, "spearman": corr["spearman"] if corr else None, "p_value": corr["p_value"] if corr else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--num-images", type=int, default=48, help="synthetic images per seed (coco-mini: all 80)")
    p.add_argument("--method", default="psps")
    p.add_argument("--params", default="{}", help="generator params as JSON")
    p.add_argument("--radius", type=float, default=SUGGESTION_RADIUS)
    p.add_argument("--split", choices=SPLITS, default="all",
                   help="coco-mini images by sorted id: all 80, the first 40 (choose: where the radius was chosen) "
                        "or the last 40 (report)")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="folder with coco-mini/")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    pct = lambda v: "  n/a" if v is None else f"{100 * v:5.1f}"  # noqa: E731
    print(f"generator {args.method} {args.params}; one extra click per image; suggestion radius {args.radius}; "
          f"coco-mini split: {args.split}; PQ and mean best IoU in %")
    print(f"{'dataset':11s} {'seed':>4s} {'imgs':>4s} | {'PQ before':>9s} {'+suggested':>10s} {'+random':>8s} | "
          f"{'gain sugg':>9s} {'gain rand':>9s} | {'IoU before':>10s} {'+sugg':>6s} {'+rand':>6s} | "
          f"{'on segment sugg/rand':>20s} | {'Spearman(u, PQ)':>15s}")
    results = []
    for name in args.datasets:
        for seed in args.seeds:
            r = run(name, seed, args)
            results.append(r)
            pq, iou = r["pq"], r["best_iou"]
            print(f"{name:11s} {seed:4d} {r['images']:4d} | {pct(pq['before']):>9s} {pct(pq['suggested']):>10s} "
                  f"{pct(pq['random']):>8s} | {100 * (pq['suggested'] - pq['before']):+9.2f} "
                  f"{100 * (pq['random'] - pq['before']):+9.2f} | {pct(iou['before']):>10s} {pct(iou['suggested']):>6s} "
                  f"{pct(iou['random']):>6s} | {r['hits']['suggested']:>9d}/{r['hits']['random']:<10d} | "
                  f"{r['spearman'] if r['spearman'] is None else round(r['spearman'], 3)!s:>15s}", flush=True)
    print("\nmean over seeds:")
    for name in args.datasets:
        rs = [r for r in results if r["dataset"] == name]
        gs = np.mean([r["pq"]["suggested"] - r["pq"]["before"] for r in rs])
        gr = np.mean([r["pq"]["random"] - r["pq"]["before"] for r in rs])
        wins = sum(r["pq"]["suggested"] > r["pq"]["random"] for r in rs)
        sp = [r["spearman"] for r in rs if r["spearman"] is not None]
        print(f"  {name:11s} PQ gain suggested {100 * gs:+.2f}, random {100 * gr:+.2f}; suggestion wins "
              f"{wins}/{len(rs)} seeds; Spearman(u, PQ) mean {np.mean(sp) if sp else float('nan'):+.3f}")


if __name__ == "__main__":
    main()
