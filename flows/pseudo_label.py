"""Pseudo-label stage: stream images and points through a generator actor pool.

    read_parquet(index) -> decode -> attach points -> GenerateLabels (actors) -> encode -> write_parquet
    then: shards -> COCO panoptic export

Run alone: ``python flows/pseudo_label.py --config configs/full_pipeline.yaml --output DIR``
(prepares the inputs from the config's dataset first).
"""

from __future__ import annotations

import json
import logging

from common import StageTimer, init_ray, pipeline_args  # also puts the repo on sys.path
from tqdm import tqdm

from operators.pseudo_label import GenerateLabels, attach_points, decode_images, encode_labels
from pointseg.config import PipelineConfig
from pointseg.data.coco_panoptic_io import PanopticWriter
from pointseg.data.panoptic_format import decode_png
from pointseg.data.prepare import clear_dir, iter_shard_rows, join, prepare_inputs, read_index, write_index
from pointseg.data.record import Category
from pointseg.generators import generator_fingerprint

log = logging.getLogger("pointseg.flows.pseudo_label")


def done_image_ids(shards: str, fingerprint: str | None = None) -> set[int]:
    """Images already labelled without error by an earlier run (resume).

    With ``fingerprint``, only rows made by that exact generator config (and weights) count.
    """
    rows = iter_shard_rows(shards, ["image_id", "error", "config_hash"])
    return {r["image_id"] for r in rows if not r["error"] and fingerprint in (None, r["config_hash"])}


def run_pseudo_labels(cfg: PipelineConfig, categories: dict[int, Category], output: str) -> dict:
    """Label every image of ``output/index`` not yet in ``output/shards``; returns counts."""
    import ray

    shards = join(output, "shards")
    rows = read_index(join(output, "index", "index.parquet"))
    rd = cfg.ray_data
    fingerprint = generator_fingerprint(cfg.generator.method, cfg.generator.params)
    done = done_image_ids(shards, fingerprint) if cfg.resume else set()
    todo = [r for r in rows if r["image_id"] not in done]
    log.info("%d images, %d already labelled, %d to label", len(rows), len(rows) - len(todo), len(todo))
    if not todo:
        return {"labelled_now": 0, "skipped_done": len(done)}
    # Several small index files, so the read yields enough blocks to keep every actor busy.
    todo_uri = join(output, "index", "todo")
    clear_dir(todo_uri)
    per_file = max(rd.batch_size, -(-len(todo) // (4 * rd.num_actors)))
    for i in range(0, len(todo), per_file):
        write_index(join(todo_uri, f"part-{i // per_file:05d}.parquet"), todo[i : i + per_file])

    ctx = ray.data.DataContext.get_current()
    ctx.execution_no_progress_timeout_s = rd.no_progress_timeout_s  # a hang becomes an error
    ctx.wait_for_min_actors_s = int(rd.wait_for_min_actors_s)
    task = {"num_cpus": rd.num_cpus_per_task, "batch_format": "numpy"}
    ds = ray.data.read_parquet(todo_uri)
    ds = ds.map_batches(decode_images, batch_size=rd.batch_size, fn_kwargs={"strict": cfg.strict}, **task)
    ds = ds.map_batches(
        attach_points, batch_size=rd.batch_size, fn_kwargs={"categories": categories, "strict": cfg.strict}, **task
    )
    ds = ds.map_batches(
        GenerateLabels,
        fn_constructor_kwargs={
            "method": cfg.generator.method,
            "params": cfg.generator.params,
            "categories": categories,
            "strict": cfg.strict,
        },
        compute=ray.data.ActorPoolStrategy(size=rd.num_actors),
        num_cpus=rd.num_cpus_per_actor,
        num_gpus=rd.num_gpus_per_actor,
        batch_size=rd.batch_size,
        batch_format="numpy",
    )
    ds = ds.map_batches(encode_labels, batch_size=rd.batch_size, **task)
    ds = ds.drop_columns(["points"])
    ds.write_parquet(shards, min_rows_per_file=256)
    return {"labelled_now": len(todo), "skipped_done": len(done)}


def export_panoptic(output: str, categories: dict[int, Category], fingerprint: str | None = None) -> dict:
    """Write the shards as COCO panoptic (``output/panoptic.json`` + ``output/panoptic/``).

    One row per image: with ``fingerprint``, only rows made by that generator
    config count (shards of earlier configs stay on disk but are not exported);
    images without a successful row are listed in ``errors`` with their reason.
    """
    shards = join(output, "shards")
    ok = done_image_ids(shards, fingerprint)
    writer = PanopticWriter(output, categories)
    written: set[int] = set()
    errors: dict[int, str] = {}
    rows = iter_shard_rows(shards, ["image_id", "file_name", "label_png", "segments_info", "error", "config_hash"])
    for r in tqdm(rows, desc="export COCO panoptic", unit="img"):
        image_id = r["image_id"]
        if fingerprint is not None and r["config_hash"] != fingerprint:
            continue
        if r["error"]:
            if image_id not in ok:
                errors[image_id] = r["error"]
            continue
        if image_id in written:
            continue
        written.add(image_id)
        writer.add(image_id, r["file_name"].rsplit("/", 1)[-1], decode_png(r["label_png"]), json.loads(r["segments_info"]))
    writer.close()
    return {"images": len(written), "errors": errors}


def main() -> None:
    cfg, output = pipeline_args(__doc__, "configs/full_pipeline.yaml")
    timer = StageTimer()
    with timer.stage("prepare"):
        categories, prep = prepare_inputs(cfg.dataset, cfg.points, output, cfg.strict)
    init_ray(cfg.ray)
    with timer.stage("pseudo_label"):
        counts = run_pseudo_labels(cfg, categories, output)
    with timer.stage("export"):
        exported = export_panoptic(output, categories, generator_fingerprint(cfg.generator.method, cfg.generator.params))
    print(json.dumps({"prepare": prep.to_dict(), **counts, "export": exported, "seconds": timer.seconds}, indent=2))


if __name__ == "__main__":
    main()
