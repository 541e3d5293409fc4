"""Scores and the human-readable report of a run (``report.json`` + ``report.md`` + PNGs).

Everything here reads the files a run wrote under its output root, so it works
the same on a laptop and against ``s3://`` outputs.
"""

from __future__ import annotations

import json
import math
from typing import Iterable

from tqdm import tqdm

from pointseg.data.coco_panoptic_io import read_id_map, read_panoptic_annotations
from pointseg.data.images import read_image
from pointseg.data.prepare import join, open_out, read_index
from pointseg.data.record import Category, Points
from pointseg.generators import build_generator
from pointseg.metrics import MIoUEvaluator, PQEvaluator, evaluate_panoptic
from pointseg.viz.overlay import panel, save_png

SUMMARY_KEYS = ("pq", "sq", "rq", "pq_th", "sq_th", "rq_th", "pq_st", "sq_st", "rq_st")


def _finite_or_none(v):
    """NaN (e.g. PQ_st on a things-only dataset) becomes None: ``null`` in strict JSON."""
    return None if isinstance(v, float) and math.isnan(v) else v


def flatten_metrics(pq: dict, miou: dict) -> dict:
    out = {k: _finite_or_none(pq[k]) for k in SUMMARY_KEYS if k in pq}
    out["miou"] = miou["miou"]
    out["per_class"] = pq.get("per_class", {})
    return out


def evaluate_labels(output: str, categories: dict[int, Category]) -> dict:
    """PQ/SQ/RQ (all, things, stuff), per-class PQ and mIoU of ``output/panoptic`` against ``output/gt``."""
    res = evaluate_panoptic(
        join(output, "gt", "panoptic.json"),
        join(output, "gt", "panoptic"),
        join(output, "panoptic.json"),
        join(output, "panoptic"),
        categories,
    )
    out = flatten_metrics(res["pq"], res["miou"])
    out["num_images"] = res.get("num_images")
    out["missing_predictions"] = res.get("missing_predictions", [])
    return out


def score_generator(
    output: str,
    categories: dict[int, Category],
    method: str,
    params: dict | None = None,
    max_images: int | None = None,
    progress: bool = True,
) -> dict:
    """Label the prepared images of ``output`` in this process and score them against ``output/gt``.

    The in-process path for cheap generators and Tune trials: no Ray Data,
    nothing written. An image the generator fails on counts as an empty
    prediction (all its segments false negatives), never as skipped.
    """
    _, _, gt_anns = read_panoptic_annotations(join(output, "gt", "panoptic.json"))
    rows = [r for r in read_index(join(output, "index", "index.parquet")) if r["image_id"] in gt_anns]
    rows = rows[:max_images] if max_images else rows
    gen = build_generator(method, params or {}, categories)
    pq_ev, miou_ev = PQEvaluator(categories), MIoUEvaluator(categories)
    failed = {}
    for r in tqdm(rows, desc=f"score {method}", unit="img", disable=not progress):
        ann = gt_anns[r["image_id"]]
        gt_map = read_id_map(join(output, "gt", "panoptic"), ann["file_name"])
        try:
            image = read_image(r["file_name"])
            label = gen.generate(image, Points.from_list(json.loads(r["points"])))
            pred = (label.id_map, label.segments_info)
        except Exception as exc:  # noqa: BLE001
            failed[r["image_id"]] = f"{type(exc).__name__}: {exc}"
            pred = (gt_map * 0, [])
        pq_ev.process(gt_map, ann["segments_info"], *pred, image_id=r["image_id"])
        miou_ev.process(gt_map, ann["segments_info"], *pred, image_id=r["image_id"])
    out = flatten_metrics(pq_ev.evaluate(), miou_ev.evaluate())
    out["num_images"], out["failed"] = len(rows), failed
    return out


def baseline_scores(output: str, categories: dict[int, Category], methods: Iterable[str]) -> dict:
    """Score cheap baseline generators (default parameters) on the same images and points."""
    return {m: score_generator(output, categories, m) for m in methods}


def write_report(output: str, report: dict, categories: dict[int, Category], num_overlays: int) -> None:
    """``report.json``, overlay PNGs of the first images, and ``report.md`` linking them."""
    overlays = _write_overlays(output, categories, num_overlays)
    report["overlays"] = overlays
    with open_out(join(output, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    with open_out(join(output, "report.md"), "w") as f:
        f.write(render_markdown(report, categories))


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def render_markdown(report: dict, categories: dict[int, Category]) -> str:
    m = report["pseudo_labels"]
    lines = [
        f"# pointseg report: {report['method']}",
        "",
        f"Output root: `{report['output']}`",
        "",
        "## Pseudo-label quality against ground truth",
        "",
        "| labels | PQ | SQ | RQ | PQ_th | SQ_th | RQ_th | PQ_st | SQ_st | RQ_st | mIoU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(report["method"], m)] + [(f"baseline: {k}", v) for k, v in report.get("baselines", {}).items()]
    for name, s in rows:
        lines.append(f"| {name} | " + " | ".join(_pct(s.get(k)) for k in SUMMARY_KEYS + ("miou",)) + " |")
    lines += ["", "## Per class (pseudo labels)", "", "| class | thing | PQ | SQ | RQ | TP | FP | FN |", "|---|---|---|---|---|---|---|---|"]
    for cid, s in sorted(m.get("per_class", {}).items(), key=lambda kv: int(kv[0])):
        cat = categories.get(int(cid))
        name = cat.name if cat else str(cid)
        lines.append(
            f"| {name} | {'yes' if cat and cat.isthing else 'no'} | {_pct(s.get('pq'))} | {_pct(s.get('sq'))} | "
            f"{_pct(s.get('rq'))} | {s.get('tp', '')} | {s.get('fp', '')} | {s.get('fn', '')} |"
        )
    imgs = report["images"]
    lines += [
        "",
        "## Images",
        "",
        f"- labelled in this run: {imgs.get('labelled_now')}, skipped as already done: {imgs.get('skipped_done')}, "
        f"exported: {imgs.get('exported')}, failed: {len(imgs.get('failed', {}))}",
    ]
    prep = report.get("prepare", {})
    if prep.get("images_without_points"):
        lines.append(f"- images without points: {prep['images_without_points']}")
    if prep.get("points_for_unknown_images"):
        lines.append(f"- points for images not in the dataset: {prep['points_for_unknown_images']}")
    if imgs.get("failed"):
        lines += ["", "| image | reason |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(imgs["failed"].items())]
    lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report.get("timings", {}).items()]
    if report.get("overlays"):
        lines += ["", "## Examples: image + points | pseudo label | ground truth", ""]
        lines += [f"![{p}]({p})" for p in report["overlays"]]
    return "\n".join(lines) + "\n"


def _write_overlays(output: str, categories: dict[int, Category], n: int) -> list[str]:
    if n <= 0:
        return []
    _, _, pred_anns = read_panoptic_annotations(join(output, "panoptic.json"))
    _, _, gt_anns = read_panoptic_annotations(join(output, "gt", "panoptic.json"))
    written = []
    for r in read_index(join(output, "index", "index.parquet")):
        if len(written) >= n:
            break
        ann = pred_anns.get(r["image_id"])
        if ann is None:
            continue
        image = read_image(r["file_name"])
        pred = (read_id_map(join(output, "panoptic"), ann["file_name"]), ann["segments_info"])
        g = gt_anns.get(r["image_id"])
        gt = (read_id_map(join(output, "gt", "panoptic"), g["file_name"]), g["segments_info"]) if g else None
        rel = f"report/overlay_{r['image_id']}.png"
        with open_out(join(output, rel), "wb") as f:
            save_png(f, panel(image, Points.from_list(json.loads(r["points"])), pred, gt, categories))
        written.append(rel)
    return written
