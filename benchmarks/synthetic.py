"""Synthetic scene generation speed (target: under 20 ms per 128x128 scene).

    python benchmarks/synthetic.py [--n 50] [--size 128]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pointseg.data.synthetic import make_scene  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--n", type=int, default=50)
ap.add_argument("--size", type=int, default=128)
args = ap.parse_args()
make_scene(0, 10_000, args.size, args.size)  # warm-up
t0 = time.perf_counter()
for i in range(args.n):
    make_scene(0, i, args.size, args.size)
print(f"synthetic scenes {args.size}x{args.size}: {(time.perf_counter() - t0) / args.n * 1e3:.1f} ms per scene over {args.n}")
