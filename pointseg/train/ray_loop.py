"""The stage-2 training function run by every Ray Train worker.

``train_loop_per_worker(config)`` is what ``TorchTrainer`` (flows/train.py) and
a Tune driver call. Ray is imported lazily inside the functions here, so the
rest of :mod:`pointseg` stays importable without Ray. Per worker::

    model (+ resume from ray.train.get_checkpoint()) -> prepare_model (DDP)
    loop: get_dataset_shard("train").iter_torch_batches(collate_fn=ShardCollate)
          -> train_step -> every report_every: console + TensorBoard + metrics.jsonl (rank 0)
                        -> every checkpoint_every: ray.train.report(metrics, checkpoint)

``config`` keys: ``stage2`` (a :class:`pointseg.config.Stage2Config` dump),
``categories`` (list of category dicts), ``log_dir`` (local folder for rank
0's TensorBoard events and ``metrics.jsonl``). Test hook: ``crash_at_step`` +
``crash_marker`` make rank 0 ``os._exit(1)`` at that step once (the marker file
remembers that it happened), to exercise ``FailureConfig``.

Data-parallel bookkeeping: a batch whose rows were all skipped (bad shard rows)
must not desynchronise DDP's gradient all-reduce, so before every step the
workers agree (one tiny all-reduce) whether every one of them has a batch;
if not, nobody steps.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch

from pointseg.train.stage2 import build_stage2_model, save_checkpoint, STATE_FILE

log = logging.getLogger("pointseg.train")

#: Loss names logged; Mask2Former's per-decoder-layer auxiliary terms (``*_0``, ``*_1``...) are left out.
_AUX = re.compile(r"_\d+$")


def make_collate(stage2, categories):
    """The PanopticCollate / InstanceCollate the config asks for (plain, no Ray)."""
    from pointseg.models.panoptic import PanopticModelConfig
    from pointseg.train.augment import AugmentConfig
    from pointseg.train.loop import InstanceCollate, PanopticCollate

    model_cfg = stage2.panoptic if stage2.task == "panoptic" else stage2.instance
    size = model_cfg.get("image_size", 256)
    aug = AugmentConfig.model_validate({**stage2.augment, "crop_size": size})
    if stage2.task == "panoptic":
        backbone = PanopticModelConfig.model_validate(stage2.panoptic).backbone
        return PanopticCollate(categories, backbone, aug, seed=stage2.seed)
    return InstanceCollate(categories, aug, seed=stage2.seed)


def ray_collate(inner):
    """Wrap a row collate in a ``NumpyBatchCollateFn`` (Ray 2.60 deprecates plain functions).

    The returned batch carries ``num_skipped`` and ``skip_reasons`` of this call,
    so the counts reach the training loop even if Ray runs the collate in
    another thread.
    """
    from ray.data.collate_fn import NumpyBatchCollateFn

    class ShardCollate(NumpyBatchCollateFn):
        def __init__(self, inner):
            self.inner = inner
            self.lock = threading.Lock()

        def __call__(self, batch):
            with self.lock:
                before, reasons = self.inner.skipped, Counter(self.inner.skip_reasons)
                out = self.inner(batch)
                out["num_skipped"] = self.inner.skipped - before
                out["skip_reasons"] = dict(self.inner.skip_reasons - reasons)
            return out

    return ShardCollate(inner)


class _Unwrapped:
    """Calls go through the DDP wrapper (gradient hooks), attributes come from the model
    (``get_loss_dict`` of Mask2Former)."""

    def __init__(self, wrapped):
        self.wrapped = wrapped
        self.module = getattr(wrapped, "module", wrapped)

    def __call__(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def train(self, mode: bool = True):
        self.wrapped.train(mode)
        return self

    def __getattr__(self, name):
        return getattr(self.module, name)


def _batch_size(batch) -> int:
    return len(batch["pixel_values"]) if "pixel_values" in batch else len(batch["targets"])


def open_metric_logs(log_dir: str | None, rank: int):
    """Rank 0's TensorBoard writer and ``metrics.jsonl`` (appended, so a resumed run continues it); ``(None, None)`` elsewhere."""
    if rank != 0 or not log_dir:
        return None, None
    from torch.utils.tensorboard import SummaryWriter

    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir), open(Path(log_dir) / "metrics.jsonl", "a")


def log_metrics(metrics: dict, step: int, steps: int, label: str, writer, history) -> None:
    """Rank 0's report of one window: a log line, TensorBoard scalars under ``label/`` and a
    ``metrics.jsonl`` row (``writer`` / ``history`` from :func:`open_metric_logs`)."""
    log.info("%s step %d/%d %s", label, step, steps,
             " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    if writer is not None:
        for k, v in metrics.items():
            writer.add_scalar(f"{label}/{k}", v, step)
        writer.flush()
        history.write(json.dumps(metrics) + "\n")
        history.flush()


def _all_reduce(values: list, world: int, op: str, dtype) -> list:
    """Element-wise ``op`` ("MIN" / "SUM") of per-worker values over the process group."""
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=dtype)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.tolist()


def all_min(flags: list[int], world: int) -> list[int]:
    """Element-wise minimum of per-worker flags (one tiny all-reduce), so all ranks agree to step."""
    return _all_reduce(flags, world, "MIN", torch.int64)


def _all_sum(values: list[float], world: int) -> list[float]:
    return _all_reduce(values, world, "SUM", torch.float64)


def _all_reasons(reasons: Counter, world: int) -> dict:
    if world == 1:
        return dict(reasons)
    import torch.distributed as dist

    gathered = [None] * world
    dist.all_gather_object(gathered, dict(reasons))
    total: Counter = Counter()
    for g in gathered:
        total.update(g)
    return dict(total)


def train_loop_per_worker(config: dict) -> None:
    """Train the stage-2 model on this worker's shard of the ``train`` dataset (see module doc)."""
    import ray.train
    import ray.train.torch

    from pointseg.config import Stage2Config
    from pointseg.data.coco_panoptic_io import as_categories
    from pointseg.train.loop import train_step

    s2 = Stage2Config.model_validate(config["stage2"])
    categories = as_categories(config["categories"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(s2.seed)  # identical init on every rank (DDP broadcasts rank 0's anyway)

    model_cfg = s2.panoptic if s2.task == "panoptic" else s2.instance
    model, _ = build_stage2_model(s2.task, model_cfg, categories)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s2.lr, weight_decay=s2.weight_decay)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        log.info("rank %d: resumed from checkpoint at step %d", rank, step)
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": s2.find_unused_parameters}
    )
    net = _Unwrapped(model)

    collate = ray_collate(make_collate(s2, categories))
    shard = ray.train.get_dataset_shard("train")
    writer, history = open_metric_logs(config.get("log_dir"), rank)

    skipped, empty_steps, reasons = 0, 0, Counter()
    window: list[dict] = []
    images, t_window = 0, time.perf_counter()
    epoch = 0
    last_metrics: dict = {}
    while step < s2.steps:
        collate.inner.set_epoch(epoch)
        it = iter(shard.iter_torch_batches(batch_size=s2.batch_size, collate_fn=collate, device="cpu"))
        got_any, steps_before = False, step
        while step < s2.steps:
            batch = next(it, None)
            if batch is not None:
                skipped += batch.pop("num_skipped")
                reasons.update(batch.pop("skip_reasons"))
            has_batch, has_rows = all_min([batch is not None, batch is not None and _batch_size(batch) > 0], world)
            if not has_batch:
                break  # end of epoch (all workers together)
            got_any = True
            if not has_rows:
                empty_steps += 1
                continue
            if config.get("crash_at_step") == step and rank == 0:
                marker = Path(config["crash_marker"])
                if not marker.exists():
                    marker.write_text(f"crashed at step {step}\n")
                    log.warning("test hook: rank 0 exits at step %d", step)
                    os._exit(1)
            losses = train_step(net, batch, optimizer, s2.max_grad_norm)
            step += 1
            images += _batch_size(batch)
            window.append({k: v for k, v in losses.items() if not _AUX.search(k)})
            final = step == s2.steps
            if step % s2.report_every == 0 or final:
                seconds = time.perf_counter() - t_window
                total_images, total_skipped = _all_sum([images, skipped], world)
                metrics = {k: sum(w[k] for w in window) / len(window) for k in window[-1]}
                metrics.update(
                    step=step, epoch=epoch, lr=optimizer.param_groups[0]["lr"],
                    images_per_s=total_images / max(seconds, 1e-9), skipped_rows=int(total_skipped),
                    empty_steps=empty_steps, world_size=world,
                )
                last_metrics = metrics
                if rank == 0:
                    log_metrics(metrics, step, s2.steps, "train", writer, history)
                window, images, t_window = [], 0, time.perf_counter()
            if step % s2.checkpoint_every == 0 or final:
                metrics = dict(last_metrics, step=step)
                if final:
                    metrics["skip_reasons"] = json.dumps(_all_reasons(reasons, world))
                with tempfile.TemporaryDirectory() as d:
                    ckpt = None
                    if rank == 0:
                        save_checkpoint(d, model, optimizer, step, s2.task, model_cfg, categories)
                        ckpt = ray.train.Checkpoint.from_directory(d)
                    ray.train.report(metrics, checkpoint=ckpt)
        if not got_any:
            raise RuntimeError(f"rank {rank}: the training dataset shard yielded no batch in epoch {epoch}")
        if step == steps_before:  # every row skipped: looping again would never end
            raise RuntimeError(
                f"rank {rank}: epoch {epoch} took no step: every training row was skipped as bad "
                f"({skipped} skips: {dict(reasons)})"
            )
        epoch += 1
    if writer is not None:
        writer.close()
        history.close()
