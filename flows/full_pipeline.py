"""The whole pointseg run: dataset -> points -> (trainable generator) stage 1 on Ray Train -> pseudo
labels on Ray Data -> COCO export -> evaluation -> (train.enabled) stage 2 on Ray Train -> model
evaluation -> report and review page.

    python flows/full_pipeline.py --config configs/full_pipeline.yaml --output out/demo [key.path=value ...]
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python flows/full_pipeline.py --output /tmp/run

Writes ``OUTPUT/report.json``, ``OUTPUT/report.md`` (tables and pictures) and
``OUTPUT/review/index.html``.
"""

from __future__ import annotations

import json
import logging

from common import StageTimer, init_ray, pipeline_args

from operators.evaluation import evaluate_model
from operators.pseudo_label import export_panoptic, run_pseudo_labels
from operators.training import train_generator, train_stage2
from pointseg.config import PipelineConfig, with_generator_params
from pointseg.data.prepare import prepare_inputs
from pointseg.generators import generator_fingerprint
from pointseg.report import console_summary, evaluate_run, model_section, save_report, write_report
from pointseg.review.page import write_review
from pointseg.storage import OutputLock

log = logging.getLogger("pointseg.flows.full_pipeline")


def run(cfg: PipelineConfig, output: str) -> dict:
    with OutputLock(output, "flows/full_pipeline.py"):  # one run at a time per output folder
        return _run(cfg, output)


def _run(cfg: PipelineConfig, output: str) -> dict:
    timer = StageTimer()
    with timer.stage("prepare"):
        categories, prep = prepare_inputs(cfg.dataset, cfg.points, output, cfg.strict)
    stage1 = None
    if cfg.generator.needs_training():
        init_ray(cfg.ray)
        with timer.stage("generator_training"):
            stage1 = train_generator(cfg, categories, output)
        cfg = with_generator_params(cfg, stage1["generator_params"])
    fingerprint = generator_fingerprint(cfg.generator.method, cfg.generator.params)
    with timer.stage("pseudo_label"):
        counts = run_pseudo_labels(cfg, categories, output, fingerprint, ensure_ray=lambda: init_ray(cfg.ray))
    with timer.stage("export"):
        exported = export_panoptic(output, categories, fingerprint)
    with timer.stage("evaluate"):
        quality = evaluate_run(output, categories, cfg, exported["errors"])
    stage2 = None
    if cfg.train.enabled:
        init_ray(cfg.ray)
        with timer.stage("train"):
            trained = train_stage2(cfg, categories, output)
        with timer.stage("evaluate_model"):
            evaluated = evaluate_model(cfg, categories, output, trained["checkpoint"], trained["validation_images"])
        stage2 = model_section(cfg, trained, evaluated)
    with timer.stage("report"):
        report = write_report(output, cfg, categories, prep, counts, exported, quality, stage1, stage2, timer.seconds)
    if cfg.review.enabled:
        with timer.stage("review"):
            try:
                review = write_review(output, report, options=cfg.review)
                report["per_image"] = review["per_image"]  # worst first, with the uncertainty: the page's order
                report["review"] = {k: review[k] for k in ("index", "suggestions", "images", "failed", "sort",
                                                           "correlation")}
            except Exception as exc:  # noqa: BLE001 - the report is written whatever the page does
                if cfg.strict:
                    raise
                log.exception("review page failed")
                report["failures"].append({"image_id": None, "stage": "review", "reason": f"{type(exc).__name__}: {exc}"})
    report["timings"] = dict(timer.seconds)
    save_report(output, report, categories)
    return report


def main() -> None:
    cfg, output = pipeline_args(__doc__, "configs/full_pipeline.yaml")
    report = run(cfg, output)
    print(console_summary(report))
    print(json.dumps({"timings_s": report["timings"]}))


if __name__ == "__main__":
    main()
