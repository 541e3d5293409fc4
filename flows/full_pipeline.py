"""The whole pointseg run: dataset -> points -> Ray Data pseudo labels -> evaluation -> report.

    python flows/full_pipeline.py --config configs/full_pipeline.yaml --output out/demo [key.path=value ...]
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python flows/full_pipeline.py --output /tmp/run

Writes ``OUTPUT/report.json`` and ``OUTPUT/report.md`` (tables and overlay PNGs).
"""

from __future__ import annotations

import json
import logging

from common import StageTimer, base_parser, init_ray, setup_logging
from pseudo_label import export_panoptic, run_pseudo_labels

from pointseg.config import PipelineConfig, load_config
from pointseg.data.prepare import join, prepare_inputs
from pointseg.report import baseline_scores, evaluate_labels, write_report

log = logging.getLogger("pointseg.flows.full_pipeline")


def run(cfg: PipelineConfig, output: str) -> dict:
    timer = StageTimer()
    with timer.stage("prepare"):
        categories, prep = prepare_inputs(cfg.dataset, cfg.points, output, cfg.strict)
    init_ray(cfg.ray)
    with timer.stage("pseudo_label"):
        counts = run_pseudo_labels(cfg, categories, output)
    with timer.stage("export"):
        exported = export_panoptic(output, categories)
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
    with timer.stage("report"):
        write_report(output, report, categories, cfg.report.num_overlays)
    report["timings"] = timer.seconds
    return report


def main() -> None:
    setup_logging()
    args = base_parser(__doc__.splitlines()[0], "configs/full_pipeline.yaml").parse_args()
    cfg = load_config(PipelineConfig, args.config, args.overrides)
    output = args.output or cfg.output
    report = run(cfg, output)
    m = report["pseudo_labels"]
    print(
        f"\npseudo labels ({report['method']}): PQ {100 * m['pq']:.1f}  PQ_th {100 * m['pq_th']:.1f}  "
        f"PQ_st {100 * m['pq_st']:.1f}  mIoU {100 * m['miou']:.1f}  on {report['images']['exported']} images"
    )
    for name, b in report["baselines"].items():
        print(f"baseline {name}: PQ {100 * b['pq']:.1f}  PQ_th {100 * b['pq_th']:.1f}  PQ_st {100 * b['pq_st']:.1f}")
    print(f"report: {join(output, 'report.md')}  (json: {join(output, 'report.json')})")
    print(json.dumps({"timings_s": report["timings"]}))


if __name__ == "__main__":
    main()
