"""The whole pointseg run: dataset -> points -> (Point2Mask, maps: learned) Ray Train map
network (stage 1) -> Ray Data pseudo labels -> evaluation -> (train.enabled) Ray Train stage 2
-> model evaluation -> report.

    python flows/full_pipeline.py --config configs/full_pipeline.yaml --output out/demo [key.path=value ...]
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python flows/full_pipeline.py --output /tmp/run

Writes ``OUTPUT/report.json`` and ``OUTPUT/report.md`` (tables and overlay PNGs).
"""

from __future__ import annotations

import json
import logging
from typing import Callable

from common import StageTimer, init_ray, pipeline_args
from evaluate_model import evaluate_model
from pseudo_label import export_panoptic, run_pseudo_labels
from train import run_training
from train_maps import generator_training as point2mask_maps_training

from pointseg.config import PipelineConfig
from pointseg.data.prepare import join, open_out, prepare_inputs, read_index
from pointseg.generators import generator_fingerprint
from pointseg.report import baseline_scores, evaluate_labels, map_pictures, ot_diagnostics, write_report

log = logging.getLogger("pointseg.flows.full_pipeline")

#: Generators whose stage 1 needs training before labelling: method -> fn(cfg, categories, output)
#: -> None (nothing to train) or a dict for the report whose ``generator_params`` are merged into
#: ``generator.params`` of the pseudo-label stage (Point2Mask: the trained MapNet checkpoint).
GENERATOR_TRAINING: dict[str, Callable] = {"point2mask": point2mask_maps_training}


def run(cfg: PipelineConfig, output: str) -> dict:
    timer = StageTimer()
    with timer.stage("prepare"):
        categories, prep = prepare_inputs(cfg.dataset, cfg.points, output, cfg.strict)
    init_ray(cfg.ray)
    generator_training = None
    if cfg.generator.method in GENERATOR_TRAINING:
        with timer.stage("generator_training"):
            generator_training = GENERATOR_TRAINING[cfg.generator.method](cfg, categories, output)
        if generator_training is not None:
            cfg = cfg.model_copy(deep=True)
            cfg.generator.params = {**cfg.generator.params, **generator_training["generator_params"]}
    with timer.stage("pseudo_label"):
        counts = run_pseudo_labels(cfg, categories, output)
    with timer.stage("export"):
        fingerprint = generator_fingerprint(cfg.generator.method, cfg.generator.params)
        exported = export_panoptic(output, categories, fingerprint)
    with timer.stage("evaluate"):
        metrics = evaluate_labels(output, categories)
    with timer.stage("baselines"):
        baselines = baseline_scores(output, categories, cfg.report.baselines)
    report = {
        "method": cfg.generator.method,
        "config": cfg.model_dump(mode="json"),
        "output": output,
        "pseudo_labels": metrics,
        "baselines": baselines,
        "images": {**counts, "exported": exported["images"], "failed": exported["errors"]},
        "prepare": prep.to_dict(),
        "timings": timer.seconds,
    }
    if generator_training is not None:
        report["generator_training"] = {k: v for k, v in generator_training.items() if k != "history"}
    diagnostics = ot_diagnostics(output)
    if diagnostics is not None:
        report["ot_diagnostics"] = diagnostics
    if cfg.generator.method == "point2mask":
        with timer.stage("map_pictures"):
            report["map_pictures"] = map_pictures(output, categories, cfg.generator.params, cfg.report.num_overlays)
    stage2 = None
    if cfg.train.enabled:
        with timer.stage("train"):
            trained = run_training(cfg, categories, output)
        with timer.stage("evaluate_model"):
            stage2 = evaluate_model(cfg, categories, output, trained["checkpoint"], trained["validation_images"])
        report["model"] = model_section(cfg, trained, stage2["metrics"])
    with timer.stage("report"):
        write_report(output, report, categories, cfg.report.num_overlays,
                     history=generator_training["history"] if generator_training is not None else None)
        if stage2 is not None:
            append_model_report(output, report, trained, stage2["rows"], categories, cfg.train.eval.num_pictures)
    report["timings"] = timer.seconds
    with open_out(join(output, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    return report


def model_section(cfg: PipelineConfig, trained: dict, metrics: dict) -> dict:
    keys = ("pq", "pq_th", "pq_st", "sq", "rq") + (("ap", "ap50", "ap75") if cfg.train.task == "instance" else ())
    history = trained["history"]
    return {
        "task": cfg.train.task,
        "supervision": cfg.train.supervision,
        **{k: metrics.get(k) for k in keys},
        "metrics": metrics,
        "checkpoint": trained["checkpoint"],
        "tensorboard": trained["log_dir"],
        "steps": cfg.train.steps,
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "train_rows": trained["train_rows"],
        "skipped_rows": trained["skipped_rows"],
        "skip_reasons": trained["skip_reasons"],
        "validation_images": len(trained["validation_images"]),
    }


def append_model_report(output: str, report: dict, trained: dict, rows: list[dict], categories, n: int) -> None:
    """Add the stage-2 section to report.md: metrics, a loss curve and validation predictions beside ground truth."""
    from pointseg.data.coco_panoptic_io import read_id_map, read_panoptic_annotations
    from pointseg.data.images import read_image
    from pointseg.data.panoptic_format import decode_png
    from pointseg.data.record import Points
    from pointseg.viz.curves import loss_curve_png
    from pointseg.viz.overlay import panel, save_png

    m = report["model"]
    pct = lambda v: "-" if v is None or v != v else f"{100 * v:.1f}"  # noqa: E731
    lines = ["", f"## Stage-2 model ({m['task']}, trained on {m['supervision']} labels)", "",
             "| PQ | PQ_th | PQ_st | SQ | RQ |" + (" AP | AP50 | AP75 |" if "ap" in m else ""),
             "|---|---|---|---|---|" + ("---|---|---|" if "ap" in m else ""),
             "| " + " | ".join(pct(m[k]) for k in ("pq", "pq_th", "pq_st", "sq", "rq")) + " |"
             + ("".join(f" {pct(m[k])} |" for k in ("ap", "ap50", "ap75")) if "ap" in m else ""),
             "", f"- {m['validation_images']} validation images (never trained on), {m['steps']} steps, "
             f"{m['train_rows']} training rows, {m['skipped_rows']} bad rows skipped {m['skip_reasons'] or ''}",
             f"- checkpoint: `{m['checkpoint']}`", f"- TensorBoard: `tensorboard --logdir {m['tensorboard']}`"]
    if trained["history"]:
        with open_out(join(output, "report", "loss_curve.png"), "wb") as f:
            f.write(loss_curve_png(trained["history"]))
        lines += ["", "![training loss](report/loss_curve.png)"]
    _, _, gt = read_panoptic_annotations(join(output, "gt", "panoptic.json"))
    index = {r["image_id"]: r for r in read_index(join(output, "index", "index.parquet"))}
    pics = []
    for r in rows[:n]:
        image_id = int(r["image_id"])
        ann = gt[image_id]
        image = read_image(index[image_id]["file_name"])
        pred = (decode_png(bytes(r["pred_png"])), json.loads(r["pred_segments_info"]))
        truth = (read_id_map(join(output, "gt", "panoptic"), ann["file_name"]), ann["segments_info"])
        rel = f"report/model_{image_id}.png"
        with open_out(join(output, rel), "wb") as f:
            save_png(f, panel(image, Points.empty(), pred, truth, categories, ("image", "model prediction", "ground truth")))
        pics.append(rel)
    if pics:
        lines += ["", "### Validation predictions | ground truth", ""] + [f"![{p}]({p})" for p in pics]
    report["model"]["pictures"] = pics
    import fsspec

    with fsspec.open(join(output, "report.md"), "r") as f:
        text = f.read()
    with open_out(join(output, "report.md"), "w") as f:
        f.write(text + "\n".join(lines) + "\n")


def scores_line(m: dict) -> str:
    return "  ".join(
        f"{name} {'n/a' if m.get(key) is None else f'{100 * m[key]:.1f}'}"
        for name, key in (("PQ", "pq"), ("PQ_th", "pq_th"), ("PQ_st", "pq_st"), ("mIoU", "miou"))
    )


def main() -> None:
    cfg, output = pipeline_args(__doc__, "configs/full_pipeline.yaml")
    report = run(cfg, output)
    m = report["pseudo_labels"]
    print(f"\npseudo labels ({report['method']}): {scores_line(m)}  on {report['images']['exported']} images")
    for name, b in report["baselines"].items():
        print(f"baseline {name}: {scores_line(b)}")
    if "generator_training" in report:
        g = report["generator_training"]
        print(f"stage-1 map network: {g['steps']} steps ({g['trained_steps']} in this run), "
              f"last loss {g['last_loss']}, checkpoint {g['checkpoint']}")
    if "ot_diagnostics" in report:
        d = report["ot_diagnostics"]
        print(f"OT: {d['images']} images, marginal error col max {d['summary']['marginal_error_col']['max']:.3g}, "
              f"diverged {d['diverged_images']}, fallbacks {d['fallbacks']}")
    if "model" in report:
        mm = report["model"]
        extra = f"  AP {100 * mm['ap']:.1f}  AP50 {100 * mm['ap50']:.1f}  AP75 {100 * mm['ap75']:.1f}" if "ap" in mm else ""
        print(f"stage-2 model ({mm['supervision']} labels): PQ {100 * mm['pq']:.1f}  PQ_th {100 * mm['pq_th']:.1f}  "
              f"PQ_st {100 * mm['pq_st']:.1f}{extra}  loss {mm['first_loss']} -> {mm['last_loss']}  "
              f"checkpoint {mm['checkpoint']}")
    print(f"report: {join(output, 'report.md')}  (json: {join(output, 'report.json')})")
    print(json.dumps({"timings_s": report["timings"]}))


if __name__ == "__main__":
    main()
