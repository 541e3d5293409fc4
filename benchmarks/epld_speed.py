"""EPLD speed: labelling cost per image (one batch of 8 against 8 batches of 1) and stage-1 step time.

    python benchmarks/epld_speed.py [--size 256] [--image-size 256] [--batch 8] [--layers 6] [--threads 1]

All figures come from one run, on the same synthetic images (P1 clicks):

* labelling: ``EPLDGenerator.__call__`` on the whole batch against one call
  per image, each timed ``--repeats`` times interleaved, best time kept; the
  ratio says whether batching reaches the network (one decoder pass for the
  batch; the backbone in passes of ``backbone_chunk`` images, 2 on a CPU, and
  also timed with the whole batch in one pass). The network is untrained
  (speed does not depend on the weights);
* training: one optimiser step of :class:`EPLDTrainable` at ``--size`` px with
  ``--train-batch`` images, median of ``--steps`` steps after a warm-up, with
  the default frozen backbone (features cached per image, the first epoch
  excluded) and with the backbone trained.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import torch  # noqa: E402

from pointseg.data.points import sample_points  # noqa: E402
from pointseg.data.synthetic import SyntheticDataset, synthetic_categories  # noqa: E402
from pointseg.generators.epld import EPLDGenerator, EPLDTrainable  # noqa: E402


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def train_step_seconds(cfg: dict, records, categories, steps: int) -> float:
    """Median seconds of one optimiser step (forward, Eq. 11, backward, AdamW), warm cache."""
    trainable = EPLDTrainable(cfg, categories)
    model = trainable.build()
    model.train()
    opt = trainable.optimizer(model)
    bs = trainable.config.batch_size
    chunks = [records[i : i + bs] for i in range(0, len(records) - bs + 1, bs)]

    def step(chunk):
        batch = trainable.make_batch(chunk, epoch=0)
        batch["image_ids"] = [r.image_id for r in chunk]
        terms = trainable.loss(model, batch, step=10)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()

    for chunk in chunks:  # warm-up: fills the feature cache of a frozen backbone (epoch 0)
        step(chunk)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(chunks[i % len(chunks)])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="network input size (input_size)")
    ap.add_argument("--image-size", type=int, default=256, help="synthetic image side")
    ap.add_argument("--batch", type=int, default=8, help="labelling batch")
    ap.add_argument("--layers", type=int, default=6, help="decoder layers L")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared-box setting)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    categories = synthetic_categories()
    records = list(SyntheticDataset(max(args.batch, 2 * args.train_batch), args.image_size, args.image_size, seed=0))
    for r in records:
        r.points = sample_points(r, "p1", seed=0)
    images = [r.image for r in records[: args.batch]]
    points = [r.points for r in records[: args.batch]]

    cfg = {"input_size": args.size, "layers": args.layers, "batch_size": args.train_batch}
    net = EPLDTrainable(cfg, categories).build().eval()
    gen = EPLDGenerator({}, categories, net=net)  # default backbone_chunk: 2 images per backbone pass on a CPU
    whole = EPLDGenerator({"backbone_chunk": args.batch}, categories, net=net)  # the whole batch in one pass
    gen(images[:1], points[:1])  # warm-up
    batched = single = one_pass = float("inf")
    for _ in range(args.repeats):  # interleaved, so all see the same machine load
        batched = min(batched, best_of(lambda: gen(images, points), 1))
        one_pass = min(one_pass, best_of(lambda: whole(images, points), 1))
        single = min(single, best_of(lambda: [gen([im], [p]) for im, p in zip(images, points)], 1))
    n = len(images)

    frozen = train_step_seconds(cfg, records, categories, args.steps)
    trained = train_step_seconds({**cfg, "freeze_backbone": False}, records, categories, args.steps)

    print(f"\nEPLD, L={args.layers}, network input {args.size} px, {n} synthetic images of {args.image_size} px, "
          f"{args.threads} torch thread(s)")
    print(f"labelling, one batch of {n}:   {1000 * batched / n:8.1f} ms / image  (backbone 2 images a pass)")
    print(f"  same, backbone in one pass: {1000 * one_pass / n:8.1f} ms / image")
    print(f"labelling, {n} batches of 1:   {1000 * single / n:8.1f} ms / image")
    print(f"batched speed-up:             {single / batched:8.2f}x  (target >= 1.5x; "
          f"{single / one_pass:.2f}x with the backbone in one pass)")
    print(f"train step, {args.train_batch} images, frozen backbone (cached): {frozen:6.3f} s "
          f"({1000 * frozen / args.train_batch:.0f} ms / image)")
    print(f"train step, {args.train_batch} images, backbone trained:         {trained:6.3f} s "
          f"({1000 * trained / args.train_batch:.0f} ms / image)")


if __name__ == "__main__":
    main()
