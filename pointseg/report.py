"""Scores and the human-readable report of a run (``report.json`` + ``report.md`` + PNGs).

Everything here reads the files a run wrote under its output root, so it works
the same on a laptop and against ``s3://`` outputs.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Iterable

import numpy as np

from tqdm import tqdm

from pointseg.data.coco_panoptic_io import read_id_map, read_panoptic_annotations
from pointseg.data.images import read_image
from pointseg.data.points import validate_points
from pointseg.data.prepare import iter_shard_rows, join, open_out, read_index
from pointseg.data.record import Category, Points
from pointseg.generators import build_generator
from pointseg.metrics import MIoUEvaluator, PQEvaluator, evaluate_panoptic
from pointseg.viz.overlay import panel, save_png

log = logging.getLogger("pointseg.report")

SUMMARY_KEYS = ("pq", "sq", "rq", "pq_th", "sq_th", "rq_th", "pq_st", "sq_st", "rq_st")
#: Per-image optimal-transport diagnostics (pointseg.generators.point2mask) summarised as mean / max.
OT_QUANTITIES = ("marginal_error_row", "marginal_error_col", "ot_iterations", "plan_entropy", "ot_problems", "seconds")
#: Documented per-image fallbacks of the OT generator, summed over the images.
OT_COUNTERS = ("ot_diverged", "ot_skipped", "zero_supply_raised", "centroid_fallbacks", "seed_pixels_restored",
               "unreachable_costs", "nonfinite_map_pixels", "fullres_retry")


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


def ot_diagnostics(output: str, max_rows: int | None = None) -> dict | None:
    """Summary of the OT diagnostics in ``output/shards``' ``diagnostics`` column, or ``None``
    when no labelled image has any (generators without optimal transport, e.g. PSPS).

    Per image (the first successful row, as the COCO export): marginal errors
    (pixel units, max over the image's transport problems), Sinkhorn / solver
    iterations, plan entropy, diverged / converged and the fallback counters.
    Returns ``images``, ``solvers`` (count per solver), ``summary`` ({quantity:
    {mean, max}}), ``diverged_images``, ``not_converged_images``,
    ``fallbacks`` ({counter: sum}) and ``per_image`` (rows, up to ``max_rows``).
    """
    seen: set[int] = set()
    per_image = []
    for r in iter_shard_rows(join(output, "shards"), ["image_id", "diagnostics", "error"]):
        if r["error"] or r["image_id"] in seen:
            continue
        seen.add(r["image_id"])
        d = json.loads(r["diagnostics"] or "{}")
        if "marginal_error_row" not in d:
            continue
        row = {"image_id": int(r["image_id"]), "solver": d.get("solver"), "diverged": bool(d.get("diverged", False)),
               "converged": bool(d.get("converged", True))}
        row.update({k: float(d.get(k, 0.0)) for k in OT_QUANTITIES})
        row.update({k: int(d.get(k, 0)) for k in OT_COUNTERS})
        per_image.append(row)
    if not per_image:
        return None
    per_image.sort(key=lambda r: r["image_id"])
    solvers: dict[str, int] = {}
    for r in per_image:
        solvers[str(r["solver"])] = solvers.get(str(r["solver"]), 0) + 1
    return {
        "images": len(per_image),
        "solvers": solvers,
        "summary": {k: {"mean": float(np.mean([r[k] for r in per_image])), "max": float(np.max([r[k] for r in per_image]))}
                    for k in OT_QUANTITIES},
        "diverged_images": sum(r["diverged"] for r in per_image),
        "not_converged_images": sum(not r["converged"] for r in per_image),
        "fallbacks": {k: int(sum(r[k] for r in per_image)) for k in OT_COUNTERS},
        "per_image": per_image[:max_rows] if max_rows else per_image,
    }


def map_pictures(output: str, categories: dict[int, Category], params: dict, n: int) -> list[str]:
    """``report/maps_<id>.png`` for the first ``n`` images: Point2Mask's ``P^s``, ``P^b`` and
    cost map (:func:`pointseg.viz.maps.maps_panel`) with the run's generator params (the
    learned-maps checkpoint is loaded once, here on the driver). An image that fails is logged
    and left out."""
    from pointseg.viz.maps import maps_panel, point2mask_maps

    if n <= 0:
        return []
    gen = build_generator("point2mask", params, categories)
    written = []
    for r in read_index(join(output, "index", "index.parquet")):
        if len(written) >= n:
            break
        try:
            image = read_image(r["file_name"])
            points, _ = validate_points(Points.from_list(json.loads(r["points"])), *image.shape[:2], categories)
            if len(points) == 0:
                continue
            pic = maps_panel(image, point2mask_maps(gen, image, points), categories)
        except Exception as exc:  # noqa: BLE001 - a picture never sinks the report
            log.warning("map picture of image %s skipped: %s: %s", r["image_id"], type(exc).__name__, exc)
            continue
        rel = f"report/maps_{r['image_id']}.png"
        with open_out(join(output, rel), "wb") as f:
            save_png(f, pic)
        written.append(rel)
    return written


def write_report(output: str, report: dict, categories: dict[int, Category], num_overlays: int,
                 history: list[dict] | None = None) -> None:
    """``report.json``, overlay PNGs of the first images, and ``report.md`` linking them.

    ``history``: the stage-1 (generator training) metrics per step, drawn as
    ``report/generator_loss.png`` when given.
    """
    overlays = _write_overlays(output, categories, num_overlays)
    report["overlays"] = overlays
    if history and "generator_training" in report:
        from pointseg.viz.curves import loss_curve_png

        with open_out(join(output, "report", "generator_loss.png"), "wb") as f:
            f.write(loss_curve_png(history, title="map-network training loss"))
        report["generator_training"]["loss_curve"] = "report/generator_loss.png"
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
    if report.get("generator_training"):
        lines += _generator_training_markdown(report["generator_training"])
    if report.get("ot_diagnostics"):
        lines += _ot_markdown(report["ot_diagnostics"])
    if report.get("map_pictures"):
        lines += ["", "## Point2Mask maps: P^s (max prob, argmax class) | P^b | geodesic cost min over points (Eq. 3)", ""]
        lines += [f"![{p}]({p})" for p in report["map_pictures"]]
    return "\n".join(lines) + "\n"


def _generator_training_markdown(g: dict) -> list[str]:
    lines = ["", "## Stage 1: map network (Ray Train)", "",
             f"- steps: {g.get('steps')} (this run trained {g.get('trained_steps')}, "
             f"resumed from step {g.get('start_step')}), pseudo-label refreshes (L_bou): {g.get('pseudo_refreshes')}",
             f"- last loss: {g.get('last_loss')}, index rows: {g.get('index_rows')}, skipped rows: {g.get('skipped_rows')} "
             f"{g.get('skip_reasons') or ''}",
             f"- checkpoint used by the pseudo-label actors: `{g.get('checkpoint')}`",
             f"- TensorBoard: `tensorboard --logdir {g.get('log_dir')}`"]
    if g.get("loss_curve"):
        lines += ["", f"![map-network loss]({g['loss_curve']})"]
    return lines


def _ot_markdown(d: dict, max_rows: int = 50) -> list[str]:
    fmt = lambda v: f"{v:.4g}"  # noqa: E731
    lines = ["", "## Optimal transport diagnostics (per image)", "",
             f"{d['images']} images, solver {d['solvers']}; diverged: {d['diverged_images']}, "
             f"not converged: {d['not_converged_images']}", ""]
    if not any(r["ot_problems"] for r in d["per_image"]):
        # assignment: mincost (or no image with two things): nothing was transported
        fbs = ", ".join(f"{k} {v}" for k, v in d["fallbacks"].items() if v) or "none"
        return lines + ["No transport problem was solved (assignment `mincost`, or no image with two or more "
                        f"things); per-image rows are in report.json. Counted fallbacks: {fbs}."]
    lines += ["| quantity | mean | max |", "|---|---|---|"]
    lines += [f"| {k} | {fmt(v['mean'])} | {fmt(v['max'])} |" for k, v in d["summary"].items()]
    lines += ["", "| fallback (documented, counted) | images summed |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in d["fallbacks"].items()]
    rows = d["per_image"][:max_rows]
    lines += ["", "| image | marginal err row | marginal err col | iterations | plan entropy | problems | diverged | "
              "fallbacks |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fb = ", ".join(f"{k} {r[k]}" for k in OT_COUNTERS if r[k]) or "-"
        lines.append(f"| {r['image_id']} | {fmt(r['marginal_error_row'])} | {fmt(r['marginal_error_col'])} | "
                     f"{int(r['ot_iterations'])} | {fmt(r['plan_entropy'])} | {int(r['ot_problems'])} | "
                     f"{'yes' if r['diverged'] else 'no'} | {fb} |")
    if len(d["per_image"]) > len(rows):
        lines.append(f"\n({len(d['per_image']) - len(rows)} more images in report.json)")
    return lines


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
