"""EXITS on coco-mini: per-object pseudo-mask mIoU and mask AP against the extreme-point baselines,
and the precision / recall of the retrieved points.

What it prints (the EXITS issue's acceptance 1-3):

* per method (``box``, ``extreme_polygon``, ``grabcut``, ``exits``): the
  **per-object mIoU** (EXITS Table 4's measure: for every non-crowd object
  with extreme points, the IoU of its pseudo mask, found by ``source_segment``,
  with its ground-truth mask, averaged over objects; a missing mask scores 0),
  and COCO **mask AP / AP50** and the **mean best IoU** of
  :class:`pointseg.metrics.instances.InstanceQualityEvaluator` (score 1 per
  segment), on the first 40 sorted image ids (where settings were chosen),
  the last 40 and all 80;
* ``--retrieval``: precision and recall of the retrieved foreground and
  background cells (``P^_FG``, ``P^_BG``, before point dropout) against the
  ground truth, for each ``--alphas`` (Table a2's direction), from the
  trained similarity extractor. A cell's truth is the ground-truth mask's
  area fraction in it (>= 0.5: foreground); recall counts the true cells in
  the box that are not an initial ``P_FG`` cell.

Ground truth is the visible instance masks of the pipeline
(:func:`pointseg.data.prepare.open_dataset`: overlaps go to the smaller
instance). Stage 1 trains with :func:`pointseg.train.engine.fit_plain` on all
80 images' extreme points (index rows; it never reads a mask); PQ under both
``dataset.background`` protocols comes from the shared quality harness.

Run (sizes and wall times in the README, "Measured")::

    python benchmarks/exits_quality.py --out out/exits_bench --train            # train, then score
    python benchmarks/exits_quality.py --out out/exits_bench --retrieval        # reuse the checkpoint
    python benchmarks/exits_quality.py --out out/exits_bench --methods exits --label-set mask_threshold=0.4
    python benchmarks/exits_quality.py --out out/exits_bench --train --checkpoint out/exits_bench/ck_noret \\
        --set use_retrieved_points=false --methods exits                         # Table 5 ablation
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from pointseg.config import DatasetConfig, PointsConfig  # noqa: E402
from pointseg.data.coco_panoptic_io import read_categories  # noqa: E402
from pointseg.data.prepare import open_dataset, prepare_inputs  # noqa: E402
from pointseg.generators import build_generator  # noqa: E402
from pointseg.generators.exits import ExitsStage1  # noqa: E402
from pointseg.generators.exits.crops import crop_images  # noqa: E402
from pointseg.generators.exits.stage1 import object_batch, retrieve_for_batch  # noqa: E402
from pointseg.metrics.instances import InstanceQualityEvaluator  # noqa: E402
from pointseg.train.engine import fit_plain, load_trained  # noqa: E402
from pointseg.train.rows import index_record  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"


def parse_value(text: str):
    return yaml.safe_load(text)


def prepare(data: Path, out: Path):
    """Extreme points (ExtremeNet band rule) and the index under ``out/prepared`` (made once)."""
    cfg = DatasetConfig(kind="coco_instances", annotations=str(data / "annotations" / "instances_train2017.json"),
                        images=str(data / "train2017"))
    prepared = out / "prepared"
    if not (prepared / "index" / "index.parquet").exists():
        prepare_inputs(cfg, PointsConfig(scheme="extreme"), str(prepared))
    cats = read_categories(str(prepared / "categories.json"))
    rows = sorted(pq.read_table(str(prepared / "index" / "index.parquet")).to_pylist(), key=lambda r: r["image_id"])
    _, records, _ = open_dataset(cfg)
    gt = {r.image_id: r for r in records}
    return cats, rows, gt


def object_ious(pred_map: np.ndarray, pred_info: list[dict], gt_rec, segments: set[int]) -> list[float]:
    """IoU of every non-crowd gt thing that has points with the pseudo segment made from its points."""
    by_source = {int(s["source_segment"]): int(s["id"]) for s in pred_info}
    out = []
    for s in gt_rec.segments:
        if s.iscrowd or not s.isthing or s.id not in segments:
            continue
        if s.id not in by_source:
            out.append(0.0)
            continue
        p = pred_map == by_source[s.id]
        inter, union = np.logical_and(p, s.mask).sum(), np.logical_or(p, s.mask).sum()
        out.append(float(inter / union) if union else 0.0)
    return out


def score(method: str, params: dict, cats, rows, gt, records, batch: int = 4) -> dict:
    """Label every image; per-split per-object mIoU, mask AP, mean best IoU, objects/s."""
    gen = build_generator(method, params, cats)
    ids = [r["image_id"] for r in rows]
    splits = {"first40": set(ids[:40]), "last40": set(ids[40:]), "all80": set(ids)}
    evals = {k: InstanceQualityEvaluator(cats) for k in splits}
    ious = {k: [] for k in splits}
    diags = []
    seconds, n_obj = 0.0, 0
    for s in range(0, len(records), batch):
        chunk = records[s : s + batch]
        t0 = time.perf_counter()
        labels = gen([r.image for r in chunk], [r.points for r in chunk])
        seconds += time.perf_counter() - t0
        for rec, lab in zip(chunk, labels):
            g = gt[rec.image_id]
            gt_map, gt_info = g.panoptic()
            segs = set(rec.points.segment.tolist())
            n_obj += len(segs)
            obj = object_ious(lab.id_map, lab.segments_info, g, segs)
            diags.append(lab.diagnostics)
            for k, members in splits.items():
                if rec.image_id in members:
                    ious[k] += obj
                    evals[k].process(gt_map, gt_info, lab.id_map, lab.segments_info, rec.image_id)
    out = {"method": method, "objects_per_s": n_obj / seconds, "summary": type(gen).summarize(diags)}
    for k in splits:
        ev = evals[k].evaluate()
        out[k] = {"miou": float(np.mean(ious[k])), "objects": len(ious[k]), "mask_ap": ev["mask_ap"],
                  "mask_ap50": ev["mask_ap50"], "mean_best_iou": ev["mean_best_iou"]}
    return out


def retrieval_pr(checkpoint: str, cats, rows, gt, records, alphas: list[int]) -> list[dict]:
    """Precision / recall of P^_FG and P^_BG against the ground truth, per alpha (module docstring)."""
    net, meta = load_trained(checkpoint, ExitsStage1)
    trainable = ExitsStage1(meta["config"], cats)
    trainable.start(net)
    cfg = trainable.config.model_copy(update={"max_objects_per_step": 10_000})
    sim = trainable.similarity_fn(net)
    N = cfg.grid
    counts = {a: np.zeros(8) for a in alphas}  # tp_f, fp_f, pos_f, tp_b, fp_b, pos_b, n_obj, mil
    for rec in records:
        b = object_batch([rec], cats, cfg, epoch=0, train=False)
        if not b["objects"]:
            continue
        g = {s.id: s for s in gt[rec.image_id].segments}
        masks = np.stack([g[seg].mask for _, seg in b["objects"]]).astype(np.float32)
        windows = b["windows"].numpy()
        truth = torch.stack([crop_images(torch.from_numpy(m)[None], windows[i : i + 1], cfg.crop_size)[0, 0]
                             for i, m in enumerate(masks)])
        truth = torch.nn.functional.adaptive_avg_pool2d(truth[:, None], (N, N)).flatten(1) >= 0.5
        for a in alphas:
            r = retrieve_for_batch(sim, b, cfg, alpha=a)
            cand = r["in_box"] & ~r["fg"]
            c = counts[a]
            c[0] += (r["fg_hat"] & truth).sum()
            c[1] += (r["fg_hat"] & ~truth).sum()
            c[2] += (cand & truth).sum()
            c[3] += (r["bg_hat"] & ~truth).sum()
            c[4] += (r["bg_hat"] & truth).sum()
            c[5] += (cand & ~truth).sum()
            c[6] += len(truth)
            c[7] += (~(r["fg_hat"] | r["bg_hat"]).any(1)).sum()
    out = []
    for a, c in counts.items():
        out.append({"alpha": a, "fg_precision": c[0] / max(c[0] + c[1], 1), "fg_recall": c[0] / max(c[2], 1),
                    "bg_precision": c[3] / max(c[3] + c[4], 1), "bg_recall": c[3] / max(c[5], 1),
                    "objects": int(c[6]), "nothing_retrieved": int(c[7])})
    return out


def f1(precision: float, recall: float) -> float:
    """Harmonic mean of precision and recall (0 when both are 0)."""
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("out/exits_bench"))
    ap.add_argument("--checkpoint", default=None, help="stage-1 checkpoint folder (default OUT/ck)")
    ap.add_argument("--train", action="store_true", help="train stage 1 first (fit_plain, resumes)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="stage-1 config override")
    ap.add_argument("--label-set", action="append", default=[], metavar="KEY=VALUE",
                    help="EXITS labelling param (ExitsConfig), e.g. mask_threshold=0.4")
    ap.add_argument("--methods", default="box,extreme_polygon,grabcut,exits")
    ap.add_argument("--retrieval", action="store_true")
    ap.add_argument("--alphas", default="1,3")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    if not args.data.is_dir():
        sys.exit(f"coco-mini not found at {args.data} (../shared/data is not part of the repo)")
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or str(args.out / "ck")
    cats, rows, gt = prepare(args.data, args.out)
    results: dict = {"checkpoint": checkpoint}
    if args.train:
        overrides = dict(kv.split("=", 1) for kv in args.set)
        cfg = ExitsStage1.Config.model_validate({k: parse_value(v) for k, v in overrides.items()})
        t = time.perf_counter()
        last = fit_plain(ExitsStage1(cfg, cats), rows, checkpoint, log_dir=str(Path(checkpoint).parent / "logs"))
        results["train"] = {"seconds": time.perf_counter() - t, "config": cfg.model_dump(mode="json"),
                            "last": {k: v for k, v in last.items() if isinstance(v, (int, float))}}
        print(f"stage 1: {results['train']['seconds']:.0f} s, {last.get('step')} steps")
    records = [index_record(r, cats) for r in rows]
    methods = [m for m in args.methods.split(",") if m]
    table = []
    for m in methods:
        params = {"checkpoint": checkpoint, **{k: parse_value(v) for k, v in
                                              (kv.split("=", 1) for kv in args.label_set)}} if m == "exits" else {}
        res = score(m, params, cats, rows, gt, records)
        table.append(res)
        print(json.dumps({"method": m, "objects_per_s": round(res["objects_per_s"], 2),
                          "problems": (res["summary"] or {}).get("table")}))
    print("\n| method | split | objects | per-object mIoU | mask AP | AP50 | mean best IoU |")
    print("|---|---|---|---|---|---|---|")
    for res in table:
        for k in ("first40", "last40", "all80"):
            r = res[k]
            print(f"| {res['method']} | {k} | {r['objects']} | {100 * r['miou']:.1f} | {100 * r['mask_ap']:.1f} | "
                  f"{100 * r['mask_ap50']:.1f} | {100 * r['mean_best_iou']:.1f} |")
    results["methods"] = table
    if args.retrieval:
        pr = retrieval_pr(checkpoint, cats, rows, gt, records, [int(a) for a in args.alphas.split(",")])
        print("\n| alpha | FG precision | FG recall | FG F1 | BG precision | BG recall | BG F1 | objects | "
              "nothing retrieved |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in pr:
            print(f"| {r['alpha']} | {100 * r['fg_precision']:.1f} | {100 * r['fg_recall']:.1f} | "
                  f"{100 * f1(r['fg_precision'], r['fg_recall']):.1f} | {100 * r['bg_precision']:.1f} | "
                  f"{100 * r['bg_recall']:.1f} | {100 * f1(r['bg_precision'], r['bg_recall']):.1f} | "
                  f"{r['objects']} | {r['nothing_retrieved']} |")
        results["retrieval"] = pr
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
