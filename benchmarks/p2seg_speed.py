"""P2Seg speed: a stage-1 training step with a batch above 1, and the affinity head's time and peak memory.

Prints, at 256 px and ``--batch`` images per step (default 4), on this CPU:

* the whole stage-1 step of :class:`~pointseg.generators.p2seg.P2SegTrainable`
  (forward, the three losses, backward, AdamW), round 0 and round 1 (round 1
  adds the teacher's forward and S2I on its outputs), median seconds per step
  and images per second; with ``--head-stride 4`` also the stride-4 network
  (the paper's HRNet stride: a 64² class map) with its ``--grid`` (default
  64) affinity, and its ratio to the default network;
* the affinity head alone -- grid pooling of the embedding, ``Â`` over all cell
  pairs, ``L_I2S`` (Eq. 5), forward and backward -- for grids of 16², 32²
  (default) and 64² cells (64² = every stride-4 pixel of a 256-px input),
  and for the window affinity (``affinity: window``: every pixel of the 64²
  stride-4 map against its 7 x 7 neighbours at dilation 2):
  median seconds, and the peak of live tensor memory during one step (torch
  profiler: allocations minus frees in time order; each grid in a fresh
  subprocess);
* labelling: :class:`~pointseg.generators.p2seg.P2SegGenerator` on one batch
  of ``--batch`` images (320 x 400, network at 256 px), with the network's
  BatchNorms folded into its convolutions (``fold_batchnorm``, the default)
  and without, interleaved, median milliseconds per image of the whole call
  and of its network forward (the labels' ``network_seconds``), and their ratio;
* for scale, the size of the affinity over all pixel pairs of the input, as
  the authors' code forms it (not run).

    OMP_NUM_THREADS=1 python benchmarks/p2seg_speed.py [--head-stride 4 [--grid 64 | --affinity window]]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing

from pointseg.data.record import Category, ImageRecord, Points  # noqa: E402
from pointseg.generators.p2seg import P2SegGenerator, P2SegTrainable  # noqa: E402
from pointseg.generators.p2seg.i2s import affinity_targets, window_affinity_targets  # noqa: E402
from pointseg.generators.p2seg.losses import i2s_loss  # noqa: E402
from pointseg.generators.p2seg.network import P2SegNet  # noqa: E402

SIZE = 256


def _records(n: int, rng: np.random.Generator) -> list[ImageRecord]:
    out = []
    for i in range(n):
        img = rng.integers(0, 255, (320, 400, 3), dtype=np.uint8)
        img[60:200, 80:220] = (200, 40, 40)
        img[150:300, 240:380] = (40, 180, 40)
        pts = Points([[150, 130], [300, 220], [20, 300]], [1, 2, 3], [1, 2, 10])
        out.append(ImageRecord(i, 320, 400, image=img, points=pts))
    return out


def _median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def train_step(batch_size: int, repeats: int, head_stride: int = 8, grid: int = 32,
               affinity: str = "grid") -> dict[int, float]:
    """Median seconds per stage-1 step, by round."""
    cats = {1: Category(1, "a", True), 2: Category(2, "b", True), 10: Category(10, "bg", False)}
    seconds = {}
    for rnd in (0, 1):
        trainable = P2SegTrainable({"image_size": SIZE, "batch_size": batch_size, "steps": 10,
                                    "head_stride": head_stride, "affinity_grid": min(grid, SIZE // head_stride),
                                    "affinity": affinity},
                                   cats, context={"generator": {"rounds": 1}})
        model = trainable.build()
        opt = trainable.optimizer(model)
        trainable.collate()
        batch = trainable.make_batch(_records(batch_size, np.random.default_rng(0)))
        if rnd == 1:
            trainable.after_step(model, 5)  # step 5 of 10 starts round 1: the teacher is frozen

        def step():
            loss = trainable.loss(model, batch, 5 * rnd)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()

        s = seconds[rnd] = _median_time(step, repeats)
        pairs = f"grid {grid}²" if affinity == "grid" else "window 7² (dilation 2)"
        print(f"stage-1 step, round {rnd}, batch {batch_size} x {SIZE}px, head stride {head_stride}, affinity "
              f"{pairs}: {s:.3f} s/step, {batch_size / s:.2f} images/s")
    return seconds


def labelling(batch_size: int, repeats: int) -> None:
    """Whole-call and network milliseconds per image, BatchNorms folded (the default) and not (interleaved)."""
    cats = {1: Category(1, "a", True), 2: Category(2, "b", True), 10: Category(10, "bg", False)}
    model = P2SegTrainable({"image_size": SIZE}, cats, context={"generator": {}}).build().eval()
    records = _records(batch_size, np.random.default_rng(0))
    images, points = [r.image for r in records], [r.points for r in records]
    gens = {fold: P2SegGenerator({"fold_batchnorm": fold}, cats, net=model, net_config={"image_size": SIZE})
            for fold in (True, False)}
    times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for rep in range(repeats + 1):
        for fold, gen in gens.items():
            t0 = time.perf_counter()
            labels = gen(images, points)
            wall = time.perf_counter() - t0
            if rep:  # the first round warms up
                times[fold].append((wall, sum(lab.diagnostics["network_seconds"] for lab in labels)))
    ms = {fold: [1000 * float(np.median([t[i] for t in v])) / batch_size for i in (0, 1)] for fold, v in times.items()}
    print(f"labelling, one batch of {batch_size} (320x400 images, network at {SIZE}px), median of {repeats}:")
    for fold in (True, False):
        print(f"  BatchNorm {'folded (default)' if fold else 'not folded     '}: {ms[fold][0]:6.1f} ms / image, "
              f"network alone {ms[fold][1]:6.1f}")
    print(f"  folding saves {ms[False][0] / ms[True][0]:.2f}x of the call and {ms[False][1] / ms[True][1]:.2f}x of "
          f"the network time")


def affinity_head(grid: int, batch_size: int, repeats: int, window: int | None = None) -> dict:
    """Median time and peak live tensor memory of pool -> Â -> L_I2S (or window Â -> L_I2S), forward + backward."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    if window is None:
        net = P2SegNet(3, pretrained=False, affinity_grid=grid)
        emb = torch.randn(batch_size, net.embed_dim, SIZE // 8, SIZE // 8, requires_grad=True)
        labels = torch.randint(-1, 4, (batch_size, grid * grid))
        pairs = (grid * grid) ** 2 * batch_size

        def loss():  # a 64 grid repeats stride-8 cells: the cost of Â is the same as from stride 4
            return i2s_loss(net.affinity(emb), affinity_targets(labels))
    else:
        net = P2SegNet(3, pretrained=False, stride=4, affinity="window", window=window, dilation=2)
        side = SIZE // 4
        emb = torch.randn(batch_size, net.embed_dim, side, side, requires_grad=True)
        labels = torch.randint(-1, 4, (batch_size, side, side))
        pairs = side * side * window * window * batch_size

        def loss():
            return i2s_loss(net.affinity(emb), *window_affinity_targets(labels, window, 2))

    def step():
        emb.grad = None
        loss().backward()

    s = _median_time(step, repeats)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):  # allocations minus frees, in time order
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return {"grid": grid, "window": window, "seconds": s, "peak_mb": peak / 2**20, "pairs": pairs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--head-stride", type=int, choices=(4, 8), default=8,
                    help="4: also time the stride-4 network and print its ratio to the default (stride 8, grid 32)")
    ap.add_argument("--grid", type=int, default=64, help="affinity grid of the stride-4 network")
    ap.add_argument("--affinity", choices=("grid", "window"), default="grid",
                    help="affinity of the stride-4 network: the --grid cells, or the 7 x 7 window at dilation 2")
    ap.add_argument("--one-grid", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--one-window", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.one_grid is not None:
        print(json.dumps(affinity_head(args.one_grid, args.batch, args.repeats, args.one_window)))
        return
    if args.batch < 2:
        raise SystemExit("--batch must be above 1")
    print(f"torch threads: {torch.get_num_threads()}")
    default = train_step(args.batch, args.repeats)
    if args.head_stride == 4:
        fine = train_step(args.batch, args.repeats, 4, args.grid, args.affinity)
        for rnd in (0, 1):
            print(f"  round {rnd}: the stride-4 step takes {fine[rnd] / default[rnd]:.2f}x the default's")
    print(f"affinity head (pool, Â, L_I2S; forward + backward), batch {args.batch} x {SIZE}px:")
    rows = []
    for grid, window in ((16, None), (32, None), (64, None), (64, 7)):
        extra = ["--one-window", str(window)] if window else []
        out = subprocess.run([sys.executable, __file__, "--one-grid", str(grid), "--batch", str(args.batch),
                              "--repeats", str(args.repeats), *extra], capture_output=True, text=True, check=True)
        # the profiler writes its own log lines; the result is the last JSON line
        rows.append(json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]))
    ref = next(r for r in rows if r["grid"] == 32)
    for r in rows:
        k = r["window"]
        name = f"grid {r['grid']:3d}x{r['grid']:<3d}" if not k else f"window {k}x{k} d2 on the 64² map"
        print(f"  {name} ({r['pairs'] / 1e6:7.2f}M pairs): {r['seconds']:.4f} s "
              f"({r['seconds'] / ref['seconds']:.2f}x the 32x32 grid), peak {r['peak_mb']:.0f} MB")
    labelling(max(args.batch, 8), args.repeats)
    full = (SIZE * SIZE) ** 2
    print(f"  all pixel pairs of one {SIZE}px input: {full / 1e9:.1f}G entries, {full * 4 / 2**30:.0f} GiB in float32 "
          f"per image (not run)")


if __name__ == "__main__":
    main()
