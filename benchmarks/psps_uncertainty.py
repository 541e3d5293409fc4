"""What the uncertainty map costs PSPS: per-image time with ``uncertainty: false`` (the labels only) and ``true``.

The same images and clicks, PSPS default parameters, ``--repeat`` interleaved
passes in one process (the box is shared; the minimum over passes is the
figure, the median beside it). Synthetic 128x128 scenes, and the coco-mini
images (P1 clicks) when ``--data`` holds ``coco-mini/``.

    python benchmarks/psps_uncertainty.py [--images 24] [--repeat 5] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing

from pointseg.data.points import sample_points  # noqa: E402
from pointseg.generators import build_generator  # noqa: E402


def synthetic(n: int):
    from pointseg.data.synthetic import SyntheticDataset, synthetic_categories

    return synthetic_categories(), [(r.image, sample_points(r, "p1", 0)) for r in SyntheticDataset(n, 128, 128, 0)]


def coco(data: Path, n: int):
    from pointseg.data.coco import instances_to_panoptic, read_coco_instances

    root = data / "coco-mini"
    cats, stream = read_coco_instances(str(root / "annotations" / "instances_train2017.json"), str(root / "train2017"),
                                       load_images=True, max_images=n)
    pairs = []
    for r in stream:
        r = instances_to_panoptic(r)[0]
        pts = sample_points(r, "p1", 0)
        if len(pts):
            pairs.append((r.image, pts))
    return cats, pairs


def bench(name: str, cats, pairs, repeat: int) -> None:
    gens = {flag: build_generator("psps", {"uncertainty": flag}, cats) for flag in (False, True)}
    for g in gens.values():  # compile / warm up
        g.generate(*pairs[0])
    per_pass = {flag: [] for flag in gens}
    for _ in range(repeat):
        for flag, g in gens.items():
            t = time.perf_counter()
            for image, pts in pairs:
                g.generate(image, pts)
            per_pass[flag].append((time.perf_counter() - t) / len(pairs) * 1e3)
    off, on = (min(per_pass[f]) for f in (False, True))
    moff, mon = (statistics.median(per_pass[f]) for f in (False, True))
    size = "x".join(str(v) for v in pairs[0][0].shape[:2])
    print(f"{name:10s} {len(pairs):3d} images (first {size}) | labels only {off:7.2f} ms (median {moff:7.2f}) | "
          f"+ uncertainty {on:7.2f} ms (median {mon:7.2f}) | x{on / off:.2f} (median x{mon / moff:.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    np.random.seed(0)
    print("PSPS per-image time (default params: downscale 0.5, beta 0.1), min over interleaved passes")
    bench("synthetic", *synthetic(args.images), args.repeat)
    if (args.data / "coco-mini").exists():
        bench("coco-mini", *coco(args.data, args.images), args.repeat)
    else:
        print(f"(coco-mini not found under {args.data}: pass --data)")


if __name__ == "__main__":
    main()
