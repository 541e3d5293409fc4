"""Pseudo-label throughput: a plain loop against the Ray Data flow with 1 and 2 actors.

    python benchmarks/pseudo_label_throughput.py [--images 64] [--size 256] [--method psps]

All figures come from one run on the same prepared images: the plain loop
decodes each image from disk and calls the same generator the actors build.
Ray timings exclude ``ray.init`` but include actor start-up and Parquet writing,
as a user pays them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "flows")]

from pointseg.config import PipelineConfig, validate  # noqa: E402
from pointseg.data.images import read_image  # noqa: E402
from pointseg.data.prepare import join, prepare_inputs, read_index  # noqa: E402
from pointseg.data.record import Points  # noqa: E402
from pointseg.generators import build_generator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--method", default="psps")
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pointseg-bench-"))
    base = {
        "dataset": {"synthetic": {"num_images": args.images, "height": args.size, "width": args.size}},
        "generator": {"method": args.method},
        "report": {"num_overlays": 0, "baselines": []},
        "resume": False,
    }
    cfg = validate(PipelineConfig, base)
    categories, _ = prepare_inputs(cfg.dataset, cfg.points, str(work / "inputs"))
    rows = read_index(join(str(work / "inputs"), "index", "index.parquet"))

    gen = build_generator(args.method, cfg.generator.params, categories)
    gen.generate(read_image(rows[0]["file_name"]), Points.from_list(json.loads(rows[0]["points"])))  # warm-up (JIT)
    t0 = time.perf_counter()
    for r in rows:
        gen.generate(read_image(r["file_name"]), Points.from_list(json.loads(r["points"])))
    loop_s = time.perf_counter() - t0
    results = {"plain loop": loop_s}

    import ray
    from pseudo_label import run_pseudo_labels

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'flows'}"}})
    for n in args.actors:
        out = work / f"ray{n}"
        shutil.copytree(work / "inputs", out)
        run_cfg = validate(PipelineConfig, {**base, "ray_data": {"num_actors": n, "num_cpus_per_actor": 0.5, "batch_size": 4}})
        t0 = time.perf_counter()
        run_pseudo_labels(run_cfg, categories, str(out))
        results[f"ray data, {n} actor{'s' if n > 1 else ''}"] = time.perf_counter() - t0
    ray.shutdown()

    print(f"\n{args.method} on {args.images} synthetic images of {args.size}x{args.size}, 2 CPUs")
    print(f"{'path':<22} {'seconds':>8} {'img/s':>7} {'vs loop':>8}")
    for name, s in results.items():
        print(f"{name:<22} {s:8.2f} {args.images / s:7.1f} {loop_s / s:8.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
