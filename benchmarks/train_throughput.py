"""Stage-2 training throughput: the engine in a plain process vs Ray Train with 1 and 2 workers.

    python benchmarks/train_throughput.py [--steps 40] [--size 128] [--model mask2former]

Same trainable (a ``STAGE2_MODELS`` row, CPU-sized, random init), same batch
size per worker, same collate (decode + augment) on the same shard rows
(synthetic scenes, labels = ground truth), same engine loop
(:func:`pointseg.train.engine.fit`): once through ``fit_plain``, once inside
Ray Train workers. Every process uses 1 torch thread (Ray Train workers get
OMP_NUM_THREADS=1). Images/s are the engine's own per-window figures,
excluding the first window (``--warmup`` steps). Ray Train overhead =
1 - (Ray 1 worker) / (plain loop).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "flows")]


def make_shards(output: Path, n_images: int, size: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pointseg.config import DatasetConfig, PointsConfig
    from pointseg.data.coco_panoptic_io import read_id_map, read_panoptic_annotations
    from pointseg.data.panoptic_format import encode_png
    from pointseg.data.prepare import join, prepare_inputs, read_index

    ds = DatasetConfig(kind="synthetic", synthetic={"num_images": n_images, "height": size, "width": size, "seed": 0})
    categories, _ = prepare_inputs(ds, PointsConfig(), str(output))
    _, _, gt = read_panoptic_annotations(join(str(output), "gt", "panoptic.json"))
    rows = []
    for r in read_index(join(str(output), "index", "index.parquet")):
        ann = gt[r["image_id"]]
        rows.append({"image_id": r["image_id"], "file_name": r["file_name"], "height": r["height"], "width": r["width"],
                     "label_png": encode_png(read_id_map(join(str(output), "gt", "panoptic"), ann["file_name"])),
                     "segments_info": json.dumps(ann["segments_info"]), "error": ""})
    (output / "shards").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), output / "shards" / "part-0.parquet")
    return categories, rows


def steady_rate(history: list[dict], warmup: int) -> float:
    steady = [h for h in history if h["step"] > warmup]  # the first window is the warm-up
    return sum(h["images_per_s"] for h in steady) / len(steady)


def plain_loop(cfg, categories, rows, output: Path) -> float:
    """Images/s of the engine in this process, 1 thread."""
    import torch

    from pointseg.train.engine import fit_plain
    from pointseg.train.stage2 import STAGE2_MODELS

    torch.set_num_threads(1)
    log_dir = output / "plain_logs"
    fit_plain(STAGE2_MODELS[cfg.train.model](cfg.train, categories), rows, str(output / "plain_ckpt"), resume=False,
              log_dir=str(log_dir))
    history = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return steady_rate(history, cfg.train.report_every)


def ray_train(cfg, categories, output: Path, workers: int, run: str) -> float:
    from operators.training import train_stage2

    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": workers, "run_name": run})})
    res = train_stage2(cfg, categories, str(output))
    return steady_rate(res["history"], cfg.train.report_every)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mask2former", help="a STAGE2_MODELS name")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--images", type=int, default=16)
    args = ap.parse_args()

    import ray

    from pointseg.config import PipelineConfig, validate

    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp)
        categories, rows = make_shards(output, args.images, args.size)
        model = {"image_size": args.size, "pretrained": False}
        cfg = validate(PipelineConfig, {"output": str(output), "train": {
            "enabled": True, "model": args.model, "params": model, "steps": args.steps, "batch_size": args.batch_size,
            "report_every": args.warmup, "checkpoint_every": args.steps, "val_every": args.images,
            "cpus_per_worker": 0.5, "storage_path": str(output / "train")}})
        held_out = min(x["image_id"] for x in rows)  # val_every = images: the first id is held out
        plain = plain_loop(cfg, categories, [r for r in rows if r["image_id"] != held_out], output)
        print(json.dumps({"plain_images_per_s": round(plain, 3)}), flush=True)
        ray.init(num_cpus=2, _temp_dir=str(output / "ray"), runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'flows'}"}})
        one = ray_train(cfg, categories, output, 1, "w1")
        two = ray_train(cfg, categories, output, 2, "w2")
        ray.shutdown()
    result = {
        "model": args.model, "size": args.size, "batch_size_per_worker": args.batch_size, "steps": args.steps,
        "plain_images_per_s": round(plain, 3), "ray_1_worker_images_per_s": round(one, 3),
        "ray_2_workers_images_per_s": round(two, 3), "speedup_2_vs_1": round(two / one, 3),
        "ray_overhead_vs_plain": round(1 - one / plain, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
