"""Pseudo-label throughput: the plain loop against the Ray Data path with 1 and 2 actors, in one run.

    python benchmarks/pseudo_label_throughput.py [--images 256] [--size 256] [--method psps] [--repeats 3]
    python benchmarks/pseudo_label_throughput.py --images 64 --memory-scale 10     # peak memory vs dataset size

Every figure comes from the same prepared images, with repeats interleaved
(loop, 1 actor, 2 actors, loop, ...) so that a noisy neighbour hits all paths
alike; the median of the repeats is printed.

* **generator loop**: decode each image and call the generator, nothing else
  (what the labelling itself costs);
* **operator loop**: the labelling operator in this process
  (:class:`operators.pseudo_label.LabelBatch`: decode, points, generator,
  PNG encode, checksummed shard file per batch) -- the pipeline's in-process
  path, the same work as an actor does;
* **Ray Data, N actors**: steady state, from the first labelled batch to the
  last (start-up excluded), and the **fixed cost** separately: from an
  initialised Ray to the first labelled batch (actor start-up, imports, first
  batch);
* **peak memory**: the peak, over one extra run of each path (sampling
  ``/proc/*/smaps`` costs CPU, so timed runs are never sampled), of the PSS
  summed over this process and all its descendants (the local Ray cluster is
  among them), sampled every 0.1 s.

Ray Data's own per-operator stats (``ds.stats()``) of the last Ray run are
printed at the end (``--stats``). The load average is printed beside the
figures: on a shared machine the ratios mean little when it is above the CPU
count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "flows")]

from operators.pseudo_label import LabelBatch, label_with_ray  # noqa: E402
from pointseg.config import PipelineConfig, validate  # noqa: E402
from pointseg.data.images import read_image_as_annotated  # noqa: E402
from pointseg.data.prepare import join, prepare_inputs, read_index  # noqa: E402
from pointseg.data.record import Points  # noqa: E402
from pointseg.generators import build_generator, generator_fingerprint  # noqa: E402


class PeakPSS:
    """Peak of the PSS summed over this process and its descendants, sampled in a thread."""

    def __init__(self, every: float = 0.1):
        import psutil

        self.psutil, self.every, self.peak, self._stop = psutil, every, 0, threading.Event()

    def _sample(self) -> int:
        me = self.psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                pass
        return total

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.every)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def prepare(work: Path, n: int, size: int, method: str) -> tuple:
    base = {"dataset": {"synthetic": {"num_images": n, "height": size, "width": size}},
            "generator": {"method": method}, "report": {"num_overlays": 0, "baselines": []}, "resume": False}
    cfg = validate(PipelineConfig, base)
    categories, _ = prepare_inputs(cfg.dataset, cfg.points, str(work / "inputs"))
    rows = read_index(join(str(work / "inputs"), "index", "index.parquet"))
    return cfg, categories, rows


def operator_kwargs(cfg, categories, shards: str) -> dict:
    return {"method": cfg.generator.method, "params": cfg.generator.params.model_dump(mode="json"),
            "categories": categories, "shards_uri": shards,
            "fingerprint": generator_fingerprint(cfg.generator.method, cfg.generator.params), "strict": False}


def generator_loop(cfg, categories, rows) -> float:
    gen = build_generator(cfg.generator.method, cfg.generator.params, categories)
    t0 = time.perf_counter()
    for r in rows:
        image = read_image_as_annotated(r["file_name"], r["height"], r["width"])
        gen([image], [Points.from_list(json.loads(r["points"]))])
    return time.perf_counter() - t0


def operator_loop(cfg, categories, rows, shards: str, batch_size: int) -> float:
    import numpy as np

    op = LabelBatch(**operator_kwargs(cfg, categories, shards))
    t0 = time.perf_counter()
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        op({k: np.asarray([r[k] for r in chunk], dtype=object) for k in chunk[0]})
    return time.perf_counter() - t0


def ray_run(cfg, categories, rows, shards: str, actors: int, batch_size: int, stats: list | None = None) -> dict:
    """``{"fixed": s to the first batch, "steady": s from the first batch to the last, "after_first": rows}``."""
    rd = cfg.ray_data.model_copy(update={"num_actors": actors, "batch_size": batch_size})
    t0 = time.perf_counter()
    first = None
    seen = 0
    for _ in label_with_ray(rows, operator_kwargs(cfg, categories, shards), rd, stats=stats):
        seen += 1
        if first is None:
            first = time.perf_counter()
            first_count = seen
    end = time.perf_counter()
    return {"fixed": first - t0, "steady": end - first, "after_first": len(rows) - first_count}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--method", default="psps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--memory-scale", type=int, default=0, help="also run with this many times the images: peak PSS ratio")
    ap.add_argument("--stats", action="store_true", help="print ds.stats() of the last Ray run")
    args = ap.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="pointseg-bench-"))
    cfg, categories, rows = prepare(work, args.images, args.size, args.method)
    generator_loop(cfg, categories, rows[:2])  # warm-up (numba cache, imports)
    os.environ["PYTHONPATH"] = f"{ROOT}:{ROOT / 'flows'}"  # as flows/common.py: the local cluster inherits it
    ray.init(num_cpus=2, _temp_dir=str(Path(tempfile.gettempdir()) / "pointseg-bench-ray"))
    ray.data.DataContext.get_current().enable_progress_bars = False
    times: dict[str, list[float]] = {}
    fixed: dict[str, list[float]] = {}
    peaks: dict[str, int] = {}
    stats: list = []
    # Timed runs are never sampled: reading /proc/*/smaps of every Ray process ten times a second costs
    # a good part of a core and the driver's GIL, which a 2-core box cannot spare while 2 actors run.
    for rep in range(args.repeats):
        times.setdefault("generator loop", []).append(args.images / generator_loop(cfg, categories, rows))
        times.setdefault("operator loop", []).append(
            args.images / operator_loop(cfg, categories, rows, str(work / f"loop{rep}"), args.batch_size))
        for n in args.actors:
            name = f"ray data, {n} actor{'s' if n > 1 else ''}"
            r = ray_run(cfg, categories, rows, str(work / f"ray{n}_{rep}"), n, args.batch_size,
                        stats if rep == args.repeats - 1 else None)
            times.setdefault(name, []).append(r["after_first"] / r["steady"])
            fixed.setdefault(name, []).append(r["fixed"])
    # Peak memory: one more run of each path, sampled (not timed).
    with PeakPSS() as mem:
        operator_loop(cfg, categories, rows, str(work / "loop_mem"), args.batch_size)
    peaks["operator loop"] = mem.peak
    for n in args.actors:
        name = f"ray data, {n} actor{'s' if n > 1 else ''}"
        with PeakPSS() as mem:
            ray_run(cfg, categories, rows, str(work / f"ray{n}_mem"), n, args.batch_size)
        peaks[name] = mem.peak
    load = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{args.method} on {args.images} synthetic images of {args.size}x{args.size}, batch {args.batch_size}, "
          f"2 CPUs, median of {args.repeats} interleaved repeats; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'path':<22} {'img/s':>7} {'vs gen loop':>11} {'vs op loop':>10} {'fixed s':>8} {'peak PSS':>9}")
    for name, v in med.items():
        f = f"{statistics.median(fixed[name]):8.2f}" if name in fixed else " " * 8
        p = f"{peaks[name] / 2**20:7.0f}MB" if name in peaks else " " * 9
        print(f"{name:<22} {v:7.1f} {v / med['generator loop']:10.2f}x {v / med['operator loop']:9.2f}x {f} {p}")
    if len(args.actors) > 1 and 1 in args.actors:
        two = med.get("ray data, 2 actors")
        print(f"2 actors / 1 actor: {two / med['ray data, 1 actor']:.2f}x")
    if args.memory_scale > 1:
        big_work = Path(tempfile.mkdtemp(prefix="pointseg-bench-big-"))
        cfg_b, cats_b, rows_b = prepare(big_work, args.images * args.memory_scale, args.size, args.method)
        for name, fn in (("operator loop", lambda s: operator_loop(cfg_b, cats_b, rows_b, s, args.batch_size)),
                         ("ray data, 1 actor", lambda s: ray_run(cfg_b, cats_b, rows_b, s, 1, args.batch_size))):
            with PeakPSS() as mem:
                fn(str(big_work / name.replace(" ", "_")))
            print(f"peak PSS, {name}: {peaks[name] / 2**20:.0f} MB at {args.images} images, {mem.peak / 2**20:.0f} MB "
                  f"at {args.images * args.memory_scale} ({mem.peak / peaks[name] - 1:+.1%})")
        shutil.rmtree(big_work, ignore_errors=True)
    if args.stats and stats:
        print("\nRay Data stats of the last run:\n" + stats[-1])
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
