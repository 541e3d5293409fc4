"""Stage 1 of a Point2Mask run: the map-network training function of every Ray Train worker.

``map_train_loop_per_worker(config)`` is what ``TorchTrainer``
(flows/train_maps.py) calls. It is the loop of
:func:`pointseg.train.point2mask_maps.train_map_net` spread over Ray Train
workers, built from the same library pieces (:func:`collate_records`,
:func:`train_step`, :func:`save_map_net`). Per worker::

    MapNet (+ resume from ray.train.get_checkpoint()) -> prepare_model (DDP when > 1 worker)
    loop: get_dataset_shard("train").iter_torch_batches(collate_fn=MapCollate)
          -> every pseudo_every steps: pseudo labels of this worker's batch from the
             current maps (Point2Mask Eq. 6-7 need the current masks for L_bou)
          -> train_step -> every report_every: console + TensorBoard + metrics.jsonl (rank 0)
                        -> every checkpoint_every and at the end: ray.train.report(metrics, checkpoint)

A checkpoint directory holds ``map_net.pt`` in the format of
:func:`~pointseg.train.point2mask_maps.save_map_net` (what
:func:`~pointseg.train.point2mask_maps.load_map_net` and the generator's
``checkpoint`` read) and ``optimizer.pt`` for resuming.

``config`` keys: ``map_train`` (a :class:`MapTrainConfig` dump), ``steps``,
``checkpoint_every``, ``report_every``, ``categories`` (list of category
dicts), ``log_dir`` (local folder for rank 0's TensorBoard events and
``metrics.jsonl``). Ray is imported inside the functions, so the module
imports without Ray.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from pointseg.data.record import Category, ImageRecord, Points
from pointseg.train.ray_loop import all_min, log_metrics, open_metric_logs

log = logging.getLogger("pointseg.train.maps")

MAP_NET_FILE = "map_net.pt"
OPTIMIZER_FILE = "optimizer.pt"


class PseudoLabelCache:
    """Pseudo labels ``(pseudo_ids, thing_map)`` per image id, recomputed when ``every`` steps old.

    The rule of :func:`~pointseg.train.point2mask_maps.train_map_net`: ``L_bou``
    (Point2Mask Eq. 6-7) is trained against the masks that the current maps
    give, refreshed every ``K = pseudo_every`` steps from ``pseudo_start`` on.
    """

    def __init__(self, every: int):
        self.every = every
        self.entries: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
        self.refreshes = 0

    def attach(self, batch: dict, step: int, net, generator) -> None:
        """Add ``pseudo_ids`` (B, S, S) long and ``thing_map`` (B, S, S) bool to ``batch``."""
        from pointseg.train.point2mask_maps import _pseudo_labels

        keys = [int(k) for k in batch["image_ids"]]
        stale = [i for i, k in enumerate(keys) if k not in self.entries or step - self.entries[k][0] >= self.every]
        if stale:
            for i, (ids, things) in zip(stale, _pseudo_labels(net, generator, batch, stale)):
                self.entries[keys[i]] = (step, ids, things)
            self.refreshes += len(stale)
        batch["pseudo_ids"] = torch.from_numpy(np.stack([self.entries[k][1] for k in keys]))
        batch["thing_map"] = torch.from_numpy(np.stack([self.entries[k][2] for k in keys]))


def map_collate(categories: dict[int, Category], image_size: int):
    """A ``NumpyBatchCollateFn``: index rows (``image_id, file_name, height, width, points``)
    -> :func:`~pointseg.train.point2mask_maps.collate_records` batch.

    Rows whose image cannot be read or that have no valid point are skipped and
    counted (``num_skipped``, ``skip_reasons`` in the returned batch); a batch
    of only such rows comes back with ``image = None``.
    """
    from ray.data.collate_fn import NumpyBatchCollateFn

    from pointseg.data.images import read_image
    from pointseg.data.points import validate_points
    from pointseg.train.point2mask_maps import collate_records

    category_ids = sorted(categories)

    class MapCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict) -> dict:
            records, reasons = [], Counter()
            for i in range(len(batch["image_id"])):
                image_id = int(batch["image_id"][i])
                try:
                    image = read_image(str(batch["file_name"][i]))
                    h, w = image.shape[:2]
                    points, _ = validate_points(Points.from_list(json.loads(batch["points"][i])), h, w, categories)
                    if len(points) == 0:
                        raise ValueError("no valid points")
                except Exception as exc:  # noqa: BLE001 - one bad image never sinks the run
                    reasons[f"{type(exc).__name__}: {exc}"[:80]] += 1
                    log.warning("map training: image %d skipped: %s", image_id, exc)
                    continue
                records.append(ImageRecord(image_id, h, w, str(batch["file_name"][i]), image, points=points))
            out = collate_records(records, category_ids, image_size) if records else {"image": None}
            out["num_skipped"] = sum(reasons.values())
            out["skip_reasons"] = dict(reasons)
            return out

    return MapCollate()


def save_ray_checkpoint(directory: str, net, optimizer, cfg, category_ids: list[int], step: int) -> None:
    """``map_net.pt`` (:func:`save_map_net` format) + ``optimizer.pt`` into ``directory``."""
    from pointseg.train.point2mask_maps import save_map_net

    save_map_net(Path(directory) / MAP_NET_FILE, net, cfg, category_ids, step)
    torch.save({"optimizer": optimizer.state_dict(), "step": int(step)}, Path(directory) / OPTIMIZER_FILE)


def map_train_loop_per_worker(config: dict) -> None:
    """Train MapNet on this worker's shard of the ``train`` dataset (see module doc)."""
    import ray.train
    import ray.train.torch

    from pointseg.data.coco_panoptic_io import as_categories
    from pointseg.generators.point2mask import Point2MaskGenerator
    from pointseg.models.map_net import MapNet
    from pointseg.train.point2mask_maps import MapTrainConfig, train_step

    cfg = MapTrainConfig.model_validate(config["map_train"])
    steps, report_every, checkpoint_every = int(config["steps"]), int(config["report_every"]), int(config["checkpoint_every"])
    categories = as_categories(config["categories"])
    category_ids = sorted(categories)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)

    net = MapNet(len(category_ids), backbone=cfg.backbone, pretrained=cfg.pretrained, width=cfg.width)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / MAP_NET_FILE, map_location="cpu", weights_only=False)
            opt = torch.load(Path(d) / OPTIMIZER_FILE, map_location="cpu", weights_only=False)
        if list(state["categories"]) != category_ids:
            raise ValueError(f"checkpoint categories {state['categories']} differ from the training categories {category_ids}")
        net.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(opt["optimizer"])
        step = start = int(state["step"])
        log.info("rank %d: resumed map-net training from checkpoint at step %d", rank, step)
    # Before pseudo_start the boundary head gets no gradient: DDP must allow unused parameters.
    model = ray.train.torch.prepare_model(net, parallel_strategy_kwargs={"find_unused_parameters": True})
    net = getattr(model, "module", model)
    # Pseudo labels from the current maps (no-grad forward of the unwrapped net, eval mode).
    generator = Point2MaskGenerator({"maps": "learned", **cfg.generator}, categories, net=net, net_categories=category_ids)
    cache = PseudoLabelCache(cfg.pseudo_every)

    collate = map_collate(categories, cfg.image_size)
    shard = ray.train.get_dataset_shard("train")
    writer, history = open_metric_logs(config.get("log_dir"), rank)

    def report(metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                save_ray_checkpoint(d, net, optimizer, cfg, category_ids, step)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)

    skipped, reasons, window = 0, Counter(), []
    epoch, t_window, images = 0, time.perf_counter(), 0
    last: dict = {"step": step, "start_step": start}
    while step < steps:
        # Seeded shuffle per epoch, like train_map_net's permuted batches.
        it = iter(shard.iter_torch_batches(batch_size=cfg.batch_size, collate_fn=collate, device="cpu",
                                           local_shuffle_buffer_size=4 * cfg.batch_size,
                                           local_shuffle_seed=cfg.seed + epoch))
        steps_before, got_any = step, False
        while step < steps:
            batch = next(it, None)
            if batch is not None:
                skipped += batch.pop("num_skipped")
                reasons.update(batch.pop("skip_reasons"))
            has_batch, has_rows = all_min([batch is not None, batch is not None and batch["image"] is not None], world)
            if not has_batch:
                break  # end of epoch (all workers together)
            got_any = True
            if not has_rows:
                continue
            if cfg.loss.use_boundary and step >= cfg.pseudo_start:
                cache.attach(batch, step, net, generator)
            terms = train_step(model, batch, optimizer, cfg.loss, cfg.max_grad_norm)
            step += 1
            images += len(batch["image_ids"])
            window.append(terms)
            final = step == steps
            if step % report_every == 0 or final:
                seconds = time.perf_counter() - t_window
                metrics = {f"loss_{k}" if k != "total" else "loss": sum(w[k] for w in window) / len(window) for k in window[-1]}
                metrics.update(step=step, start_step=start, epoch=epoch, images_per_s=images / max(seconds, 1e-9),
                               pseudo_refreshes=cache.refreshes, skipped_rows=skipped, world_size=world)
                last = metrics
                if rank == 0:
                    log_metrics(metrics, step, steps, "maps", writer, history)
                window, images, t_window = [], 0, time.perf_counter()
            if step % checkpoint_every == 0 or final:
                report(dict(last, step=step, skip_reasons=json.dumps(dict(reasons))))
        if not got_any:
            raise RuntimeError(f"rank {rank}: the map-training dataset shard yielded no batch in epoch {epoch}")
        if step == steps_before:
            raise RuntimeError(f"rank {rank}: epoch {epoch} took no step: every row was skipped ({dict(reasons)})")
        epoch += 1
    if start >= steps:
        # Resumed a finished run: nothing to train; report the restored state so the run has a result.
        report(dict(last, step=step, skip_reasons="{}"))
    if writer is not None:
        writer.close()
        history.close()
