"""Ray Tune sweep of a pseudo-label generator's hyperparameters, scored by PQ against ground truth.

    python flows/tune_sweep.py --config configs/tune_psps.yaml [--output DIR] [key.path=value ...]
    python flows/tune_sweep.py --config configs/tune_point2mask.yaml subset=8

prepare inputs once -> Tuner(trial per setting: label the subset, report PQ/mIoU) -> table, plots, best config

Writes under ``OUTPUT/tune/``: ``results.csv``, ``results.md``, ``<metric>_vs_<param>.png``,
``best_config.yaml`` (ready for ``flows/full_pipeline.py --config``) and ``sweep.json``.
Rerunning the same command resumes an interrupted sweep (``Tuner.restore``):
finished trials are kept, unfinished and errored ones run again.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path

from common import ROOT, StageTimer, base_parser, init_ray, setup_logging

from pointseg.config import PipelineConfig, load_config
from pointseg.data.prepare import join, open_out, prepare_inputs
from pointseg.data.record import Category
from pointseg.generators import GENERATORS
from pointseg.report import score_generator
from pointseg.tuning import (
    METRICS,
    TuneConfig,
    best_pipeline_config,
    build_search_space,
    check_space_against,
    load_base_config,
    num_trials,
    resolve_path,
    rows_to_markdown,
    sort_rows,
    swept_params,
    table_columns,
    trial_params,
    write_best_config,
    write_results,
)

log = logging.getLogger("pointseg.flows.tune_sweep")


def pseudo_label_trial(sampled: dict, *, output: str, categories: dict[int, Category], method: str,
                       base: PipelineConfig, subset: int | None) -> None:
    """One trial: label the first ``subset`` prepared images with the sampled params and report the scores."""
    from ray import tune

    t0 = time.perf_counter()
    scores = score_generator(output, categories, method, trial_params(base, method, sampled), subset, progress=False)
    metrics = {k: float(v) for k in METRICS if (v := scores.get(k)) is not None}  # None: class group absent
    metrics.update(num_images=scores["num_images"], num_failed=len(scores["failed"]),
                   trial_seconds=round(time.perf_counter() - t0, 3))
    tune.report(metrics)


# objective -> trial function. ``stage2`` (train on the pseudo labels, report stage-2 PQ each epoch, ASHA
# stopping) will be a driver function that builds a TorchTrainer and reports through
# ray.tune.integration.ray_train.TuneReportCallback; ``run`` refuses it until then.
OBJECTIVES = {"pseudo_label": pseudo_label_trial}


def make_trainable(tcfg: TuneConfig, trial_fn, **trial_kwargs):
    """The trial function bound to its inputs, at a fractional CPU share (whole CPUs deadlock 2 cores)."""
    from ray import tune

    return tune.with_resources(partial(trial_fn, **trial_kwargs), {"cpu": tcfg.cpus_per_trial})


def experiment_path(tcfg: TuneConfig, output: str) -> tuple[str, str]:
    """``(storage_path, experiment dir)``; local paths made absolute (trials run in their own cwd)."""
    storage = tcfg.storage_path or join(output, "tune", "ray_results")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    return storage, join(storage, tcfg.experiment_name)


def sweep_fingerprint(tcfg: TuneConfig, base: PipelineConfig) -> dict:
    """What must not change between a sweep and its resumption."""
    return {"method": tcfg.method, "space": tcfg.space, "objective": tcfg.objective, "metric": tcfg.metric,
            "mode": tcfg.mode, "num_samples": tcfg.num_samples, "subset": tcfg.subset,
            "dataset": base.dataset.model_dump(mode="json"), "points": base.points.model_dump(mode="json"),
            "base_params": base.generator.params if base.generator.method == tcfg.method else {}}


def build_tuner(tcfg: TuneConfig, trainable, storage: str, exp_dir: str):
    """A new Tuner, or the restored one when ``exp_dir`` holds an interrupted sweep."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    if tune.Tuner.can_restore(exp_dir):
        log.info("resuming the sweep in %s", exp_dir)
        return tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=True), True
    scheduler = ASHAScheduler(grace_period=1, reduction_factor=3) if tcfg.scheduler == "asha" else None
    tuner = tune.Tuner(
        trainable,
        param_space=build_search_space(tcfg.space),
        tune_config=tune.TuneConfig(
            metric=tcfg.metric,
            mode=tcfg.mode,
            num_samples=tcfg.num_samples,
            max_concurrent_trials=tcfg.max_concurrent_trials,
            scheduler=scheduler,
            reuse_actors=True,  # one trial actor per concurrent slot, not one process per trial
        ),
        run_config=tune.RunConfig(name=tcfg.experiment_name, storage_path=storage, verbose=1),
    )
    return tuner, False


def result_rows(grid, params: list[str]) -> list[dict]:
    """One row per trial: swept params, last reported metrics, status, error and the full sampled ``config``."""
    rows = []
    for res in grid:
        m = res.metrics or {}
        config = dict(res.config or {})
        row = {"trial_id": m.get("trial_id") or Path(res.path).name, **{p: config.get(p) for p in params}, "config": config}
        row.update({k: m[k] for k in (*METRICS, "num_images", "num_failed", "trial_seconds") if k in m})
        row["status"] = "error" if res.error else "ok"
        if res.error:
            row["error"] = f"{type(res.error).__name__}: {str(res.error).strip().splitlines()[-1][:200]}"
        rows.append(row)
    return rows


def run(tcfg: TuneConfig, output: str, base: PipelineConfig, trial_fn=None) -> dict:
    """Prepare the subset, run (or resume) the sweep, write table/plots/best config; returns a summary."""
    if tcfg.method not in GENERATORS:
        raise ValueError(f"method: unknown generator {tcfg.method!r}; known: {sorted(GENERATORS)}")
    if tcfg.objective not in OBJECTIVES:
        raise NotImplementedError(
            "objective: stage2 (stage-2 PQ after training) is not implemented yet. It will be a driver function "
            "that builds a TorchTrainer and reports through ray.tune.integration.ray_train.TuneReportCallback, "
            "with scheduler: asha stopping bad trials early. Use objective: pseudo_label."
        )
    check_space_against(GENERATORS[tcfg.method].Config, tcfg.space, trial_params(base, tcfg.method, {}))
    if "://" not in output:
        output = str(Path(output).resolve())
    tune_dir = join(output, "tune")
    storage, exp_dir = experiment_path(tcfg, output)
    timer = StageTimer()
    t0 = time.perf_counter()

    with timer.stage("prepare"):
        # Prepared once; every trial reads OUTPUT/index and OUTPUT/gt.
        categories, prep = prepare_inputs(base.dataset, base.points, output, base.strict)
    fingerprint = sweep_fingerprint(tcfg, base)
    _check_resumable(tune_dir, exp_dir, fingerprint)
    with open_out(join(tune_dir, "sweep.json"), "w") as f:
        json.dump(fingerprint, f, indent=2)

    init_ray(base.ray)
    trainable = make_trainable(tcfg, trial_fn or OBJECTIVES[tcfg.objective], output=output, categories=categories,
                               method=tcfg.method, base=base, subset=tcfg.subset)
    tuner, resumed = build_tuner(tcfg, trainable, storage, exp_dir)
    log.info("%s sweep of %s: %d trials on %d images, %s CPU each, at most %d at once",
             "resumed" if resumed else "new", tcfg.method, num_trials(tcfg.space, tcfg.num_samples),
             min(prep.num_images, tcfg.subset or prep.num_images), tcfg.cpus_per_trial, tcfg.max_concurrent_trials)
    with timer.stage("sweep"):
        grid = tuner.fit()

    params = swept_params(tcfg.space)
    rows = sort_rows(result_rows(grid, params), tcfg.metric, tcfg.mode)
    with timer.stage("results"):
        written = write_results(tune_dir, rows, tcfg.metric, tcfg.mode, params, list(METRICS))
        best = next((r for r in rows if r["status"] == "ok" and r.get(tcfg.metric) is not None), None)
        if best is not None:
            best_params = trial_params(base, tcfg.method, best["config"])
            best_cfg = best_pipeline_config(base, tcfg.method, best_params)
            header = (f"Best of {len(rows)} trials of {exp_dir}: {tcfg.metric} {100 * best[tcfg.metric]:.2f} "
                      f"on {best.get('num_images')} images.\nRun: python flows/full_pipeline.py --config THIS_FILE")
            write_best_config(join(tune_dir, "best_config.yaml"), best_cfg, header)
            written["best_config.yaml"] = join(tune_dir, "best_config.yaml")
    return {
        "experiment": exp_dir,
        "resumed": resumed,
        "rows": rows,
        "params": params,
        "best": best,
        "files": written,
        "num_errors": sum(r["status"] == "error" for r in rows),
        "timings": timer.seconds,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }


def _check_resumable(tune_dir: str, exp_dir: str, fingerprint: dict) -> None:
    """Refuse to resume a sweep whose space/data differ from this one's (Tune would silently keep the old ones)."""
    import fsspec

    from ray import tune

    fs, path = fsspec.core.url_to_fs(join(tune_dir, "sweep.json"))
    if not (fs.exists(path) and tune.Tuner.can_restore(exp_dir)):
        return
    with fs.open(path, "r") as f:
        old = json.load(f)
    changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != json.loads(json.dumps(fingerprint.get(k))))
    if changed:
        raise ValueError(
            f"{exp_dir} holds a sweep with different {', '.join(changed)}; to start a new sweep pass name=<new name> "
            f"or another --output (or delete that folder)"
        )


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    args = base_parser(__doc__.splitlines()[0], "configs/tune_psps.yaml").parse_args(argv)
    tcfg = load_config(TuneConfig, args.config, args.overrides)
    base = load_base_config(tcfg, resolve_path(tcfg.base_config, Path.cwd(), ROOT))
    output = args.output or tcfg.output
    summary = run(tcfg, output, base)

    rows, metric = summary["rows"], tcfg.metric
    metrics = [metric, *[m for m in ("pq", "pq_th", "pq_st", "miou") if m != metric]]
    print()
    print(rows_to_markdown(rows, table_columns(rows, summary["params"], metrics), metrics))
    best = summary["best"]
    if best:
        print(f"best {metric}: {100 * best[metric]:.2f}  with " + ", ".join(f"{p}={best[p]}" for p in summary["params"]))
    if summary["num_errors"]:
        print(f"{summary['num_errors']} trial(s) failed; rerun the same command to retry them")
    for name, uri in summary["files"].items():
        print(f"wrote {uri}")
    n = len(rows)
    print(f"wall time: {summary['wall_seconds']:.1f} s for {n} trials "
          f"({'resumed' if summary['resumed'] else 'new'} sweep; stages {json.dumps(summary['timings'])})")
    return summary


if __name__ == "__main__":
    main()
