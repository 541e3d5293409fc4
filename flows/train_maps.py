"""Stage 1 of Point2Mask: train the map network (P^s, P^b_high) on the points with Ray Train.

    python flows/train_maps.py --config configs/point2mask_trained.yaml --output out/p2m [maps_training.steps=400 ...]

Needs ``OUTPUT/index`` (run flows/full_pipeline.py, or this flow prepares the
inputs from the config's dataset first). Reads::

    read_parquet(OUTPUT/index/index.parquet)   # image_id, file_name, height, width, points (JSON)
      -> TorchTrainer(map_train_loop_per_worker)   # pointseg/train/ray_maps.py
           get_dataset_shard("train").iter_torch_batches(collate_fn=MapCollate)
           pseudo labels of the batch from the current maps every K steps (L_bou, Eq. 6-7)
           train_step -> checkpoints to RunConfig(storage_path)/run_name
      -> OUTPUT/maps/map_net.pt   (load_map_net format: generator.params.checkpoint)

Rerunning with the same ``maps_training.run_name`` and ``storage_path``
resumes from the latest checkpoint (a finished run trains no further step).
TensorBoard: ``tensorboard --logdir STORAGE/RUN/tensorboard``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from common import StageTimer, init_ray, pipeline_args
from train import absolute_file_names, fit_torch_trainer, is_local, storage_args

from pointseg.config import PipelineConfig
from pointseg.data.prepare import join, prepare_inputs
from pointseg.data.record import Category
from pointseg.train.ray_maps import MAP_NET_FILE, map_train_loop_per_worker

log = logging.getLogger("pointseg.flows.train_maps")

INDEX_COLUMNS = ["image_id", "file_name", "height", "width", "points"]
#: Generator params that concern loading a checkpoint, not the pseudo labels of training.
_LOADING_KEYS = ("maps", "checkpoint", "device", "input_max_side")


def map_net_path(output: str) -> str:
    """Where stage 1 leaves the trained network for the pseudo-label actors."""
    return join(output, "maps", MAP_NET_FILE)


def map_train_config(cfg: PipelineConfig) -> dict:
    """The :class:`~pointseg.train.point2mask_maps.MapTrainConfig` of ``cfg.maps_training``.

    The pseudo labels of ``L_bou`` use the run's own generator params (minus the
    checkpoint keys) unless ``maps_training.map_net.generator`` says otherwise.
    """
    from pointseg.train.point2mask_maps import MapTrainConfig

    mt = cfg.maps_training
    generator = {k: v for k, v in cfg.generator.params.items() if k not in _LOADING_KEYS}
    fields = {"generator": generator, **mt.map_net, "image_size": mt.image_size, "batch_size": mt.batch_size,
              "lr": mt.lr, "seed": mt.seed}
    return MapTrainConfig.model_validate(fields).model_dump(mode="json")


def run_map_training(cfg: PipelineConfig, categories: dict[int, Category], output: str) -> dict:
    """Train MapNet on ``output``'s index with Ray Train; returns the checkpoint path and the run's numbers."""
    import ray

    mt = cfg.maps_training
    if not is_local(output):
        raise ValueError(f"output {output!r}: map training writes maps/{MAP_NET_FILE} for the generator, which reads local files")
    output = str(Path(output).resolve())  # Train workers run in another cwd
    ctx = ray.data.DataContext.get_current()
    ctx.execution_no_progress_timeout_s = cfg.ray_data.no_progress_timeout_s  # a hang becomes an error
    ctx.enable_progress_bars = False
    ds = ray.data.read_parquet(join(output, "index", "index.parquet")).select_columns(INDEX_COLUMNS)
    ds = ds.map_batches(absolute_file_names, fn_kwargs={"cwd": os.getcwd()}, batch_format="pandas").materialize()
    rows = ds.count()
    if rows == 0:
        raise ValueError(f"map training: {join(output, 'index', 'index.parquet')} has no rows")

    sargs = storage_args(mt.storage_path or join(output, "maps_train"))
    run_dir = join(sargs["storage_path"], mt.run_name)
    log_dir = join(run_dir, "tensorboard") if "storage_filesystem" not in sargs and is_local(sargs["storage_path"]) else join(
        output, "tensorboard", mt.run_name)
    loop_config = {
        "map_train": map_train_config(cfg),
        "steps": mt.steps,
        "report_every": mt.report_every,
        "checkpoint_every": mt.checkpoint_every,
        "categories": [asdict(c) for c in categories.values()],
        "log_dir": log_dir,
    }
    result = fit_torch_trainer(map_train_loop_per_worker, loop_config, mt, mt.run_name, {"train": ds}, sargs, "map-training run")
    target = Path(map_net_path(output))
    target.parent.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        shutil.copyfile(Path(d) / MAP_NET_FILE, target.with_suffix(".tmp"))
    target.with_suffix(".tmp").replace(target)
    metrics = dict(result.metrics or {})
    history_file = Path(log_dir) / "metrics.jsonl"
    history = [json.loads(line) for line in history_file.read_text().splitlines()] if history_file.exists() else []
    start = int(metrics.get("start_step", 0))
    return {
        "checkpoint": str(target),
        "ray_checkpoint": result.checkpoint.path,
        "run_dir": run_dir,
        "log_dir": log_dir,
        "steps": int(metrics.get("step", mt.steps)),
        "start_step": start,
        "trained_steps": int(metrics.get("step", mt.steps)) - start,
        "index_rows": rows,
        "pseudo_refreshes": int(metrics.get("pseudo_refreshes", 0)),
        "skipped_rows": int(metrics.get("skipped_rows", 0)),
        "skip_reasons": json.loads(metrics.get("skip_reasons", "{}")),
        "last_loss": metrics.get("loss", history[-1].get("loss") if history else None),
        "history": history,
    }


def generator_training(cfg: PipelineConfig, categories: dict[int, Category], output: str) -> dict | None:
    """The full pipeline's stage-1 hook for ``point2mask``: train when ``maps: learned`` and
    ``maps_training.enabled``; the result's ``generator_params`` point the generator at the network."""
    params = cfg.generator.params
    if params.get("maps") != "learned" or not cfg.maps_training.enabled:
        return None
    if params.get("checkpoint"):
        raise ValueError(
            f"generator.params.checkpoint ({params['checkpoint']}) is set and maps_training.enabled is true: "
            "either train the maps in this run (drop the checkpoint) or use that checkpoint (maps_training.enabled=false)"
        )
    out = run_map_training(cfg, categories, output)
    out["generator_params"] = {"maps": "learned", "checkpoint": out["checkpoint"]}
    return out


def main() -> None:
    cfg, output = pipeline_args(__doc__, "configs/point2mask_trained.yaml")
    timer = StageTimer()
    with timer.stage("prepare"):
        categories, _ = prepare_inputs(cfg.dataset, cfg.points, output, cfg.strict)
    init_ray(cfg.ray)
    with timer.stage("train_maps"):
        out = run_map_training(cfg, categories, output)
    out.pop("history")
    print(json.dumps({**out, "seconds": timer.seconds}, indent=2, default=str))


if __name__ == "__main__":
    main()
