"""Stage-2 training on the pseudo-label shards with Ray Train.

    python flows/train.py --config configs/train.yaml --output out/run [train.steps=400 ...]

Needs ``OUTPUT/shards`` (run flows/pseudo_label.py or flows/full_pipeline.py
first). Reads::

    read_parquet(OUTPUT/shards, error == "" and image_id not in validation)
      -> TorchTrainer(train_loop_per_worker)      # pointseg/train/ray_loop.py
           get_dataset_shard("train").iter_torch_batches(collate_fn=ShardCollate)
           prepare_model (DDP) -> steps -> checkpoints to RunConfig(storage_path)/run_name

Rerunning with the same ``train.run_name`` and ``train.storage_path`` resumes
from the latest checkpoint. TensorBoard: ``tensorboard --logdir STORAGE/RUN/tensorboard``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from common import StageTimer, init_ray, pipeline_args

from pointseg.config import PipelineConfig, Stage2Config
from pointseg.data.prepare import iter_shard_rows, join, load_categories, read_index
from pointseg.data.record import Category
from pointseg.train.ray_loop import train_loop_per_worker
from pointseg.train.stage2 import point_label_rows, validation_ids

log = logging.getLogger("pointseg.flows.train")

SHARD_COLUMNS = ["image_id", "file_name", "height", "width", "label_png", "segments_info", "error"]
NATIVE_SCHEMES = ("file", "local", "s3", "gs", "gcs", "hdfs", "abfs", "abfss")


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def storage_args(uri: str) -> dict:
    """``RunConfig`` storage kwargs: local paths made absolute, pyarrow-native URIs as is,
    any other fsspec URI through ``PyFileSystem(FSSpecHandler(fs))`` (STACK.md)."""
    if is_local(uri):
        return {"storage_path": str(Path(uri.removeprefix("file://")).resolve())}
    if uri.split("://", 1)[0] in NATIVE_SCHEMES:
        return {"storage_path": uri}
    import fsspec
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(uri)
    return {"storage_path": path, "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))}


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


def absolute_file_names(batch: dict, cwd: str) -> dict:
    """Local relative ``file_name`` -> absolute against the driver's ``cwd``: Ray Train workers
    run in another working directory (a relative COCO image path there is a FileNotFoundError)."""
    import os

    batch["file_name"] = [f if "://" in f or os.path.isabs(f) else os.path.join(cwd, f) for f in batch["file_name"]]
    return batch


def training_dataset(shards: str, val_ids: set[int], val_every: int):
    """``ray.data`` dataset of the trainable shard rows; an empty result names the filter that emptied it."""
    import os

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
    # otherwise every epoch re-runs the read (3-5 s per epoch here, as long as an epoch of 18 images).
    ds = ray.data.read_parquet(shards).select_columns(SHARD_COLUMNS).filter(expr=keep)
    ds = ds.map_batches(absolute_file_names, fn_kwargs={"cwd": os.getcwd()}, batch_format="pandas").materialize()
    return ds, {"shard_rows": len(meta), "error_rows": len(meta) - len(ok), "train_rows": len(train)}


def fit_torch_trainer(loop, loop_config: dict, section, run_name: str, datasets: dict, storage_kwargs: dict,
                      what: str, callbacks: list | None = None, num_to_keep: int = 2):
    """Build and fit the one ``TorchTrainer`` shape every flow uses; a run without a checkpoint is an error.

    ``section`` is a config with ``num_workers, cpus_per_worker, use_gpu, max_failures`` (fractional CPUs:
    two 1-CPU workers deadlock a 2-core box).
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
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{what} {run_name!r} finished without a checkpoint (error: {result.error})")
    return result


def run_training(cfg: PipelineConfig, categories: dict[int, Category], output: str, loop_extra: dict | None = None) -> dict:
    """Train ``cfg.train`` on ``output``'s shards; returns the checkpoint path, metrics and counts."""
    import ray

    s2: Stage2Config = cfg.train
    ctx = ray.data.DataContext.get_current()
    ctx.execution_no_progress_timeout_s = cfg.ray_data.no_progress_timeout_s  # a hang becomes an error
    ctx.enable_progress_bars = False  # the training loop logs its own progress
    index = read_index(join(output, "index", "index.parquet"))
    val_ids = validation_ids([r["image_id"] for r in index], s2.val_every)
    output = str(Path(output).resolve()) if is_local(output) else output  # workers run in another cwd
    shards = join(output, "shards") if s2.supervision == "pseudo" else point_shards(output, categories, s2.point_radius)
    ds, counts = training_dataset(shards, val_ids, s2.val_every)

    storage = s2.storage_path or join(output, "train")
    sargs = storage_args(storage)
    run_dir = join(sargs["storage_path"], s2.run_name)
    log_dir = join(run_dir, "tensorboard") if "storage_filesystem" not in sargs and is_local(storage) else str(
        Path(output if is_local(output) else ".").resolve() / "tensorboard" / s2.run_name
    )
    loop_config = {
        "stage2": s2.model_dump(mode="json"),
        "categories": [asdict(c) for c in categories.values()],
        "log_dir": log_dir,
        **(loop_extra or {}),
    }
    result = fit_torch_trainer(train_loop_per_worker, loop_config, s2, s2.run_name, {"train": ds}, sargs, "stage-2 run")
    metrics = dict(result.metrics or {})
    history_file = Path(log_dir) / "metrics.jsonl"
    history = [json.loads(line) for line in history_file.read_text().splitlines()] if history_file.exists() else []
    return {
        "checkpoint": result.checkpoint.path,
        "run_dir": run_dir,
        "log_dir": log_dir,
        "metrics": metrics,
        "history": history,
        "skipped_rows": int(metrics.get("skipped_rows", 0)),
        "skip_reasons": json.loads(metrics.get("skip_reasons", "{}")),
        "validation_images": sorted(val_ids),
        "supervision": s2.supervision,
        **counts,
    }


def main() -> None:
    cfg, output = pipeline_args(__doc__, "configs/train.yaml")
    categories = load_categories(join(output, "categories.json"))
    init_ray(cfg.ray)
    timer = StageTimer()
    with timer.stage("train"):
        out = run_training(cfg, categories, output)
    out.pop("history")
    print(json.dumps({**out, "seconds": timer.seconds}, indent=2, default=str))


if __name__ == "__main__":
    main()
