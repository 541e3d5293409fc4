"""The Ray Train layer: one per-worker function and one driver for every training in pointseg.

Stage 1 of any trainable generator and every stage-2 model are a
:class:`~pointseg.train.engine.Trainable`; they all train the same way::

    driver:  run_training(Trainable, config, dataset)      # stage builders: train_generator, train_stage2
               -> TorchTrainer(train_loop_per_worker, ScalingConfig(fractional CPUs), RunConfig(name, storage))
    worker:  train_loop_per_worker(config)
               -> pointseg.train.engine.fit(trainable, shard batches, hooks: DDP wrap, checkpoint = ray.train.report)
    driver:  the final checkpoint folder copied to OUTPUT/models/<run_name>/ (any fsspec URI)

Rerunning with the same ``run_name`` and ``storage_path`` resumes from the
latest Ray Train checkpoint (the engine restores step, epoch and position in
the epoch). ``max_failures`` restarts crashed workers. ``max_wall_s`` is a
deadline for the whole fit: the workers stop at it (checkpoint kept) and the
driver gives up waiting on a stuck fit shortly after.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from operators.file_names import absolute_file_names
from pointseg.data.coco_panoptic_io import as_categories
from pointseg.data.prepare import iter_shard_rows, join, read_index
from pointseg.data.record import Category
from pointseg.generators import generator_class
from pointseg.storage import write_atomic
from pointseg.train.checkpoint import copy_checkpoint, read_checkpoint, read_meta, save_checkpoint
from pointseg.train.engine import EngineConfig, Hooks, Trainable, fit
from pointseg.train.rows import INDEX_COLUMNS
from pointseg.train.stage2 import STAGE2_MODELS, point_label_rows, validation_ids

log = logging.getLogger("pointseg.operators.training")

SHARD_COLUMNS = ["image_id", "file_name", "height", "width", "label_png", "segments_info", "error"]
NATIVE_SCHEMES = ("file", "local", "s3", "gs", "gcs", "hdfs", "abfs", "abfss")
#: Seconds the driver waits past ``max_wall_s`` for the workers to stop by themselves.
BUDGET_GRACE_S = 120.0
#: Ray Train 2.60's record of a run's checkpoints, in its run folder: the latest one is what a rerun resumes from.
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_abs(uri: str) -> str:
    """A local path made absolute (workers run in another cwd); other URIs unchanged."""
    return str(Path(uri.removeprefix("file://")).resolve()) if is_local(uri) else uri


def storage_args(uri: str) -> dict:
    """``RunConfig`` storage kwargs: local paths made absolute, pyarrow-native URIs as is, any other
    fsspec URI through ``PyFileSystem(FSSpecHandler(fs))``."""
    if is_local(uri):
        return {"storage_path": local_abs(uri)}
    if uri.split("://", 1)[0] in NATIVE_SCHEMES:
        return {"storage_path": uri}
    import fsspec
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(uri)
    return {"storage_path": path, "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))}


# ----------------------------------------------------------------------------- worker


def ray_collate(inner):
    """The engine's row collate as a ``NumpyBatchCollateFn`` (Ray 2.60 deprecates plain functions)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        def __init__(self, inner):
            self.inner = inner
            self.lock = threading.Lock()

        def __call__(self, batch):
            with self.lock:
                return self.inner(batch)

    return Collate(inner)


def _scalar_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def train_loop_per_worker(config: dict) -> None:
    """Train ``config["trainable"]`` on this worker's shard of the ``train`` dataset with the engine.

    ``config``: ``trainable`` (the class), ``config`` (its config dump),
    ``categories`` (category dicts), ``context``, ``log_dir`` (rank 0's
    TensorBoard and ``metrics.jsonl``), ``deadline`` (epoch seconds or None);
    test hooks ``crash_at_step`` + ``crash_marker`` (rank 0 exits once).
    """
    import ray.train
    import ray.train.torch

    trainable: Trainable = config["trainable"](config["config"], as_categories(config["categories"]), config.get("context"))
    cfg = trainable.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = read_checkpoint(d, optimizer=True, extra=True)
    shard = ray.train.get_dataset_shard("train")

    def epoch_batches(epoch: int, collate):
        return shard.iter_torch_batches(batch_size=cfg.batch_size, collate_fn=ray_collate(collate), device="cpu",
                                        local_shuffle_buffer_size=4 * cfg.batch_size, local_shuffle_seed=cfg.seed + epoch)

    def save(meta, model_state, optimizer_state, extra_state, metrics) -> None:
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                save_checkpoint(d, {**meta, "metrics": _scalar_metrics(metrics)}, model_state, optimizer_state, extra_state)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(_scalar_metrics(metrics), checkpoint=ckpt)

    hooks = Hooks(
        save=save, rank=rank, world=world, resume=resume, log_dir=config.get("log_dir"),
        wrap_model=lambda m: ray.train.torch.prepare_model(
            m, parallel_strategy_kwargs={"find_unused_parameters": cfg.find_unused_parameters}),
        device=ray.train.torch.get_device() if cfg.use_gpu else "cpu",
        deadline=config.get("deadline"), crash_at_step=config.get("crash_at_step"), crash_marker=config.get("crash_marker"),
    )
    fit(trainable, epoch_batches, hooks)


# ----------------------------------------------------------------------------- driver


def fit_torch_trainer(loop, loop_config: dict, section: EngineConfig, run_name: str, datasets: dict,
                      storage_kwargs: dict, what: str, callbacks: list | None = None, num_to_keep: int = 2):
    """Build and fit the one ``TorchTrainer`` shape of pointseg; a run without a checkpoint is an error.

    ``section``: ``num_workers, cpus_per_worker, use_gpu, max_failures, max_wall_s`` (fractional CPUs: two
    1-CPU workers deadlock a 2-core box). With ``max_wall_s`` the fit must end by the deadline in
    ``loop_config`` plus :data:`BUDGET_GRACE_S`, or :class:`TimeoutError` names the stuck run.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": section.cpus_per_worker, **({"GPU": 1} if section.use_gpu else {})}
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=section.num_workers, use_gpu=section.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            failure_config=FailureConfig(max_failures=section.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
            callbacks=callbacks,
            **storage_kwargs,
        ),
        datasets=datasets,
    )
    result = _fit_within(trainer, loop_config.get("deadline"), f"{what} {run_name!r}", section)
    if result.checkpoint is None:
        raise RuntimeError(f"{what} {run_name!r} finished without a checkpoint (error: {result.error})")
    return result


def _fit_within(trainer, deadline: float | None, what: str, section: EngineConfig):
    if deadline is None:
        return trainer.fit()
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised on the driver thread
            box["error"] = e

    thread = threading.Thread(target=run, name="trainer-fit", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.time()) + BUDGET_GRACE_S)
    if thread.is_alive():
        gpu = " (use_gpu=true on a node without a GPU waits forever)" if section.use_gpu else ""
        raise TimeoutError(f"{what}: no result within max_wall_s={section.max_wall_s:g} s + {BUDGET_GRACE_S:g} s: "
                           f"the fit is stuck (workers never started, or a hang){gpu}")
    if "error" in box:
        raise box["error"]
    return box["result"]


def log_dir_for(storage_kwargs: dict, run_name: str, output: str) -> str:
    """Rank 0's TensorBoard / ``metrics.jsonl`` folder: in the run dir for local storage, else a local folder."""
    if "storage_filesystem" not in storage_kwargs and is_local(storage_kwargs["storage_path"]):
        return join(storage_kwargs["storage_path"], run_name, "tensorboard")
    return str(Path(local_abs(output) if is_local(output) else ".").resolve() / "tensorboard" / run_name)


def run_training(trainable_cls: type[Trainable], config: EngineConfig, categories: dict[int, Category], output: str,
                 dataset, context: dict | None = None, what: str = "training", default_storage: str = "train",
                 loop_extra: dict | None = None, callbacks: list | None = None) -> dict:
    """Train ``trainable_cls`` with ``config`` on ``dataset`` (a Ray Dataset of its rows) with Ray Train.

    The final checkpoint folder is copied to ``OUTPUT/models/<run_name>/`` (what
    the labelling / evaluation actors load, through fsspec). Returns
    ``checkpoint`` (that URI), ``ray_checkpoint``, ``run_dir``, ``log_dir``,
    ``metrics`` (the last report), ``history`` (rank 0's ``metrics.jsonl``),
    ``steps``, ``start_step``, ``trained_steps``, ``skipped_rows``,
    ``skip_reasons``, ``last_loss`` and ``already_trained`` (a finished run,
    not started again: :func:`finished_run`).
    """
    output = local_abs(output)
    storage = config.storage_path or join(output, default_storage)
    sargs = storage_args(storage)
    log_dir = log_dir_for(sargs, config.run_name, output)
    model_uri = join(output, "models", config.run_name)
    repair_run_snapshot(storage, config.run_name)
    finished = finished_run(storage, config.run_name, trainable_cls.name, config.steps)
    if finished is not None:
        # What Ray Train would resume and train no step on: skip starting its controller and worker group.
        ray_checkpoint, metrics = finished
        log.info("%s %r already finished at step %s (%s): not started again", what, config.run_name,
                 metrics["step"], ray_checkpoint)
        copy_checkpoint(ray_checkpoint, model_uri)
        metrics = dict(metrics, start_step=int(metrics["step"]), skipped_rows=0, skip_reasons="{}", already_trained=True)
    else:
        loop_config = {
            "trainable": trainable_cls,
            "config": config.model_dump(mode="json"),
            "categories": [asdict(c) for c in categories.values()],
            "context": context or {},
            "log_dir": log_dir,
            "deadline": time.time() + config.max_wall_s if config.max_wall_s else None,
            **(loop_extra or {}),
        }
        result = fit_torch_trainer(train_loop_per_worker, loop_config, config, config.run_name, {"train": dataset}, sargs,
                                   what, callbacks=callbacks)
        with result.checkpoint.as_directory() as d:
            copy_checkpoint(d, model_uri)
        metrics, ray_checkpoint = dict(result.metrics or {}), result.checkpoint.path
    history_file = Path(log_dir) / "metrics.jsonl"
    history = [json.loads(line) for line in history_file.read_text().splitlines()] if history_file.exists() else []
    start = int(metrics.get("start_step", 0))
    step = int(metrics.get("step", config.steps))
    return {
        "checkpoint": model_uri,
        "ray_checkpoint": ray_checkpoint,
        "run_dir": join(sargs["storage_path"], config.run_name),
        "log_dir": log_dir,
        "metrics": metrics,
        "history": history,
        "steps": step,
        "start_step": start,
        "trained_steps": step - start,
        "skipped_rows": int(metrics.get("skipped_rows", 0)),
        "skip_reasons": json.loads(metrics.get("skip_reasons", "{}") or "{}"),
        "last_loss": metrics.get("loss", history[-1].get("loss") if history else None),
        "already_trained": bool(metrics.get("already_trained")),
    }


def repair_run_snapshot(storage: str, run_name: str) -> str | None:
    """Rebuild Ray Train's record of the run ``run_name`` under ``storage`` when it is unreadable.

    Ray Train 2.60's controller rewrites ``checkpoint_manager_snapshot.json`` in place at every checkpoint
    report (not through a temp file). A controller killed during that write (a node lost, ``ray job stop``,
    a SIGKILL) leaves it truncated, and every rerun of the run name then dies in the controller's constructor
    (``CheckpointManagerInitializationError: Unterminated string``): the run can never resume. The record
    is rebuilt from the run's checkpoint folders, whose ``meta.json`` is written last and holds the metrics
    that were reported with the checkpoint; the newest by step is the one the rerun resumes from. The
    unreadable record is kept as ``<name>.unreadable``. Returns a message describing the repair, or None.
    """
    import fsspec

    storage = local_abs(storage) if is_local(storage) else storage
    run_dir = join(storage, run_name)
    fs, path = fsspec.core.url_to_fs(join(run_dir, RAY_CHECKPOINT_SNAPSHOT))
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "r") as f:
            state = json.load(f)
        if isinstance(state, dict) and "checkpoint_results" in state and "current_report_index" in state:
            return None
        error = "not a Ray Train checkpoint record"
    except (ValueError, UnicodeDecodeError) as e:
        error = f"{type(e).__name__}: {e}"
    import ray

    results = []
    for name in sorted(fs.ls(path.rsplit("/", 1)[0], detail=False)):
        name = name.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("checkpoint_") or name.startswith(RAY_CHECKPOINT_SNAPSHOT):  # the record, its copies
            continue
        try:
            meta = read_meta(join(run_dir, name))
        except (OSError, ValueError):  # an incomplete folder (meta.json is written last): not resumable
            continue
        metrics = dict(meta.get("metrics") or {"step": meta.get("step", 0)})
        results.append((int(meta.get("step", 0)), name, metrics))
    results.sort()
    entries = [{"version": 0, "checkpoint_dir_name": name, "metrics": metrics} for _, name, metrics in results]
    snapshot = {
        "ray_version": ray.__version__, "checkpoint_results": entries,
        "checkpoint_report_indices": list(range(len(entries))),  # report order = step order
        "latest_checkpoint_result": entries[-1] if entries else None,
        "pending_training_results": [], "pending_validation_specs": [], "current_report_index": len(entries),
        "validated_checkpoint_dir_names": [], "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": [],
    }
    fs.mv(path, path + ".unreadable")
    write_atomic(join(run_dir, RAY_CHECKPOINT_SNAPSHOT), json.dumps(snapshot).encode())
    latest = f"the checkpoint of step {results[-1][0]} ({results[-1][1]})" if results else "no complete checkpoint"
    message = (f"run {run_name!r} under {storage}: Ray Train's checkpoint record was unreadable ({error}; its "
               f"controller was probably killed while writing it); rebuilt from the run's {len(results)} complete "
               f"checkpoint folder(s), so the run resumes from {latest}; the unreadable record is kept as "
               f"{RAY_CHECKPOINT_SNAPSHOT}.unreadable")
    log.warning(message)
    return message


def finished_run(storage: str, run_name: str, trainable_name: str, steps: int) -> tuple[str, dict] | None:
    """``(checkpoint URI, its metrics)`` when the Ray Train run ``run_name`` under ``storage`` already ended at
    ``steps`` or later: its latest checkpoint (the one a rerun resumes from) is a final one of the trainable
    ``trainable_name``. A rerun of a finished pipeline then skips Ray Train, which would start a controller and
    a worker group (on a cluster, GPU nodes) only to report that checkpoint again.

    None otherwise -- no such run, a run stopped before its last step (a crash, ``max_wall_s``), another
    trainable's run, or no readable record -- and Ray Train resumes or starts the run as before.
    """
    import fsspec

    storage = local_abs(storage) if is_local(storage) else storage
    try:
        fs, path = fsspec.core.url_to_fs(join(storage, run_name, RAY_CHECKPOINT_SNAPSHOT))
        if not fs.exists(path):
            return None
        with fs.open(path, "r") as f:
            latest = json.load(f).get("latest_checkpoint_result") or {}
        metrics = dict(latest.get("metrics") or {})
        if not metrics.get("final") or int(metrics.get("step", -1)) < steps:
            return None
        checkpoint = join(storage, run_name, latest["checkpoint_dir_name"])
        if read_meta(checkpoint).get("trainable") != trainable_name:
            return None  # Ray Train's resume names the mismatch
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("run %r under %s: its checkpoint record could not be read (%s: %s); Ray Train decides",
                    run_name, storage, type(e).__name__, e)
        return None
    return checkpoint, metrics


def _data_context(ray_data_cfg) -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_no_progress_timeout_s = ray_data_cfg.no_progress_timeout_s  # a hang becomes an error
    ctx.enable_progress_bars = False  # the training loop logs its own progress


def index_dataset(output: str):
    """The index rows (``image_id, file_name, height, width, points``) as a materialised Ray Dataset."""
    import ray

    uri = join(local_abs(output), "index", "index.parquet")
    ds = ray.data.read_parquet(uri).select_columns(INDEX_COLUMNS)
    ds = ds.map_batches(absolute_file_names, fn_kwargs={"cwd": os.getcwd()}, batch_format="pandas").materialize()
    if ds.count() == 0:
        raise ValueError(f"stage-1 training: {uri} has no rows")
    return ds


def train_generator(cfg, categories: dict[int, Category], output: str) -> dict | None:
    """Stage 1 of the configured generator when it needs one (``generator.needs_training()``).

    Trains ``generator_class.stage1`` on every image's points (the index) with
    ``generator.train``, and returns the run's numbers with
    ``generator_params = {"checkpoint": <the exported folder>}`` for the
    labelling stage; None when there is nothing to train. A generator that
    reads an untrained source (``generator_class.source_stage``, e.g. P2Seg's
    ``semantic_train``) first trains the source's stage 1 on the same rows; its
    checkpoint joins ``generator_params`` (``attach``) and its numbers are
    ``source`` in the result.
    """
    section = cfg.generator
    if not section.needs_training():
        return None
    _data_context(cfg.ray_data)
    ds = index_dataset(output)
    params, updates, source_out = section.params, {}, None
    source = section.generator_class.source_stage(params)
    if source is not None:
        source_out = run_training(generator_class(source.method).stage1, source.train, categories, output, ds,
                                  context={"generator": source.params.model_dump(mode="json")},
                                  what=f"{source.method} stage 1 (source of {section.method})",
                                  default_storage="generator_train")
        updates = source.attach(source_out["checkpoint"])
        params = params.model_copy(update=updates)
    if not section.generator_class.trains(params):  # only the source had to be trained
        out = source_out
    else:
        out = run_training(section.generator_class.stage1, section.train, categories, output, ds,
                           context={"generator": params.model_dump(mode="json")},
                           what=f"{section.method} stage 1", default_storage="generator_train")
        updates = {**updates, "checkpoint": out["checkpoint"]}
        if source_out is not None:
            out["source"] = {k: source_out[k] for k in ("checkpoint", "steps", "trained_steps", "last_loss")}
    out["index_rows"] = ds.count()
    out["generator_params"] = updates
    return out


def point_shards(output: str, categories: dict[int, Category], radius: int) -> str:
    """Write ``OUTPUT/point_shards/``: labels with disks around the clicks only (EPLD Table 6 "point label")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pointseg.data.prepare import clear_dir, open_out

    uri = join(output, "point_shards")
    clear_dir(uri)
    rows = point_label_rows(read_index(join(output, "index", "index.parquet")), categories, radius)
    with open_out(join(uri, "part-00000.parquet"), "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)
    return uri


def training_dataset(shards: str, val_ids: set[int], val_every: int):
    """``ray.data`` dataset of the trainable shard rows; an empty result names the filter that emptied it."""
    import ray
    from ray.data.expressions import col

    meta = list(iter_shard_rows(shards, ["image_id", "error"]))
    ok = [r for r in meta if not r["error"]]
    train = [r for r in ok if r["image_id"] not in val_ids]
    if not meta:
        raise ValueError(f"empty training set: no shard rows under {shards} (run the pseudo-label stage first)")
    if not ok:
        raise ValueError(f"empty training set: filter error == '' removed all {len(meta)} rows of {shards}")
    if not train:
        raise ValueError(
            f"empty training set: filter 'image_id not in validation' (train.val_every={val_every}) "
            f"removed all {len(ok)} good rows of {shards}"
        )
    log.info("training rows: %d shard rows, %d without error, %d outside validation", len(meta), len(ok), len(train))
    keep = (col("error") == "") & col("image_id").not_in(sorted(val_ids))
    # Materialised once: the rows are small (label PNG + JSON; images are read by file_name), and
    # otherwise every epoch re-runs the read.
    ds = ray.data.read_parquet(shards).select_columns(SHARD_COLUMNS).filter(expr=keep)
    ds = ds.map_batches(absolute_file_names, fn_kwargs={"cwd": os.getcwd()}, batch_format="pandas").materialize()
    return ds, {"shard_rows": len(meta), "error_rows": len(meta) - len(ok), "train_rows": len(train)}


def stage2_inputs(cfg, categories: dict[int, Category], output: str) -> tuple:
    """``(dataset, counts, validation ids)`` of stage 2: the pseudo-label (or point-disk) shard rows
    outside the held-out images."""
    s2 = cfg.train
    _data_context(cfg.ray_data)
    output = local_abs(output)
    index = read_index(join(output, "index", "index.parquet"))
    val_ids = validation_ids([r["image_id"] for r in index], s2.val_every)
    shards = join(output, "shards") if s2.supervision == "pseudo" else point_shards(output, categories, s2.point_radius)
    ds, counts = training_dataset(shards, val_ids, s2.val_every)
    return ds, counts, val_ids


def train_stage2(cfg, categories: dict[int, Category], output: str, loop_extra: dict | None = None) -> dict:
    """Train ``cfg.train`` (a ``STAGE2_MODELS`` row) on ``output``'s shards; returns the run's numbers,
    the exported checkpoint and the validation image ids."""
    s2 = cfg.train
    ds, counts, val_ids = stage2_inputs(cfg, categories, output)
    out = run_training(STAGE2_MODELS[s2.model], s2, categories, output, ds, what="stage-2 run", loop_extra=loop_extra)
    return {**out, **counts, "validation_images": sorted(val_ids), "supervision": s2.supervision}
