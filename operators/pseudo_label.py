"""The labelling stage: index rows -> generator actors -> one shard file per batch -> COCO panoptic.

    index rows (in memory, split into one block per batch)
      -> map_batches(LabelBatch, ActorPoolStrategy)      # per batch: decode, points, generator(batch), encode,
                                                          # write shards/part-<fingerprint>-<batch>.parquet
      -> driver: the per-image summaries (progress, counts)
    then: export_panoptic (shards -> OUTPUT/panoptic.json + panoptic/<image id>.png)

Everything per row happens inside the actor, next to the generator, so no
decoded image crosses the object store, and each batch is on disk as soon as
it is labelled (an interrupted run keeps it; a retried batch rewrites its own
file). Every row carries an ``error`` string: a stage that fails on one image
records the reason and goes on; ``strict=True`` raises instead. Below
``ray_data.min_images_for_ray`` images the same :class:`LabelBatch` runs in this
process (no Ray start-up), writing identical shards.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pointseg.cpu_memory import keep_freed_memory
from pointseg.data.coco_panoptic_io import PanopticWriter
from pointseg.data.images import read_image_as_annotated
from pointseg.data.panoptic_format import decode_png, encode_png
from pointseg.data.points import validate_points
from pointseg.data.prepare import join, read_index
from pointseg.data.record import Category, Points
from pointseg.data.shards import encode_uncertainty, iter_verified_rows, scan_shards, write_shard
from pointseg.generators import build_generator

from operators.actor_pool import actor_batches, set_timeouts

log = logging.getLogger("pointseg.operators")


def _reason(stage: str, exc: BaseException) -> str:
    return f"{stage}: {type(exc).__name__}: {exc}"


class LabelBatch:
    """Label one batch of index rows and write it as one shard file (module docstring).

    Built once per actor (the generator, and its network, load once); called
    with a numpy batch of index columns; returns the small per-image summary
    ``image_id, error, seconds``.
    """

    def __init__(self, method: str, params: dict, categories: dict[int, Category], shards_uri: str, fingerprint: str,
                 strict: bool = False, keep_freed_memory_mib: int = 0):
        keep_freed_memory(keep_freed_memory_mib)  # process-wide, set once per actor (ray_data.keep_freed_memory_mib)
        self.generator = build_generator(method, params, categories)
        self.method, self.categories, self.strict = method, categories, strict
        self.shards_uri, self.fingerprint = shards_uri, fingerprint

    def _fail(self, row: dict, stage: str, exc: BaseException) -> None:
        reason = _reason(stage, exc)
        if self.strict:
            raise RuntimeError(f"image {row['image_id']}: {reason}") from exc
        log.warning("image %s skipped: %s", row["image_id"], reason)
        row["error"] = reason

    def prepare(self, batch: dict) -> tuple[list[dict], list[np.ndarray | None], list[Points | None]]:
        """Shard rows (error filled for bad images), decoded images and valid points per row."""
        n = len(batch["image_id"])
        rows, images, points = [], [], []
        for i in range(n):
            row = {"image_id": int(batch["image_id"][i]), "file_name": str(batch["file_name"][i]),
                   "height": int(batch["height"][i]), "width": int(batch["width"][i]), "method": self.method,
                   "config_hash": self.fingerprint, "label_png": b"", "segments_info": "[]", "diagnostics": "{}",
                   "warnings": "[]", "uncertainty_png": b"", "seconds": 0.0,
                   "error": str(batch["error"][i]) if "error" in batch else ""}
            image = pts = None
            if not row["error"]:
                try:
                    image = read_image_as_annotated(row["file_name"], row["height"], row["width"])
                    row["height"], row["width"] = image.shape[:2]
                except Exception as exc:  # noqa: BLE001 - recorded per image
                    self._fail(row, "decode", exc)
            if not row["error"]:
                try:
                    pts, problems = validate_points(Points.from_list(json.loads(batch["points"][i])),
                                                    row["height"], row["width"], self.categories)
                    if problems:
                        if self.strict:
                            raise ValueError("; ".join(problems))
                        for p in problems:
                            log.warning("image %s: %s", row["image_id"], p)
                    row["warnings"] = json.dumps(problems)
                    if len(pts) == 0:
                        raise ValueError("image has no valid points")
                except Exception as exc:  # noqa: BLE001
                    self._fail(row, "points", exc)
                    pts = None
            rows.append(row)
            images.append(image if not row["error"] else None)
            points.append(pts if not row["error"] else None)
        return rows, images, points

    def label(self, rows: list[dict], images: list, points: list) -> None:
        """Run the generator on the batch's good images at once; on failure, one at a time
        (so one bad image gets the error, not the batch)."""
        todo = [i for i, r in enumerate(rows) if not r["error"]]
        if not todo:
            return
        t0 = time.perf_counter()
        try:
            labels = self.generator([images[i] for i in todo], [points[i] for i in todo])
            per_image = (time.perf_counter() - t0) / len(todo)
            results = [(i, lab, per_image, None) for i, lab in zip(todo, labels)]
        except Exception:  # noqa: BLE001 - isolate the failing image
            results = []
            for i in todo:
                t1 = time.perf_counter()
                try:
                    results.append((i, self.generator([images[i]], [points[i]])[0], time.perf_counter() - t1, None))
                except Exception as exc:  # noqa: BLE001
                    results.append((i, None, time.perf_counter() - t1, exc))
        for i, lab, seconds, exc in results:
            row = rows[i]
            row["seconds"] = float(seconds)
            if exc is not None:
                self._fail(row, f"generate[{self.method}]", exc)
                continue
            try:
                row["label_png"] = encode_png(lab.id_map.astype(np.int32))
                row["segments_info"] = json.dumps(lab.segments_info)
                row["diagnostics"] = json.dumps(lab.diagnostics, default=float)
                row["uncertainty_png"] = encode_uncertainty(lab.uncertainty)
            except Exception as exc:  # noqa: BLE001
                self._fail(row, "encode", exc)

    def __call__(self, batch: dict) -> dict:
        rows, images, points = self.prepare(batch)
        self.label(rows, images, points)
        for r in rows:
            if r["error"]:
                r["label_png"], r["segments_info"], r["uncertainty_png"] = b"", "[]", b""
        write_shard(self.shards_uri, rows, self.fingerprint)
        return {"image_id": np.array([r["image_id"] for r in rows], np.int64),
                "error": np.array([r["error"] for r in rows], dtype=object),
                "seconds": np.array([r["seconds"] for r in rows], np.float64)}


def _blocks(todo: list[dict], batch_size: int) -> list[pa.Table]:
    """One Arrow table per batch: every actor gets work, and a retried block redoes one batch."""
    return [pa.Table.from_pylist(todo[i : i + batch_size]) for i in range(0, len(todo), batch_size)]


def run_pseudo_labels(cfg, categories: dict[int, Category], output: str, fingerprint: str,
                      use_ray: bool | None = None, ensure_ray=None) -> dict:
    """Label every image of ``OUTPUT/index`` without a verified shard row of ``fingerprint``.

    ``use_ray``: None decides by size (``ray_data.min_images_for_ray``); the
    Ray path is always available with ``ray_data.min_images_for_ray=0``.
    ``ensure_ray()`` is called before the Ray path starts (the flow's Ray
    start-up, so an in-process run never pays for it).
    Returns counts: ``labelled_now``, ``skipped_done``, ``failed_now``,
    ``corrupt_rows`` (image id -> file, relabelled), ``quarantined`` (file ->
    reason), ``path`` (``ray`` / ``in_process``), ``seconds``.
    """
    rd = cfg.ray_data
    shards = join(output, "shards")
    rows = read_index(join(output, "index", "index.parquet"))
    scan = scan_shards(shards, fingerprint) if cfg.resume else None
    done = scan.done if scan is not None else set()
    todo = [r for r in rows if r["image_id"] not in done]
    log.info("%d images, %d already labelled, %d to label", len(rows), len(rows) - len(todo), len(todo))
    counts = {"labelled_now": 0, "failed_now": 0, "skipped_done": len(rows) - len(todo),
              "corrupt_rows": dict(scan.corrupt_rows) if scan else {}, "quarantined": dict(scan.quarantined) if scan else {},
              "path": None, "seconds": 0.0}
    if not todo:
        return counts
    use_ray = len(todo) >= rd.min_images_for_ray if use_ray is None else use_ray
    kwargs = {"method": cfg.generator.method, "params": cfg.generator.params.model_dump(mode="json"),
              "categories": categories, "shards_uri": shards, "fingerprint": fingerprint, "strict": cfg.strict,
              "keep_freed_memory_mib": cfg.ray_data.keep_freed_memory_mib}
    t0 = time.perf_counter()
    if use_ray and ensure_ray is not None:
        ensure_ray()
    summaries = label_with_ray(todo, kwargs, rd) if use_ray else label_in_process(todo, kwargs, rd.batch_size)
    failed = 0
    for s in summaries:
        failed += int(bool(s["error"]))
    counts.update(labelled_now=len(todo) - failed, failed_now=failed, path="ray" if use_ray else "in_process",
                  seconds=round(time.perf_counter() - t0, 3))
    return counts


def label_in_process(todo: list[dict], kwargs: dict, batch_size: int):
    """Label ``todo`` index rows with one :class:`LabelBatch` in this process; yields per-image summaries."""
    labeler = LabelBatch(**kwargs)
    with tqdm(total=len(todo), desc="pseudo labels", unit="img") as bar:
        for table in _blocks(todo, batch_size):
            out = labeler({k: np.asarray(v, dtype=object) for k, v in table.to_pydict().items()})
            bar.update(len(out["image_id"]))
            yield from ({"image_id": i, "error": e} for i, e in zip(out["image_id"], out["error"]))


def label_with_ray(todo: list[dict], kwargs: dict, rd, stats: list | None = None):
    """Label ``todo`` index rows with a :class:`LabelBatch` actor pool (``rd``: the ``ray_data`` config);
    yields per-image summaries as batches finish. ``stats``: ``ds.stats()`` is appended at the end."""
    import ray

    set_timeouts(rd)
    if rd.num_gpus_per_actor > 0:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < rd.num_gpus_per_actor:
            raise RuntimeError(f"ray_data.num_gpus_per_actor={rd.num_gpus_per_actor:g} but the cluster has {gpus:g} GPU(s): "
                               "the actors would wait forever; set it to 0 on CPU nodes")
    ds = ray.data.from_arrow(_blocks(todo, rd.batch_size))
    ds = ds.map_batches(
        LabelBatch,
        fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(size=rd.num_actors),
        num_cpus=rd.num_cpus_per_actor,
        num_gpus=rd.num_gpus_per_actor,
        batch_size=rd.batch_size,
        batch_format="numpy",
    )
    with tqdm(total=len(todo), desc="pseudo labels (ray)", unit="img") as bar:
        for batch in actor_batches(ds, rd, "pseudo labels"):
            bar.update(len(batch["image_id"]))
            yield from ({"image_id": i, "error": e} for i, e in zip(batch["image_id"], batch["error"]))
    if stats is not None:
        stats.append(ds.stats())


def export_panoptic(output: str, categories: dict[int, Category], fingerprint: str | None = None) -> dict:
    """Write the shards as COCO panoptic (``OUTPUT/panoptic.json`` + ``OUTPUT/panoptic/``).

    One row per image: the verified error-free row of ``fingerprint`` (rows of
    other configs stay on disk but are not exported); images without one are
    listed in ``errors`` with their reason.
    """
    shards = join(output, "shards")
    writer = PanopticWriter(output, categories)
    written: set[int] = set()
    errors: dict[int, str] = {}
    columns = ["image_id", "file_name", "label_png", "segments_info", "error", "config_hash"]
    for r in tqdm(iter_verified_rows(shards, columns), desc="export COCO panoptic", unit="img"):
        image_id = int(r["image_id"])
        if fingerprint is not None and r["config_hash"] != fingerprint:
            continue
        if r["error"]:
            errors.setdefault(image_id, r["error"])
            continue
        if image_id in written:
            continue
        try:
            writer.add(image_id, r["file_name"], decode_png(r["label_png"]), json.loads(r["segments_info"]))
        except Exception as exc:  # noqa: BLE001 - one bad row never sinks the export
            errors[image_id] = _reason("export", exc)
            continue
        written.add(image_id)
    writer.close()
    for image_id in written:
        errors.pop(image_id, None)
    return {"images": len(written), "errors": errors}


__all__ = ["LabelBatch", "export_panoptic", "label_in_process", "label_with_ray", "run_pseudo_labels"]
