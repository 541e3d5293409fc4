"""The one training engine: stage 1 of every trainable generator and every stage-2 model.

A :class:`Trainable` says *what* is trained: a network (:meth:`~Trainable.build`),
how rows become a batch (:meth:`~Trainable.collate`) and one loss
(:meth:`~Trainable.loss`). :func:`fit` says *how*, the same way for all of them:

* steps and epochs; AdamW by default (:meth:`Trainable.optimizer`);
* a checkpoint every ``checkpoint_every`` steps and at the end, through the
  ``save`` hook (a folder on any fsspec URI, :mod:`pointseg.train.checkpoint`,
  or ``ray.train.report`` inside a Ray Train worker);
* resume from a checkpoint, including the epoch counter and the position in
  the epoch: a resumed run does not replay the augmentations of epochs it has
  already trained (the first ``batch_in_epoch`` batches of the resumed epoch
  are skipped without being decoded);
* rank-0 metric logs every ``report_every`` steps: a console line with the ETA,
  TensorBoard scalars and ``metrics.jsonl`` (appended, so a resumed run
  continues it);
* skipped rows (bad images, bad labels) counted by the collate, summed, with
  their reasons, over all workers at every report;
* a non-finite loss stops training with :class:`FloatingPointError` naming the
  step and the batch's image ids; ``max_wall_s`` stops it with
  :class:`TimeoutError`.

Data-parallel bookkeeping: before every step the workers agree (one tiny
all-reduce) whether each has a batch, and whether each has rows in it, so a
worker whose shard ran out, or whose batch was all bad rows, never leaves the
others waiting in DDP's gradient all-reduce.

There is no Ray here: :func:`fit_plain` runs the loop in this process over a
list of rows; ``operators/training.py`` runs the same :func:`fit` inside Ray
Train workers.
"""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from pointseg.data.record import Category
from pointseg.train.checkpoint import Checkpoint, read_checkpoint, save_checkpoint

log = logging.getLogger("pointseg.train")

#: Metric names left out of logs: Mask2Former's per-decoder-layer auxiliary terms (``*_0``, ``*_1``...).
_AUX_SUFFIX = tuple(f"_{i}" for i in range(32))


class EngineConfig(BaseModel):
    """The loop's own settings, shared by every stage-1 and stage-2 config (which subclass it).

    Resources are for the Ray Train path: fractional ``cpus_per_worker`` on small
    boxes (two 1-CPU workers deadlock a 2-core machine), ``use_gpu`` on GPU nodes only.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="whether the pipeline runs this training")
    steps: int = Field(200, ge=1, description="optimisation steps in total (a resumed run continues up to it)")
    batch_size: int = Field(2, ge=1, description="rows per worker per step")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.05, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null: none")
    checkpoint_every: int = Field(50, ge=1)
    report_every: int = Field(10, ge=1)
    seed: int = Field(0, ge=0, description="model init, shuffling and augmentation")
    max_wall_s: float | None = Field(None, gt=0, description="time budget of the fit; exceeded: a clear error")
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0, description="fractional on small boxes: 1-CPU workers deadlock on 2 cores")
    use_gpu: bool = False
    max_failures: int = Field(1, ge=-1, description="worker restarts (Ray Train FailureConfig)")
    find_unused_parameters: bool = Field(True, description="DDP: parameters without a gradient in some steps")
    run_name: str = Field("train", description="Ray Train run name; rerunning with it resumes")
    storage_path: str | None = Field(None, description="Ray Train storage (fsspec URI); default under the output")


class RowCollate:
    """Rows in, one model batch out; bad rows are skipped, counted and logged, never fatal.

    Rows arrive as Ray Data gives them (a dict of column -> array) or as a list of
    row dicts. Every batch a collate returns has ``image_ids`` (the rows it kept);
    a batch with none is empty and takes no step. ``skipped`` / ``skip_reasons``
    accumulate over calls; :meth:`set_epoch` keys the augmentation randomness.
    """

    def __init__(self) -> None:
        self.skipped = 0
        self.skip_reasons: Counter[str] = Counter()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip(self, image_id, reason: str) -> None:
        """Count a bad row under the first part of ``reason`` (before ':') and log it."""
        self.skipped += 1
        self.skip_reasons[reason.split(":")[0][:80]] += 1
        log.warning("training row of image %s skipped: %s", image_id, reason)

    def __call__(self, rows) -> dict:  # pragma: no cover - interface
        raise NotImplementedError


def iter_rows(batch: dict[str, Any] | list[dict]) -> Iterator[dict]:
    """Rows of a columnar batch (dict of equal-length arrays) or of a list of row dicts."""
    if isinstance(batch, (list, tuple)):
        yield from batch
        return
    if not batch:
        return
    lengths = {k: len(v) for k, v in batch.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"batch columns differ in length: {lengths}")
    for i in range(next(iter(lengths.values()))):
        yield {k: v[i] for k, v in batch.items()}


class Trainable(ABC):
    """What the engine trains: one network, its batches and its loss.

    Subclasses set ``name``, ``Config`` (a subclass of :class:`EngineConfig`
    holding the method's or model's own settings) and ``rows`` (which rows feed
    it: ``"index"`` = ``image_id, file_name, height, width, points``; ``"shards"``
    = pseudo-label shard rows), and implement :meth:`build`, :meth:`collate` and
    :meth:`loss`. ``context`` carries what training needs beyond the config,
    e.g. a trainable generator's labelling params (its pseudo labels during
    training); it is not saved with the checkpoint.
    """

    name: ClassVar[str]
    Config: ClassVar[type[EngineConfig]] = EngineConfig
    rows: ClassVar[Literal["index", "shards"]] = "index"

    def __init__(self, config: EngineConfig | dict | None, categories: dict[int, Category], context: dict | None = None):
        self.config = config if isinstance(config, self.Config) else self.Config.model_validate(config or {})
        self.categories = categories
        self.context = dict(context or {})

    @abstractmethod
    def build(self, pretrained: bool = True) -> torch.nn.Module:
        """A fresh network; ``pretrained=False`` when its weights come from a checkpoint."""

    @abstractmethod
    def collate(self, train: bool = True) -> RowCollate:
        """The row collate of this network's batches."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """Forward and loss terms; ``"loss"`` is the total that is minimised.

        ``model`` may be DDP-wrapped: call it for the forward pass; reach other
        attributes through :func:`unwrap`.
        """

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def start(self, model: torch.nn.Module) -> None:
        """Called once per worker with the unwrapped network, before the first step
        (e.g. an in-memory generator for pseudo labels, an EMA teacher)."""

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        """Called after every optimiser step (e.g. an EMA update)."""

    def progress(self) -> dict:
        """Numbers of the method's own to add to every report (e.g. pseudo-label refreshes)."""
        return {}

    def state_dict(self) -> dict:
        """Extra training state saved with each checkpoint (tensors and plain containers only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` when resuming."""

    def meta(self) -> dict:
        """JSON-able description saved with each checkpoint: enough to rebuild the network."""
        return {
            "trainable": self.name,
            "config": self.config.model_dump(mode="json"),
            "categories": [asdict(c) for c in self.categories.values()],
        }


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def categories_from_meta(meta: dict) -> dict[int, Category]:
    return {int(c["id"]): Category(int(c["id"]), c["name"], bool(c["isthing"]), tuple(c.get("color", (0, 0, 0))))
            for c in meta["categories"]}


def load_trained(uri: str, trainable_cls: type[Trainable], device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """``(network in eval mode, meta)`` from a checkpoint folder written by :func:`fit`.

    The network is rebuilt by ``trainable_cls`` from the checkpoint's own config
    and categories (so its shape always matches the weights); a checkpoint of
    another trainable is an error naming both.
    """
    ck = read_checkpoint(uri)
    if ck.meta.get("trainable") != trainable_cls.name:
        raise ValueError(f"checkpoint {uri} was trained by {ck.meta.get('trainable')!r}, not {trainable_cls.name!r}")
    trainable = trainable_cls(ck.meta["config"], categories_from_meta(ck.meta))
    model = trainable.build(pretrained=False)
    model.load_state_dict(ck.model)
    model.to(device).eval()
    return model, ck.meta


# ----------------------------------------------------------------------------- workers


def _all_reduce(values: list, world: int, op: str, dtype) -> list:
    """Element-wise ``op`` ("MIN" / "SUM") of per-worker values over the process group."""
    if world == 1:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=dtype)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.tolist()


def all_min(flags: list[int], world: int) -> list[int]:
    """Element-wise minimum of per-worker flags, so that all ranks agree to step."""
    return [int(v) for v in _all_reduce([int(f) for f in flags], world, "MIN", torch.int64)]


def all_sum(values: list[float], world: int) -> list[float]:
    return _all_reduce(values, world, "SUM", torch.float64)


def all_reasons(reasons: Counter, world: int) -> dict[str, int]:
    """Skip reasons summed over the workers (every rank gets the total)."""
    if world == 1:
        return dict(reasons)
    import torch.distributed as dist

    gathered: list = [None] * world
    dist.all_gather_object(gathered, dict(reasons))
    total: Counter = Counter()
    for g in gathered:
        total.update(g)
    return dict(total)


@dataclass
class Hooks:
    """How :func:`fit` talks to its surroundings (a plain process or a Ray Train worker).

    save(meta, model_state, optimizer_state, extra_state, metrics): persist a checkpoint.
    report(metrics): metrics without a checkpoint (may be None).
    resume: the checkpoint to continue from, or None.
    wrap_model: e.g. Ray's ``prepare_model`` (DDP); identity by default.
    deadline: a driver-wide deadline (a restarted worker does not get a fresh budget).
    """

    save: Callable[..., None]
    rank: int = 0
    world: int = 1
    resume: Checkpoint | None = None
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
    log_dir: str | None = None
    device: torch.device | str = "cpu"
    deadline: float | None = None  # epoch seconds the fit must end by (default: now + config.max_wall_s)
    on_deadline: Literal["raise", "stop"] = "raise"  # stop: a budget, not an error (the last state is saved as final)
    crash_at_step: int | None = None  # test hook: rank 0 exits at this step once (FailureConfig tests)
    crash_marker: str | None = None


class _MetricLog:
    """Rank 0's console / TensorBoard / ``metrics.jsonl`` writer."""

    def __init__(self, log_dir: str | None, rank: int, label: str):
        self.label = label
        self.writer = self.history = None
        if rank == 0 and log_dir:
            import os

            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(log_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir)
            self.history = open(os.path.join(log_dir, "metrics.jsonl"), "a")
        self.rank = rank

    def write(self, metrics: dict, step: int, steps: int, eta_s: float | None) -> None:
        if self.rank != 0:
            return
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                         if not isinstance(v, (dict, list, str)))
        eta = f" eta {eta_s:.0f}s" if eta_s is not None else ""
        log.info("%s step %d/%d%s %s", self.label, step, steps, eta, shown)
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"{self.label}/{k}", v, step)
            self.writer.flush()
            self.history.write(json.dumps(metrics, default=str) + "\n")
            self.history.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.history.close()


class _SkipFirst:
    """A collate that answers its first ``n`` calls with a marker instead of decoding
    (the batches a resumed run already trained on in its current epoch)."""

    def __init__(self, inner: RowCollate, n: int):
        self.inner, self.remaining = inner, int(n)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, rows):
        if self.remaining > 0:
            self.remaining -= 1
            return {"image_ids": [], "_already_trained": True}
        return self.inner(rows)


def to_device(batch, device):
    """Tensors of a (nested) batch moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_size_of(batch: dict) -> int:
    return len(batch.get("image_ids", []))


def fit(trainable: Trainable, epoch_batches: Callable[[int, RowCollate], Iterable[dict | None]], hooks: Hooks,
        label: str | None = None) -> dict:
    """Train ``trainable`` to ``config.steps`` (module docstring); returns the last metrics.

    ``epoch_batches(epoch, collate)`` yields the collated batches of one epoch on
    this worker (``collate`` already wraps the trainable's, with the epoch set).
    Returns a dict with ``step``, ``start_step``, ``epoch``, the last window's
    losses, ``skipped_rows`` and ``skip_reasons`` (summed over workers).
    """
    cfg = trainable.config
    label = label or trainable.name
    rank, world = hooks.rank, hooks.world
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP broadcasts rank 0's anyway)
    model = trainable.build()
    optimizer = trainable.optimizer(model)
    step = epoch = batch_in_epoch = 0
    if hooks.resume is not None:
        ck = hooks.resume
        if ck.meta.get("trainable") != trainable.name:
            raise ValueError(f"resume checkpoint {ck.uri} was trained by {ck.meta.get('trainable')!r}, not {trainable.name!r}")
        model.load_state_dict(ck.model)
        if ck.optimizer is not None:
            optimizer.load_state_dict(ck.optimizer)
        trainable.load_state_dict(ck.extra or {})
        step, epoch, batch_in_epoch = int(ck.meta["step"]), int(ck.meta.get("epoch", 0)), int(ck.meta.get("batch_in_epoch", 0))
        log.info("rank %d: %s resumed at step %d (epoch %d, batch %d of it)", rank, label, step, epoch, batch_in_epoch)
    start_step = step
    deadline = hooks.deadline or (time.time() + cfg.max_wall_s if cfg.max_wall_s else None)
    model.to(hooks.device)
    wrapped = hooks.wrap_model(model)
    trainable.start(model)
    collate = trainable.collate(train=True)
    logs = _MetricLog(hooks.log_dir, rank, label)

    skipped_before = collate.skipped
    reasons_total: Counter = Counter()
    window: list[dict] = []
    images, t_window, t_start = 0, time.perf_counter(), time.perf_counter()
    last: dict = {"step": step, "start_step": start_step, "epoch": epoch}

    def save(final: bool = False) -> None:
        meta = {**trainable.meta(), "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}
        skipped, reasons = gathered_skips()
        metrics = dict(last, step=step, start_step=start_step, epoch=epoch, skipped_rows=skipped,
                       skip_reasons=json.dumps(reasons), final=final)
        hooks.save(meta, unwrap(model).state_dict(), optimizer.state_dict(), trainable.state_dict(), metrics)

    def gathered_skips() -> tuple[int, dict]:
        reasons = all_reasons(collate.skip_reasons, world)
        total = int(all_sum([collate.skipped - skipped_before], world)[0])
        return total, reasons

    try:
        if step >= cfg.steps:
            save(final=True)  # a finished run resumed: nothing to train, report the restored state
        while step < cfg.steps:
            collate.set_epoch(epoch)
            source = _SkipFirst(collate, batch_in_epoch)
            it = iter(epoch_batches(epoch, source))
            got_any, steps_before, exhausted, resumed_batches = False, step, False, 0
            while step < cfg.steps:
                batch = next(it, None)
                already = batch is not None and batch.pop("_already_trained", False)
                has_batch, has_rows = all_min([batch is not None, batch is not None and not already
                                               and batch_size_of(batch) > 0], world)
                if not has_batch:
                    exhausted = True
                    break  # end of the epoch (all workers together)
                got_any = True
                if already:
                    resumed_batches += 1
                    continue
                batch_in_epoch += 1
                if not has_rows:
                    continue
                if hooks.crash_at_step == step and rank == 0 and hooks.crash_marker:
                    import os

                    if not os.path.exists(hooks.crash_marker):
                        with open(hooks.crash_marker, "w") as f:
                            f.write(f"crashed at step {step}\n")
                        log.warning("test hook: rank 0 exits at step %d", step)
                        os._exit(1)
                batch = to_device(batch, hooks.device)
                wrapped.train()
                terms = trainable.loss(wrapped, batch, step)
                total = terms["loss"]
                if not torch.isfinite(total.detach()).all():
                    ids = [int(i) for i in batch.get("image_ids", [])]
                    raise FloatingPointError(
                        f"{label}: the loss is {float(total.detach())} at step {step} (epoch {epoch}); "
                        f"batch image ids {ids}; terms " + ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items()))
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
                optimizer.step()
                step += 1
                trainable.after_step(model, step)
                images += batch_size_of(batch)
                window.append({k: float(v.detach()) for k, v in terms.items() if not k.endswith(_AUX_SUFFIX)})
                final = step == cfg.steps
                if step % cfg.report_every == 0 or final:
                    seconds = time.perf_counter() - t_window
                    total_images = all_sum([images], world)[0]
                    skipped, reasons = gathered_skips()
                    keys = window[-1].keys()
                    last = {k: sum(w.get(k, 0.0) for w in window) / len(window) for k in keys}
                    rate = (step - start_step) / max(time.perf_counter() - t_start, 1e-9)
                    last.update(step=step, start_step=start_step, epoch=epoch, lr=optimizer.param_groups[0]["lr"],
                                images_per_s=total_images / max(seconds, 1e-9), skipped_rows=skipped,
                                world_size=world, **trainable.progress())
                    reasons_total = Counter(reasons)
                    logs.write(last, step, cfg.steps, (cfg.steps - step) / rate if rate > 0 else None)
                    window, images, t_window = [], 0, time.perf_counter()
                if step % cfg.checkpoint_every == 0 or final:
                    save(final=final)
                if deadline is not None and time.time() > deadline and not final:
                    if hooks.on_deadline == "stop":
                        log.info("%s: time budget reached at step %d of %d; stopping there", label, step, cfg.steps)
                        save(final=True)
                        return {**last, "step": step, "start_step": start_step, "epoch": epoch, "budget_stop": True}
                    save()
                    raise TimeoutError(
                        f"{label}: the time budget (max_wall_s={cfg.max_wall_s}) ran out at step {step} of "
                        f"{cfg.steps} (a checkpoint was saved; rerun to resume, or raise the budget)")
            if not exhausted:
                break  # the last step came before the end of the epoch
            if not got_any:
                raise RuntimeError(f"{label}: rank {rank}: the training data yielded no batch in epoch {epoch}")
            if step == steps_before and not resumed_batches:  # every row skipped: looping again would never end
                skipped, reasons = gathered_skips()
                raise RuntimeError(f"{label}: rank {rank}: epoch {epoch} took no step: every training row was "
                                   f"skipped as bad ({skipped} skips: {reasons})")
            epoch += 1
            batch_in_epoch = 0
    finally:
        logs.close()
    skipped, reasons = (last.get("skipped_rows", 0), dict(reasons_total))
    return {**last, "step": step, "start_step": start_step, "epoch": epoch, "skipped_rows": skipped,
            "skip_reasons": reasons}


# ----------------------------------------------------------------------------- plain loop


def plain_epoch_batches(rows: list[dict], batch_size: int, seed: int) -> Callable[[int, RowCollate], Iterator[dict]]:
    """Seeded shuffled batches of ``rows`` per epoch (the plain-loop data source of :func:`fit`)."""

    def epoch_batches(epoch: int, collate: RowCollate) -> Iterator[dict]:
        order = np.random.default_rng([seed, epoch]).permutation(len(rows))
        for s in range(0, len(order), batch_size):
            chunk = [rows[int(i)] for i in order[s : s + batch_size]]
            yield collate(chunk)

    return epoch_batches


def checkpoint_folder_saver(uri: str) -> Callable[..., None]:
    """A ``save`` hook writing every checkpoint over the one folder ``uri`` (any fsspec URI)."""

    def save(meta, model_state, optimizer_state, extra_state, metrics) -> None:
        save_checkpoint(uri, {**meta, "metrics": metrics}, model_state, optimizer_state, extra_state)

    return save


def fit_plain(trainable: Trainable, rows: list[dict], checkpoint_uri: str, resume: bool = True,
              log_dir: str | None = None, budget_s: float | None = None) -> dict:
    """:func:`fit` in this process over ``rows``; checkpoints go to ``checkpoint_uri``
    (and a rerun with ``resume`` continues from it, epoch counter included).

    ``budget_s``: stop training (not an error) after this many wall seconds and
    keep the state reached as the final checkpoint (Tune trials)."""
    import fsspec

    if not rows:
        raise ValueError(f"{trainable.name}: no training rows")
    ck = None
    fs, path = fsspec.core.url_to_fs(checkpoint_uri.rstrip("/") + "/meta.json")
    if resume and fs.exists(path):
        ck = read_checkpoint(checkpoint_uri, optimizer=True, extra=True)
    hooks = Hooks(save=checkpoint_folder_saver(checkpoint_uri), resume=ck, log_dir=log_dir,
                  deadline=time.time() + budget_s if budget_s else None, on_deadline="stop" if budget_s else "raise")
    return fit(trainable, plain_epoch_batches(rows, trainable.config.batch_size, trainable.config.seed), hooks)


__all__ = [
    "EngineConfig",
    "Hooks",
    "RowCollate",
    "Trainable",
    "all_min",
    "all_reasons",
    "all_sum",
    "categories_from_meta",
    "checkpoint_folder_saver",
    "fit",
    "fit_plain",
    "iter_rows",
    "load_trained",
    "plain_epoch_batches",
    "to_device",
    "unwrap",
]
