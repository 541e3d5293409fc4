"""Speed of pointseg.geodesic against scipy.sparse.csgraph.dijkstra.

Prints, for 128x128 and 256x256 grids with 20 sources, on LAB colour costs of a
real COCO image (when ../shared/data is present) and on random directed costs:

* scipy: ``dijkstra(graph, directed=True, indices=sources)`` on the CSR graph of
  the same ``(8, H, W)`` costs; the graph construction is timed separately;
* ours: ``geodesic_distance`` serial and ``parallel=True`` (numba threads);
* ``nearest_source``: one multi-source run giving the PSPS assignment;
* ``nearest_two_sources``: the nearest and second-nearest label (the PSPS
  uncertainty), against ``nearest_source`` (10 labels, 2 sources each);

and the first-call (JIT compile) times, measured in fresh subprocesses: once with
an empty numba cache (a fresh install) and once with the cache filled.

Times are the minimum and the median of ``--repeat`` interleaved runs in one
process; ratios are scipy / ours from the same run. Run:

    python benchmarks/geodesic.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing

from pointseg.geodesic import edge_costs, geodesic_distance, nearest_source, nearest_two_sources, to_csgraph  # noqa: E402

COCO_IMAGES = ROOT.parent / "shared" / "data" / "coco-mini" / "train2017"
N_SOURCES = 20

FIRST_CALL = """
import time, numpy as np
t0 = time.perf_counter()
from pointseg.geodesic import geodesic_distance, nearest_source
t1 = time.perf_counter()
cost = np.random.default_rng(0).random((8, 64, 64)); src = [[3, 4], [40, 50]]
t = time.perf_counter(); geodesic_distance(cost, src); t2 = time.perf_counter() - t
t = time.perf_counter(); nearest_source(cost, src); t3 = time.perf_counter() - t
t = time.perf_counter(); geodesic_distance(cost, src, parallel=True); t4 = time.perf_counter() - t
print(f"{t1 - t0:.2f} {t2:.2f} {t3:.2f} {t4:.2f}")
"""


def first_call_seconds(cache_dir: str) -> list[float]:
    """import, geodesic_distance, nearest_source, parallel first-call seconds in a fresh process."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True, check=True)
    return [float(v) for v in out.stdout.split()]


def lab_costs(size: int) -> tuple[np.ndarray, str]:
    """LAB colour edge costs of the first COCO image resized to size x size."""
    import cv2

    path = sorted(COCO_IMAGES.glob("*.jpg"))[0]
    bgr = cv2.resize(cv2.imread(str(path)), (size, size), interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB).astype(np.float64).transpose(2, 0, 1)
    return edge_costs(lab), f"LAB |dLab| of {path.name}"


def timed(fn, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def bench(cost: np.ndarray, name: str, repeat: int) -> None:
    from scipy.sparse.csgraph import dijkstra

    _, h, w = cost.shape
    rng = np.random.default_rng(0)
    sources = np.stack([rng.integers(0, h, N_SOURCES), rng.integers(0, w, N_SOURCES)], axis=1)
    flat = sources[:, 0] * w + sources[:, 1]
    labels = np.arange(N_SOURCES) // 2
    build = timed(lambda: to_csgraph(cost), repeat)
    graph = to_csgraph(cost)

    runs = {
        "scipy dijkstra": lambda: dijkstra(graph, directed=True, indices=flat),
        "ours serial": lambda: geodesic_distance(cost, sources),
        "ours parallel": lambda: geodesic_distance(cost, sources, parallel=True),
        "nearest_source": lambda: nearest_source(cost, sources),
        "nearest_source, 10 labels": lambda: nearest_source(cost, sources, labels),
        "nearest_two_sources, 10 labels": lambda: nearest_two_sources(cost, sources, labels),
    }
    ref = runs["scipy dijkstra"]()
    assert np.allclose(geodesic_distance(cost, sources).reshape(len(flat), -1), ref, atol=1e-5)
    for fn in runs.values():  # warm up (JIT already compiled; page in the scratch memory)
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeat):  # interleaved, so load changes hit all methods alike
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    best = {k: min(v) * 1e3 for k, v in times.items()}
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    s = "scipy dijkstra"
    print(f"\n{h}x{w} grid, {N_SOURCES} sources, costs: {name}")
    print(f"  scipy CSR graph construction (not in scipy time): {build[0] * 1e3:7.2f} ms")
    print(f"  {'':28s} {'min ms':>8s} {'median ms':>10s} {'scipy/ours (min)':>17s} {'(median)':>9s}")
    for k in runs:
        ratio = "" if k == s else f"{best[s] / best[k]:17.2f} {med[s] / med[k]:9.2f}"
        print(f"  {k:28s} {best[k]:8.2f} {med[k]:10.2f} {ratio}")
    print(
        f"  nearest_source vs {N_SOURCES} single-source runs (ours serial): "
        f"{best['ours serial'] / best['nearest_source']:.1f}x faster"
    )
    two, one = "nearest_two_sources, 10 labels", "nearest_source, 10 labels"
    print(f"  nearest_two_sources / nearest_source: {best[two] / best[one]:.2f}x (min), "
          f"{med[two] / med[one]:.2f}x (median)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    import numba

    print(f"numba {numba.__version__}, {numba.config.NUMBA_NUM_THREADS} numba threads, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as cache:
        cold = first_call_seconds(cache)
        warm = first_call_seconds(cache)
    labels = "import / geodesic_distance / nearest_source / parallel geodesic_distance"
    print(f"first call, empty numba cache (compile), s: {labels}: {cold}")
    print(f"first call, filled numba cache (load),   s: {labels}: {warm}")

    for size in (128, 256):
        cases = []
        if COCO_IMAGES.is_dir():
            cases.append(lab_costs(size))
        else:
            print(f"(no real image: {COCO_IMAGES} missing)")
        cases.append((np.random.default_rng(1).random((8, size, size)), "uniform random directed [0, 1)"))
        for cost, name in cases:
            bench(cost, name, args.repeat)


if __name__ == "__main__":
    main()
