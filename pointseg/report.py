"""Scores and the human-readable report of a run (``report.json`` + ``report.md`` + PNGs).

Everything here reads the files a run wrote under its output root, so it works
the same on a laptop and against ``s3://`` outputs. Every step after labelling
is per image: an image that cannot be scored, drawn or relabelled by a
baseline is listed with its stage and reason in ``report["failures"]`` and the
run goes on; the report is always written.

Quality of labels against ground truth (pseudo labels and baselines alike):
PQ / SQ / RQ (all, things, stuff), per-class PQ, mIoU, and instance quality:
COCO mask AP and AP50 of the thing segments (score 1.0 each) and the mean best
IoU per ground-truth object (:mod:`pointseg.metrics.instances`) -- PQ_th with
the background VOID forgives a thing that floods the background; these do not.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Iterator

import fsspec

from pointseg.data.coco_panoptic_io import read_id_map, read_panoptic_annotations
from pointseg.evaluation import (GroundTruth, comparison_sheet, contrasting_images, evaluate_generator,
                                 labels_by_id, reference_baseline, score)
from pointseg.data.images import read_image_as_annotated
from pointseg.data.panoptic_format import decode_png
from pointseg.data.points import validate_points
from pointseg.data.prepare import join, open_out, read_index
from pointseg.data.record import Category, Points
from pointseg.data.shards import iter_verified_rows
from pointseg.generators import PseudoLabel, build_generator, generator_class
from pointseg.viz.curves import loss_curve_png
from pointseg.viz.overlay import panel, save_png

log = logging.getLogger("pointseg.report")

SUMMARY_KEYS = ("pq", "sq", "rq", "pq_th", "sq_th", "rq_th", "pq_st", "sq_st", "rq_st")
INSTANCE_KEYS = ("mask_ap", "mask_ap50", "mean_best_iou")
#: stage-2 instance models: COCO mask AP, then the same with pycocotools' useCats = 0 (masks without classes)
INSTANCE_AP_KEYS = ("ap", "ap50", "ap75", "agnostic_ap", "agnostic_ap50")


def _finite_or_none(v):
    """NaN (e.g. PQ_st on a things-only dataset) becomes None: ``null`` in strict JSON."""
    return None if isinstance(v, float) and math.isnan(v) else v


def _exported_labels(output: str, gt: GroundTruth, errors: dict[int, str],
                     image_ids: list[int] | None = None) -> Iterator[tuple[dict, PseudoLabel | None, str]]:
    """``(row, label, error)`` of every ground-truth image (or of ``image_ids``) from ``OUTPUT/panoptic`` (for
    :func:`score`); an image without an exported label carries its labelling error."""
    _, _, pred_anns = read_panoptic_annotations(join(output, "panoptic.json"))
    for image_id in sorted(gt.annotations) if image_ids is None else image_ids:
        p = pred_anns.get(image_id)
        if p is None:
            yield {"image_id": image_id}, None, f"no label: {errors.get(image_id, 'not exported')}"
            continue
        try:
            yield {"image_id": image_id}, PseudoLabel(read_id_map(join(output, "panoptic"), p["file_name"]),
                                                      p["segments_info"]), ""
        except Exception as exc:  # noqa: BLE001 - an unreadable label PNG fails that image only
            yield {"image_id": image_id}, None, f"read label: {type(exc).__name__}: {exc}"


def evaluate_labels(output: str, categories: dict[int, Category], errors: dict[int, str] | None = None) -> dict:
    """Scores of ``OUTPUT/panoptic`` against ``OUTPUT/gt`` (:func:`pointseg.evaluation.score`), per image.

    An image without an exported label counts as an empty prediction and is
    listed in ``failed`` with its labelling error from ``errors``.
    """
    gt = GroundTruth(output)
    return score(_exported_labels(output, gt, errors or {}), gt, categories)


def score_generator(output: str, categories: dict[int, Category], method: str, params: Any = None,
                    max_images: int | None = None, progress: bool = True) -> dict:
    """Label the prepared images of ``output`` in this process with ``method`` and score them
    (:func:`pointseg.evaluation.evaluate_generator`: the pipeline's input rules, failures listed)."""
    return evaluate_generator(build_generator(method, params or {}, categories), output, "all",
                              max_images=max_images, progress=progress)


def evaluate_run(output: str, categories: dict[int, Category], cfg, errors: dict[int, str] | None = None) -> dict:
    """Scores of the run's pseudo labels and of its baselines (None without ground truth); ``failures``
    lists every image a baseline could not label. ``errors``: the labelling errors of the run."""
    fs, path = fsspec.core.url_to_fs(join(output, "gt", "panoptic.json"))
    if not fs.exists(path):
        return {"pseudo_labels": None, "baselines": {}, "failures": []}
    failures: list[dict] = []
    labels = evaluate_labels(output, categories, errors)
    baselines = {}
    for m in cfg.report.baselines:
        try:
            baselines[m] = score_generator(output, categories, m)
        except Exception as exc:  # noqa: BLE001 - a baseline that cannot be built is reported, not fatal
            failures.append({"image_id": None, "stage": f"baseline[{m}]", "reason": f"{type(exc).__name__}: {exc}"})
            continue
        failures += [{"image_id": k, "stage": f"baseline[{m}]", "reason": v} for k, v in baselines[m]["failed"].items()
                     if k not in (errors or {})]
    return {"pseudo_labels": labels, "baselines": baselines, "failures": failures}


# ----------------------------------------------------------------------------- sections


def model_section(cfg, trained: dict, evaluated: dict) -> dict:
    """The stage-2 part of the report: metrics on the held-out images, training numbers, pictures' rows."""
    m = evaluated["metrics"]
    history = trained["history"]
    keys = SUMMARY_KEYS + (INSTANCE_AP_KEYS if cfg.train.task == "instance" else ())
    return {
        "model": cfg.train.model,
        "task": cfg.train.task,
        "supervision": cfg.train.supervision,
        **{k: _finite_or_none(m.get(k)) for k in keys},
        "metrics": {k: _finite_or_none(v) for k, v in m.items() if not isinstance(v, dict)},
        "failed_images": m.get("failed_images", {}),
        "checkpoint": trained["checkpoint"],
        "tensorboard": trained["log_dir"],
        "steps": trained["steps"],
        "trained_steps": trained["trained_steps"],
        "first_loss": history[0].get("loss") if history else None,
        "last_loss": trained["last_loss"],
        "train_rows": trained["train_rows"],
        "skipped_rows": trained["skipped_rows"],
        "skip_reasons": trained["skip_reasons"],
        "validation_images": len(trained["validation_images"]),
        "history": history,
        "pictures_rows": evaluated.get("pictures", []),
    }


def _failures(prep, counts: dict, exported: dict, quality: dict, stage2: dict | None) -> list[dict]:
    """Every image that failed anywhere, with its stage and reason (reader and point-file problems
    included); an image already refused by prepare is listed once, under its prepare problem."""
    prep_d = prep.to_dict() if hasattr(prep, "to_dict") else dict(prep or {})
    out = [{"image_id": p.get("image_id"), "stage": f"read[{p.get('kind', 'problem')}]", "reason": p.get("reason", "")}
           for p in prep_d.get("problems", [])]
    known = {int(k) for k in prep_d.get("image_errors", {})}
    for image_id, reason in sorted(exported["errors"].items()):
        if int(image_id) in known:
            continue
        stage, _, rest = reason.partition(": ")
        out.append({"image_id": image_id, "stage": f"label:{stage}" if rest else "label", "reason": rest or reason})
    out += [{"image_id": i, "stage": "shard checksum", "reason": f"row in {f} failed its checksum; relabelled"}
            for i, f in counts.get("corrupt_rows", {}).items()]
    out += [{"image_id": None, "stage": "shard quarantined", "reason": f"{f}: {r}"}
            for f, r in counts.get("quarantined", {}).items()]
    out += quality.get("failures", [])
    if stage2:
        out += [{"image_id": i, "stage": "evaluate_model", "reason": r} for i, r in stage2["failed_images"].items()]
    return out


def _pictures(output: str, cfg, categories: dict[int, Category], failures: list[dict]) -> tuple[list[str], list[str]]:
    """Overlays ``image + points | label | ground truth`` and the generator's own pictures
    (:meth:`~pointseg.generators.base.PseudoLabelGenerator.explain`) of the first images; per image."""
    n = cfg.report.num_overlays
    if n <= 0:
        return [], []
    gt_anns = {}
    gt_json = join(output, "gt", "panoptic.json")
    if fsspec.core.url_to_fs(gt_json)[0].exists(fsspec.core.url_to_fs(gt_json)[1]):
        _, _, gt_anns = read_panoptic_annotations(gt_json)
    labels = {}
    for r in iter_verified_rows(join(output, "shards"), ["image_id", "label_png", "segments_info", "error", "config_hash"]):
        if not r["error"] and len(labels) < 4 * n:
            labels.setdefault(int(r["image_id"]), r)
    overlays, explained = [], []
    explainer = None
    for r in read_index(join(output, "index", "index.parquet")):
        if len(overlays) >= n:
            break
        image_id = int(r["image_id"])
        if image_id not in labels:
            continue
        try:
            image = read_image_as_annotated(r["file_name"], int(r["height"]), int(r["width"]))
            lab = labels[image_id]
            pred = (decode_png(lab["label_png"]), json.loads(lab["segments_info"]))
            g = gt_anns.get(image_id)
            gt = (read_id_map(join(output, "gt", "panoptic"), g["file_name"]), g["segments_info"]) if g else None
            points = Points.from_list(json.loads(r["points"]))
            rel = f"report/overlay_{image_id}.png"
            with open_out(join(output, rel), "wb") as f:
                save_png(f, panel(image, points, pred, gt, categories))
            overlays.append(rel)
            if explainer is None:
                explainer = build_generator(cfg.generator.method, cfg.generator.params, categories)
            valid, _ = validate_points(points, *image.shape[:2], categories)
            pic = explainer.explain(image, valid) if len(valid) else None
            if pic is not None:
                rel = f"report/explain_{image_id}.png"
                with open_out(join(output, rel), "wb") as f:
                    save_png(f, pic)
                explained.append(rel)
        except Exception as exc:  # noqa: BLE001 - a picture never sinks the report
            failures.append({"image_id": image_id, "stage": "pictures", "reason": f"{type(exc).__name__}: {exc}"})
    return overlays, explained


def _model_pictures(output: str, stage2: dict, categories: dict[int, Category], failures: list[dict]) -> list[str]:
    """Validation predictions beside ground truth, per image."""
    _, _, gt = read_panoptic_annotations(join(output, "gt", "panoptic.json"))
    index = {int(r["image_id"]): r for r in read_index(join(output, "index", "index.parquet"))}
    pics = []
    for row in stage2.pop("pictures_rows", []):
        image_id = int(row["image_id"])
        try:
            r, ann = index[image_id], gt[image_id]
            image = read_image_as_annotated(r["file_name"], int(r["height"]), int(r["width"]))
            pred = (decode_png(bytes(row["pred_png"])), json.loads(row["pred_segments_info"]))
            truth = (read_id_map(join(output, "gt", "panoptic"), ann["file_name"]), ann["segments_info"])
            rel = f"report/model_{image_id}.png"
            with open_out(join(output, rel), "wb") as f:
                save_png(f, panel(image, Points.empty(), pred, truth, categories, ("image", "model prediction", "ground truth")))
            pics.append(rel)
        except Exception as exc:  # noqa: BLE001
            failures.append({"image_id": image_id, "stage": "model pictures", "reason": f"{type(exc).__name__}: {exc}"})
    return pics


def _curve(output: str, history: list[dict], name: str, title: str) -> str | None:
    if not history:
        return None
    rel = f"report/{name}.png"
    with open_out(join(output, rel), "wb") as f:
        f.write(loss_curve_png(history, title=title))
    return rel


def _contrast_picture(output: str, cfg, categories: dict[int, Category], quality: dict,
                      failures: list[dict]) -> dict | None:
    """``report/contrast.png``: the ``report.num_contrasts`` images where the pseudo labels' mean best IoU is
    furthest above and below the first baseline's (psps if listed;
    :func:`pointseg.evaluation.contrasting_images`), with every baseline beside them
    (:func:`pointseg.evaluation.comparison_sheet`); ``{"png", "reference", "image_ids"}`` or None."""
    ours, baselines = quality.get("pseudo_labels"), quality.get("baselines") or {}
    k = cfg.report.num_contrasts
    if k <= 0 or not ours or not baselines:
        return None
    reference = reference_baseline(baselines)
    ids = contrasting_images(ours["per_image"], baselines[reference]["per_image"], k)
    if not ids:
        return None
    try:
        gt = GroundTruth(output)
        by_id = {int(r["image_id"]): r for r in read_index(join(output, "index", "index.parquet"))}
        rows = [by_id[i] for i in ids]
        methods = [(cfg.generator.method, {int(r["image_id"]): lab for r, lab, _ in
                                           _exported_labels(output, gt, {}, ids)}, ours["per_image"])]
        methods += [(name, labels_by_id(build_generator(name, {}, categories), rows), b["per_image"])
                    for name, b in baselines.items()]
        rel = "report/contrast.png"
        with open_out(join(output, rel), "wb") as f:
            save_png(f, comparison_sheet(rows, methods, gt, categories))
    except Exception as exc:  # noqa: BLE001 - a picture never sinks the report
        failures.append({"image_id": None, "stage": "pictures[contrast]", "reason": f"{type(exc).__name__}: {exc}"})
        return None
    return {"png": rel, "reference": reference, "image_ids": ids}


def write_report(output: str, cfg, categories: dict[int, Category], prep, counts: dict, exported: dict, quality: dict,
                 stage1: dict | None, stage2: dict | None, timings: dict) -> dict:
    """Assemble, write and return the run's report: ``report.json``, ``report.md`` and ``report/*.png``."""
    failures = _failures(prep, counts, exported, quality, stage2)
    overlays, explained = _pictures(output, cfg, categories, failures)
    gen_cls = generator_class(cfg.generator.method)
    diagnostics = []
    for r in iter_verified_rows(join(output, "shards"), ["image_id", "diagnostics", "error", "config_hash"]):
        if not r["error"]:
            diagnostics.append({**json.loads(r["diagnostics"] or "{}"), "image_id": int(r["image_id"])})
    report: dict[str, Any] = {
        "method": cfg.generator.method,
        "background": cfg.dataset.background,
        "config": cfg.model_dump(mode="json"),
        "output": output,
        "pseudo_labels": quality["pseudo_labels"],
        "baselines": quality["baselines"],
        "images": {"total": getattr(prep, "num_images", None), **{k: v for k, v in counts.items()},
                   "exported": exported["images"], "failed": {str(k): v for k, v in exported["errors"].items()}},
        "prepare": prep.to_dict() if hasattr(prep, "to_dict") else {},
        "per_image": _per_image(quality),
        "method_summary": gen_cls.summarize(diagnostics),
        "overlays": overlays,
        "contrast": _contrast_picture(output, cfg, categories, quality, failures),
        "explain_pictures": explained,
    }
    if stage1 is not None:
        report["generator_training"] = {k: v for k, v in stage1.items() if k != "history"}
        report["generator_training"]["loss_curve"] = _curve(output, stage1["history"], "generator_loss",
                                                            f"{cfg.generator.method} stage-1 training loss")
    if stage2 is not None:
        stage2["loss_curve"] = _curve(output, stage2.pop("history"), "loss_curve", "stage-2 training loss")
        stage2["pictures"] = _model_pictures(output, stage2, categories, failures)
        report["model"] = stage2
    report["failures"] = failures
    report["timings"] = dict(timings)
    save_report(output, report, categories)
    return report


def save_report(output: str, report: dict, categories: dict[int, Category]) -> None:
    """``OUTPUT/report.json`` (NaN as null) and ``OUTPUT/report.md``."""
    with open_out(join(output, "report.json"), "w") as f:
        json.dump(_json_safe(report), f, indent=2, default=str)
    with open_out(join(output, "report.md"), "w") as f:
        f.write(render_markdown(report, categories))


def _json_safe(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _per_image(quality: dict) -> list[dict]:
    """One row per scored image: its PQ and mean best IoU (from the quality of the pseudo labels)."""
    m = quality.get("pseudo_labels") or {}
    failed = m.get("failed", {})
    return [{"image_id": int(k), **v, "error": failed.get(k, "")} for k, v in sorted(m.get("per_image", {}).items())]


# ----------------------------------------------------------------------------- markdown


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def render_markdown(report: dict, categories: dict[int, Category]) -> str:
    lines = [f"# pointseg report: {report['method']}", "", f"Output root: `{report['output']}`", ""]
    m = report.get("pseudo_labels")
    if m:
        lines += [f"## Pseudo-label quality against ground truth (background: {report.get('background', 'void')})", "",
                  "| labels | PQ | SQ | RQ | PQ_th | SQ_th | RQ_th | PQ_st | SQ_st | RQ_st | mIoU | mask AP | AP50 | "
                  "mean best IoU |", "|---" * 14 + "|"]
        rows = [(report["method"], m)] + [(f"baseline: {k}", v) for k, v in report.get("baselines", {}).items()]
        for name, s in rows:
            lines.append(f"| {name} | " + " | ".join(_pct(s.get(k)) for k in SUMMARY_KEYS + ("miou",) + INSTANCE_KEYS) + " |")
        lines += ["", "mask AP: COCO mask AP of the thing segments, each with score 1.0; mean best IoU: the best IoU of "
                  "each ground-truth object with any predicted thing segment, averaged (0.2 is a segment flooding the "
                  "background).", "", "## Per class (pseudo labels)", "",
                  "| class | thing | PQ | SQ | RQ | TP | FP | FN |", "|---|---|---|---|---|---|---|---|"]
        for cid, s in sorted(m.get("per_class", {}).items(), key=lambda kv: int(kv[0])):
            cat = categories.get(int(cid))
            lines.append(f"| {cat.name if cat else cid} | {'yes' if cat and cat.isthing else 'no'} | {_pct(s.get('pq'))} | "
                         f"{_pct(s.get('sq'))} | {_pct(s.get('rq'))} | {s.get('tp', '')} | {s.get('fp', '')} | {s.get('fn', '')} |")
    else:
        lines += ["No ground truth: no quality figures (see the review page for per-image uncertainty).", ""]
    imgs = report["images"]
    lines += ["", "## Images", "",
              f"- images: {imgs.get('total')}; labelled in this run: {imgs.get('labelled_now')} "
              f"({imgs.get('path') or 'nothing to do'}), already done: {imgs.get('skipped_done')}, "
              f"exported: {imgs.get('exported')}, failed: {len(imgs.get('failed', {}))}"]
    failures = report.get("failures", [])
    if failures:
        lines += ["", f"### Problems ({len(failures)}): every image that failed somewhere, and why", "",
                  "| image | stage | reason |", "|---|---|---|"]
        lines += [f"| {f['image_id'] if f['image_id'] is not None else '-'} | {f['stage']} | "
                  f"{str(f['reason']).replace('|', '/')[:300]} |" for f in failures]
    if report.get("review"):
        r = report["review"]
        corr = r.get("correlation") or {}
        lines += ["", "## Review page", "",
                  f"[review/index.html](review/index.html): every image worst first ({r.get('sort')}), its uncertainty "
                  f"and next-click suggestions (`suggestions.jsonl`)."
                  + (f" Spearman correlation of per-image uncertainty and PQ: {corr.get('spearman'):.2f}."
                     if isinstance(corr, dict) and isinstance(corr.get("spearman"), float) else "")]
    lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report.get("timings", {}).items()]
    if report.get("overlays"):
        lines += ["", "## Examples: image + points | pseudo label | ground truth", ""]
        lines += [f"![{p}]({p})" for p in report["overlays"]]
    if report.get("contrast"):
        c = report["contrast"]
        lines += ["", f"## Where the pseudo labels win and lose against {c['reference']}", "",
                  f"The {len(c['image_ids'])} images where the mean best IoU of {report['method']}'s labels is furthest "
                  f"above, then below, {c['reference']}'s (image ids {', '.join(map(str, c['image_ids']))}); each "
                  "tile's title gives that image's PQ and mean best IoU.", "", f"![contrast]({c['png']})"]
    if report.get("generator_training"):
        lines += _stage1_markdown(report["generator_training"], report["method"])
    if report.get("method_summary"):
        lines += _summary_markdown(report["method_summary"])
    if report.get("explain_pictures"):
        lines += ["", f"## Inside {report['method']}", ""] + [f"![{p}]({p})" for p in report["explain_pictures"]]
    if report.get("model"):
        lines += _model_markdown(report["model"])
    return "\n".join(lines) + "\n"


def _stage1_markdown(g: dict, method: str) -> list[str]:
    lines = ["", f"## Stage 1: {method} network (Ray Train)", "",
             f"- steps: {g.get('steps')} (this run trained {g.get('trained_steps')}, resumed from step {g.get('start_step')})",
             *([f"- already trained: an earlier run of this run name reached step {g.get('start_step')}; its final "
                "checkpoint was exported again and no Ray Train run started"] if g.get("already_trained") else []),
             f"- last loss: {g.get('last_loss')}, index rows: {g.get('index_rows')}, skipped rows: {g.get('skipped_rows')} "
             f"{g.get('skip_reasons') or ''}",
             f"- checkpoint used by the labelling actors: `{g.get('checkpoint')}`",
             f"- TensorBoard: `tensorboard --logdir {g.get('log_dir')}`"]
    if g.get("source"):
        src = g["source"]
        lines.append(f"- trained first, its semantic source: {src['steps']} steps (this run {src['trained_steps']}), "
                     f"last loss {src['last_loss']}, checkpoint `{src['checkpoint']}`")
    if g.get("loss_curve"):
        lines += ["", f"![stage-1 loss]({g['loss_curve']})"]
    return lines


def _summary_markdown(d: dict, max_rows: int = 50) -> list[str]:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["", f"## {d.get('title', 'Method diagnostics')}", ""]
    head = {k: v for k, v in d.items() if k not in ("title", "summary", "table", "note", "fallbacks")}
    lines.append("; ".join(f"{k}: {v}" for k, v in head.items()))
    if d.get("note"):
        return lines + ["", d["note"]]
    summary = d.get("summary") or {}
    stats = {k: v for k, v in summary.items() if isinstance(v, dict) and {"mean", "max"} <= set(v)}
    if stats:
        lines += ["", "| quantity | mean | max |", "|---|---|---|"]
        lines += [f"| {k} | {fmt(v['mean'])} | {fmt(v['max'])} |" for k, v in stats.items()]
    counts = {k: v for k, v in summary.items() if k not in stats}
    if counts:
        lines += ["", "| counter | total |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in counts.items()]
    if d.get("fallbacks"):
        lines += ["", "| fallback (documented, counted) | images summed |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in d["fallbacks"].items()]
    table = d.get("table") or []
    if table:
        keys = list(table[0])
        lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in table[:max_rows]]
        if len(table) > max_rows:
            lines.append(f"\n({len(table) - max_rows} more rows in report.json)")
    return lines


def _model_markdown(m: dict) -> list[str]:
    ap = "ap" in m
    lines = ["", f"## Stage-2 model ({m['model']}, {m['task']}, trained on {m['supervision']} labels)", "",
             "| PQ | PQ_th | PQ_st | SQ | RQ |"
             + (" AP | AP50 | AP75 | AP class-agnostic | AP50 class-agnostic |" if ap else ""),
             "|---|---|---|---|---|" + ("---|" * len(INSTANCE_AP_KEYS) if ap else ""),
             "| " + " | ".join(_pct(m[k]) for k in ("pq", "pq_th", "pq_st", "sq", "rq")) + " |"
             + ("".join(f" {_pct(m.get(k))} |" for k in INSTANCE_AP_KEYS) if ap else ""),
             "", f"- {m['validation_images']} validation images (never trained on), {m['steps']} steps, "
             f"{m['train_rows']} training rows, {m['skipped_rows']} bad rows skipped {m['skip_reasons'] or ''}",
             f"- checkpoint: `{m['checkpoint']}`", f"- TensorBoard: `tensorboard --logdir {m['tensorboard']}`"]
    if m.get("loss_curve"):
        lines += ["", f"![training loss]({m['loss_curve']})"]
    if m.get("pictures"):
        lines += ["", "### Validation predictions | ground truth", ""] + [f"![{p}]({p})" for p in m["pictures"]]
    return lines


def console_summary(report: dict) -> str:
    """The few lines a flow prints at the end of a run."""

    def scores(m: dict) -> str:
        return "  ".join(f"{name} {_pct(m.get(key)) if m.get(key) is not None else 'n/a'}" for name, key in (
            ("PQ", "pq"), ("PQ_th", "pq_th"), ("PQ_st", "pq_st"), ("mIoU", "miou"), ("maskAP", "mask_ap"),
            ("bestIoU", "mean_best_iou")))

    out = []
    if report.get("pseudo_labels"):
        out.append(f"\npseudo labels ({report['method']}, background {report['background']}): "
                   f"{scores(report['pseudo_labels'])}  on {report['images']['exported']} images")
        out += [f"baseline {name}: {scores(b)}" for name, b in report["baselines"].items()]
    else:
        out.append(f"\npseudo labels ({report['method']}): {report['images']['exported']} images (no ground truth)")
    if report.get("generator_training"):
        g = report["generator_training"]
        done = " (already trained: no Ray Train run started)" if g.get("already_trained") else ""
        out.append(f"stage 1: {g['steps']} steps ({g['trained_steps']} in this run){done}, last loss {g['last_loss']}, "
                   f"checkpoint {g['checkpoint']}")
    if report.get("model"):
        mm = report["model"]
        extra = (f"  AP {_pct(mm['ap'])}  AP50 {_pct(mm['ap50'])}  class-agnostic AP {_pct(mm.get('agnostic_ap'))}"
                 f"  AP50 {_pct(mm.get('agnostic_ap50'))}" if "ap" in mm else "")
        out.append(f"stage-2 {mm['model']} ({mm['supervision']} labels): PQ {_pct(mm['pq'])}  PQ_th {_pct(mm['pq_th'])}"
                   f"{extra}  loss {mm['first_loss']} -> {mm['last_loss']}")
    if report.get("failures"):
        out.append(f"{len(report['failures'])} problem(s) listed in report.md")
    out.append(f"report: {join(report['output'], 'report.md')}  (json: {join(report['output'], 'report.json')})")
    return "\n".join(out)
