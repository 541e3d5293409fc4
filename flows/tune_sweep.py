"""Ray Tune sweep of a pseudo-label generator's hyperparameters, scored by PQ against ground truth.

    python flows/tune_sweep.py --config configs/tune_psps.yaml [--output DIR] [key.path=value ...]
    python flows/tune_sweep.py --config configs/tune_point2mask.yaml subset=8
    python flows/tune_sweep.py --config configs/tune_stage2.yaml

objective pseudo_label:
    prepare inputs once -> Tuner(trial per setting: label the subset, report PQ/mIoU) -> table, plots, best config
objective stage2 (sweeps ``train.*``; ASHA stops bad trials on their training loss):
    prepare inputs -> pseudo labels once (OUTPUT/shards) -> Tuner(trial = driver function:
        TorchTrainer(train_loop_per_worker, callbacks=[TuneReportCallback]) -> each report to Tune (ASHA)
        -> unstopped: evaluate the model on the held-out images -> report PQ) -> table, plots, best config

Writes under ``OUTPUT/tune/``: ``results.csv``, ``results.md``, ``<metric>_vs_<param>.png``,
``best_config.yaml`` (ready for ``flows/full_pipeline.py --config``) and ``sweep.json``.
Rerunning the same command resumes an interrupted sweep (``Tuner.restore``):
finished trials are kept, unfinished and errored ones run again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from functools import partial
from pathlib import Path

from common import ROOT, StageTimer, base_parser, init_ray, setup_logging

from operators.evaluation import evaluate_in_process
from operators.pseudo_label import run_pseudo_labels
from operators.file_names import absolute_file_names
from operators.tune_state import check_experiment_state
from operators.training import (
    fit_torch_trainer,
    log_dir_for,
    repair_run_snapshot,
    stage2_inputs,
    storage_args,
    train_loop_per_worker,
)
from pointseg.config import PipelineConfig, load_config
from pointseg.data.prepare import join, prepare_inputs, read_index
from pointseg.data.record import Category
from pointseg.generators import generator_class, generator_fingerprint
from pointseg.report import score_generator
from pointseg.storage import OutputLock, write_atomic
from pointseg.train.engine import fit_plain
from pointseg.train.final_loss import final_loss
from pointseg.train.stage2 import STAGE2_MODELS
from pointseg.tuning import (
    METRICS,
    TuneConfig,
    best_pipeline_config,
    build_search_space,
    check_space_against,
    check_stage2_space,
    load_base_config,
    num_trials,
    resolve_path,
    rows_to_markdown,
    sort_rows,
    stage2_base_config,
    stage2_max_reports,
    stage2_trial_config,
    swept_params,
    table_columns,
    trial_params,
    trial_train,
    write_best_config,
    write_results,
)

log = logging.getLogger("pointseg.flows.tune_sweep")


def pseudo_label_trial(sampled: dict, *, output: str, categories: dict[int, Category], method: str,
                       base: PipelineConfig, subset: int | None, budget_s: float | None, cwd: str) -> None:
    """One trial: (trainable generator) stage 1 on every image's points within ``budget_s``, then label the
    first ``subset`` prepared images with the sampled params and report the scores."""
    from ray import tune

    t0 = time.perf_counter()
    params = trial_params(base, method, sampled)
    cls = generator_class(method)
    config = cls.Config.model_validate(params)
    metrics: dict = {}
    if cls.stage1 is not None and cls.trains(config):
        rows = read_index(join(output, "index", "index.parquet"))
        rows = [dict(r, file_name=f) for r, f in zip(rows, absolute_file_names(
            {"file_name": [r["file_name"] for r in rows]}, cwd)["file_name"])]
        trainable = cls.stage1(trial_train(base, method, sampled), categories, {"generator": params})
        checkpoint = join(tune.get_context().get_trial_dir(), "stage1")
        fitted = fit_plain(trainable, rows, checkpoint, budget_s=budget_s)
        params["checkpoint"] = checkpoint
        metrics.update(stage1_steps=int(fitted["step"]), stage1_seconds=round(time.perf_counter() - t0, 1))
    scores = score_generator(output, categories, method, params, subset, progress=False)
    metrics.update({k: float(v) for k in METRICS if (v := scores.get(k)) is not None})  # None: class group absent
    metrics.update(num_images=scores["num_images"], num_failed=len(scores["failed"]),
                   trial_seconds=round(time.perf_counter() - t0, 3))
    tune.report(metrics)


def report_callback():
    """``TuneReportCallback`` that also passes :func:`~pointseg.train.final_loss.final_loss`, the loss ASHA can
    compare across decoder layer counts. Built in the trial (it must be created in a Tune session)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class FinalLossReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            metrics = [dict(m, final_loss=final_loss(m)) if "loss" in m else m for m in metrics]
            super().after_report(run_context, metrics, checkpoint)

    return FinalLossReportCallback()


def stage2_trial(sampled: dict, *, train_ds, output: str, categories: dict[int, Category], base: PipelineConfig,
                 val_ids: list[int], storage: str, experiment: str) -> None:
    """One stage-2 trial, the Tune driver function of a Ray Train run.

    Trains ``base`` with the sampled ``train.*`` settings on ``train_ds`` (the
    pseudo-label shard rows outside validation, read once by the sweep); every
    training report reaches Tune through the callback, so ASHA may stop the
    trial between reports (Tune then ends this function, and with it the Train
    run). A trial that finishes evaluates its model on the held-out images
    (in this process) and reports PQ as its last result.
    """
    from dataclasses import asdict

    from ray import tune

    t0 = time.perf_counter()
    cfg = stage2_trial_config(base, sampled)
    s2 = cfg.train
    sargs = storage_args(storage)
    run_name = f"{experiment}_{tune.get_context().get_trial_id()}"  # a rerun of the trial resumes this run
    repair_run_snapshot(storage, run_name)  # a record truncated by a kill would stop every rerun of the trial
    loop_config = {"trainable": STAGE2_MODELS[s2.model], "config": s2.model_dump(mode="json"),
                   "categories": [asdict(c) for c in categories.values()], "context": {},
                   "log_dir": log_dir_for(sargs, run_name, output)}
    result = fit_torch_trainer(train_loop_per_worker, loop_config, s2, run_name, {"train": train_ds}, sargs,
                               "stage-2 trial", callbacks=[report_callback()], num_to_keep=1)
    last = dict(result.metrics or {})
    with result.checkpoint.as_directory() as d:
        scores = evaluate_in_process(cfg, categories, output, d, val_ids)
    metrics = {k: float(v) for k in METRICS if (v := scores.get(k)) is not None}
    metrics.update(loss=float(last["loss"]), final_loss=final_loss(last), step=int(last["step"]),
                   num_images=scores["num_images"], checkpoint=result.checkpoint.path,
                   trial_seconds=round(time.perf_counter() - t0, 3))
    tune.report(metrics)


# objective -> trial function
OBJECTIVES = {"pseudo_label": pseudo_label_trial, "stage2": stage2_trial}


def make_trainable(tcfg: TuneConfig, trial_fn, shared: dict | None = None, **trial_kwargs):
    """The trial function bound to its inputs, at a fractional CPU share (whole CPUs deadlock 2 cores).

    With ``shared`` objects (e.g. a materialised dataset) every input goes through
    the object store once (``tune.with_parameters``) instead of being pickled
    with every trial.
    """
    from ray import tune

    fn = tune.with_parameters(trial_fn, **shared, **trial_kwargs) if shared else partial(trial_fn, **trial_kwargs)
    return tune.with_resources(fn, {"cpu": tcfg.cpus_per_trial})


def experiment_path(tcfg: TuneConfig, output: str) -> tuple[str, str]:
    """``(storage_path, experiment dir)``; local paths made absolute (trials run in their own cwd)."""
    storage = tcfg.storage_path or join(output, "tune", "ray_results")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    return storage, join(storage, tcfg.experiment_name)


def sweep_fingerprint(tcfg: TuneConfig, base: PipelineConfig) -> dict:
    """What must not change between a sweep and its resumption."""
    out = {"method": tcfg.method, "space": tcfg.space, "objective": tcfg.objective, "metric": tcfg.metric,
           "mode": tcfg.mode, "num_samples": tcfg.num_samples, "subset": tcfg.subset,
           "dataset": base.dataset.model_dump(mode="json"), "points": base.points.model_dump(mode="json"),
           "base_params": base.generator.params.model_dump(mode="json") if base.generator.method == tcfg.method else {},
           "base_train": base.generator.train.model_dump(mode="json") if base.generator.train is not None else None}
    if tcfg.objective == "stage2":  # the trials train from this config and the ASHA settings
        out.update(train=base.train.model_dump(mode="json"), scheduler=tcfg.scheduler,
                   asha=tcfg.asha.model_dump(mode="json"))
    return out


def build_scheduler(tcfg: TuneConfig, max_reports: int | None = None):
    """``(scheduler, metric, mode)``: the ASHA scheduler (or None) and the metric/mode for ``TuneConfig``.

    Stage 2 reports the training loss at every report and PQ only at the end,
    so ASHA gets its own loss metric and ``TuneConfig`` none (Tune demands
    its metric in every result); ``max_t`` is the reports of a trial plus
    the final one, so ASHA never cuts a trial off just before its evaluation.
    """
    from ray.tune.schedulers import ASHAScheduler

    a = tcfg.asha
    if tcfg.objective == "pseudo_label":
        if tcfg.scheduler != "asha":
            return None, tcfg.metric, tcfg.mode
        kw = {"metric": a.metric, "mode": a.mode or tcfg.mode} if a.metric else {}
        scheduler = ASHAScheduler(grace_period=a.grace_period, reduction_factor=a.reduction_factor,
                                  **({"max_t": a.max_t} if a.max_t else {}), **kw)
        return (scheduler, None, None) if kw else (scheduler, tcfg.metric, tcfg.mode)
    if tcfg.scheduler != "asha":
        return None, None, None
    scheduler = ASHAScheduler(time_attr="training_iteration", metric=a.metric or "loss", mode=a.mode or "min",
                              grace_period=a.grace_period, reduction_factor=a.reduction_factor,
                              max_t=a.max_t or (max_reports or 1) + 1)
    return scheduler, None, None


def build_tuner(tcfg: TuneConfig, trainable, storage: str, exp_dir: str, max_reports: int | None = None):
    """A new Tuner, or the restored one when ``exp_dir`` holds an interrupted sweep.

    Before a restore the saved state is checked (:func:`check_experiment_state`):
    Tune would otherwise restart silently from a state file truncated by a killed driver.
    """
    from ray import tune

    if tune.Tuner.can_restore(exp_dir):
        check_experiment_state(exp_dir, tcfg.space, tcfg.num_samples)
        log.info("resuming the sweep in %s", exp_dir)
        return tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=True), True
    scheduler, metric, mode = build_scheduler(tcfg, max_reports)
    tuner = tune.Tuner(
        trainable,
        param_space=build_search_space(tcfg.space),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=tcfg.num_samples,
            max_concurrent_trials=tcfg.max_concurrent_trials,
            scheduler=scheduler,
            # pseudo_label: one trial actor per concurrent slot, not one process per trial. stage2: a fresh
            # process per trial (a driver function's Train session cannot be reset for the next trial).
            reuse_actors=tcfg.objective == "pseudo_label",
            time_budget_s=tcfg.max_wall_s,
        ),
        run_config=tune.RunConfig(name=tcfg.experiment_name, storage_path=storage, verbose=1),
    )
    return tuner, False


ROW_KEYS = (*METRICS, "step", "loss", "final_loss", "num_images", "num_failed", "trial_seconds", "checkpoint",
            "stage1_steps", "stage1_seconds")


def result_rows(grid, params: list[str], metric: str | None = None) -> list[dict]:
    """One row per trial: swept params, last reported metrics, status, error and the full sampled ``config``.

    ``status``: ``ok``; ``error``; or, when ``metric`` is given, ``stopped`` for a
    trial that ended without it (ASHA stopped it before its final evaluation).
    """
    rows = []
    for res in grid:
        m = res.metrics or {}
        config = dict(res.config or {})
        row = {"trial_id": m.get("trial_id") or Path(res.path).name, **{p: config.get(p) for p in params}, "config": config}
        row.update({k: m[k] for k in ROW_KEYS if m.get(k) is not None})
        row["status"] = "error" if res.error else "stopped" if metric and metric not in row else "ok"
        if res.error:
            row["error"] = f"{type(res.error).__name__}: {str(res.error).strip().splitlines()[-1][:200]}"
        rows.append(row)
    return rows


def prepare_stage2(tcfg: TuneConfig, base: PipelineConfig, categories: dict[int, Category], output: str,
                   timer: StageTimer) -> tuple[dict, dict, str]:
    """Pseudo labels once, the training rows read once, the held-out ids: the inputs every stage-2 trial shares.

    Returns ``(shared, trial_kwargs, description)`` for :func:`make_trainable`.
    """
    with timer.stage("pseudo_label"):  # resumes: images already in OUTPUT/shards are kept
        fingerprint = generator_fingerprint(base.generator.method, base.generator.params)
        labelled = run_pseudo_labels(base, categories, output, fingerprint)
    log.info("pseudo labels (%s): %s", tcfg.method, labelled)
    with timer.stage("read_shards"):  # materialised once, shared by every trial through the object store
        train_ds, counts, val_ids = stage2_inputs(base, categories, output)
    kwargs = dict(output=output, categories=categories, base=base, val_ids=sorted(val_ids),
                  storage=base.train.storage_path or join(output, "tune", "train"), experiment=tcfg.experiment_name)
    return {"train_ds": train_ds}, kwargs, f"{len(val_ids)} held-out images, trained on {counts['train_rows']}"


def run(tcfg: TuneConfig, output: str, base: PipelineConfig, trial_fn=None) -> dict:
    """Prepare the subset, run (or resume) the sweep, write table/plots/best config; returns a summary."""
    cls = generator_class(tcfg.method)
    stage2 = tcfg.objective == "stage2"
    if stage2:
        base = stage2_base_config(base, tcfg.method)  # labels from `method`, then train with each trial's train.*
        check_stage2_space(base, tcfg.space)
    else:
        check_space_against(cls.Config, tcfg.space, trial_params(base, tcfg.method, {}),
                            cls.stage1.Config if cls.stage1 is not None else None, trial_train(base, tcfg.method, {}))
    with OutputLock(output, "flows/tune_sweep.py"):  # one run at a time per output folder
        return _sweep(tcfg, output, base, trial_fn, stage2)


def _sweep(tcfg: TuneConfig, output: str, base: PipelineConfig, trial_fn, stage2: bool) -> dict:
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
    write_atomic(join(tune_dir, "sweep.json"), json.dumps(fingerprint, indent=2).encode())  # read by every rerun

    init_ray(base.ray)
    if stage2:
        shared, trial_kwargs, scored = prepare_stage2(tcfg, base, categories, output, timer)
    else:
        shared = None
        trial_kwargs = dict(output=output, categories=categories, method=tcfg.method, base=base, subset=tcfg.subset,
                            budget_s=tcfg.trial_budget_s, cwd=os.getcwd())
        scored = f"{min(prep.num_images, tcfg.subset or prep.num_images)} images"
    trainable = make_trainable(tcfg, trial_fn or OBJECTIVES[tcfg.objective], shared, **trial_kwargs)
    max_reports = stage2_max_reports(base, tcfg.space) if stage2 else None
    tuner, resumed = build_tuner(tcfg, trainable, storage, exp_dir, max_reports)
    log.info("%s %s sweep of %s: %d trials scored on %s, %s CPU each, at most %d at once",
             "resumed" if resumed else "new", tcfg.objective, tcfg.method, num_trials(tcfg.space, tcfg.num_samples),
             scored, tcfg.cpus_per_trial, tcfg.max_concurrent_trials)
    with timer.stage("sweep"):
        grid = tuner.fit()

    params = swept_params(tcfg.space)
    rows = sort_rows(result_rows(grid, params, tcfg.metric if stage2 else None), tcfg.metric, tcfg.mode)
    with timer.stage("results"):
        metrics = [m for m in METRICS if not (stage2 and m == "miou")]  # a model evaluation has no mIoU
        written = write_results(tune_dir, rows, tcfg.metric, tcfg.mode, params, metrics)
        best = next((r for r in rows if r["status"] == "ok" and r.get(tcfg.metric) is not None), None)
        if best is not None:
            if stage2:
                best_cfg = stage2_trial_config(base, {k: v for k, v in best["config"].items() if k in tcfg.space})
            else:
                best_cfg = best_pipeline_config(base, tcfg.method, trial_params(base, tcfg.method, best["config"]),
                                                trial_train(base, tcfg.method, best["config"]))
            header = (f"Best of {len(rows)} trials of {exp_dir}: {tcfg.metric} {100 * best[tcfg.metric]:.2f} "
                      f"on {best.get('num_images')} {'held-out ' if stage2 else ''}images."
                      f"\nRun: python flows/full_pipeline.py --config THIS_FILE")
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
        "num_stopped": sum(r["status"] == "stopped" for r in rows),
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
    metrics = [metric, *[m for m in ("pq", "pq_th", "pq_st", *(() if tcfg.objective == "stage2" else ("miou",)))
                         if m != metric]]
    print()
    print(rows_to_markdown(rows, table_columns(rows, summary["params"], metrics), metrics))
    best = summary["best"]
    if best:
        print(f"best {metric}: {100 * best[metric]:.2f}  with " + ", ".join(f"{p}={best[p]}" for p in summary["params"]))
    if summary["num_stopped"]:
        print(f"{summary['num_stopped']} trial(s) stopped early by ASHA ({tcfg.asha.metric or 'loss'})")
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
