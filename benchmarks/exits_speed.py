"""EXITS speed at the default crop size: labelling objects per second and the stage-1 step time.

Prints, measured in one run on synthetic scenes (no data needed; timings on a
shared machine are noisy, so each figure is the median of ``--repeats``):

* labelling: objects per second of :class:`~pointseg.generators.exits.ExitsGenerator`
  (crop, network, paste, assemble) on batches of images, one torch thread,
  with the network's BatchNorms folded into its convolutions and its TF-SAME
  convolutions padding inside the convolution (the defaults), and with each
  switched off;
* stage 1: seconds per training step (``max_objects_per_step`` crops), split
  into the MIL warm-up step of the ViT similarity extractor and the generator
  step (retrieval + point and CRF losses + backward) for both similarity
  options, and the share of the generator step spent in the point retrieval;
* the box baseline's objects per second, for scale.

Run::

    python benchmarks/exits_speed.py [--crop-size 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pointseg.data.record import Category, ImageRecord, Points  # noqa: E402
from pointseg.generators import build_generator  # noqa: E402
from pointseg.generators.exits import ExitsGenerator, ExitsStage1  # noqa: E402
from pointseg.generators.exits.stage1 import object_batch, retrieve_for_batch  # noqa: E402

CATS = {1: Category(1, "thing", True)}


def scene(seed: int, size: int = 320, objects: int = 8) -> tuple[np.ndarray, Points]:
    """A noisy image with ``objects`` coloured ellipses and their extreme points."""
    rng = np.random.default_rng(seed)
    img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    xy, seg = [], []
    for k in range(objects):
        cy, cx = rng.uniform(30, size - 30, 2)
        ry, rx = rng.uniform(8, 40, 2)
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        img[m] = rng.integers(0, 255, 3)
        r, c = np.nonzero(m)
        xy += [(c[r == r.min()].mean(), r.min()), (c.min(), r[c == c.min()].mean()),
               (c[r == r.max()].mean(), r.max()), (c.max(), r[c == c.max()].mean())]
        seg += [k + 1] * 4
    return img, Points(xy, seg, [1] * len(seg))


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--crop-size", type=int, default=ExitsStage1.Config().crop_size)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    scenes = [scene(i) for i in range(args.images)]
    images, points = [s[0] for s in scenes], [s[1] for s in scenes]
    n_obj = sum(len(set(p.segment.tolist())) for p in points)
    print(f"crop size {args.crop_size}, {args.images} images of 320 x 320, {n_obj} objects, 1 torch thread")

    rows = []
    for similarity in ("vit_attention", "feature_cosine"):
        trainable = ExitsStage1({"crop_size": args.crop_size, "similarity": similarity}, CATS)
        cfg = trainable.config
        net = trainable.build()
        trainable.start(net)
        records = [ImageRecord(i, 320, 320, image=im, points=p) for i, (im, p) in enumerate(scenes[:4])]
        batch = object_batch(records, CATS, cfg, epoch=0)
        k = len(batch["objects"])

        def step(at: int):
            net.train()
            trainable.loss(net, batch, at)["loss"].backward()

        step(cfg.warmup_steps)  # warm the allocator
        gen_step = median_time(lambda: step(cfg.warmup_steps), args.repeats)
        retrieval = median_time(lambda: retrieve_for_batch(trainable.similarity_fn(net), batch, cfg), args.repeats)
        warm = median_time(lambda: step(0), args.repeats) if trainable.warmup_steps else None
        rows.append((similarity, k, warm, gen_step, retrieval))
        if similarity == "feature_cosine":
            gen = ExitsGenerator({}, CATS, net=net)  # BatchNorms folded into the convolutions (the default)
            unfolded = ExitsGenerator({"fold_batchnorm": False}, CATS, net=net)
            padded = ExitsGenerator({"pad_same_inside": False}, CATS, net=net)  # timm's Conv2dSame: F.pad copies
            for g in (gen, unfolded, padded):
                g(images[:1], points[:1])
            label_s = median_time(lambda: gen(images, points), args.repeats)
            unfolded_s = median_time(lambda: unfolded(images, points), args.repeats)
            padded_s = median_time(lambda: padded(images, points), args.repeats)
    box = build_generator("box", {}, CATS)
    box_s = median_time(lambda: box(images, points), args.repeats)

    print("\n| stage-1 similarity | objects per step | warm-up step s | generator step s | retrieval s (share) |")
    print("|---|---|---|---|---|")
    for similarity, k, warm, gen_step, retrieval in rows:
        w = f"{warm:.2f}" if warm is not None else "-"
        print(f"| {similarity} | {k} | {w} | {gen_step:.2f} | {retrieval:.2f} ({100 * retrieval / gen_step:.0f} %) |")
    print("\n| labelling | objects/s |")
    print("|---|---|")
    print(f"| exits (network at crop {args.crop_size}) | {n_obj / label_s:.1f} |")
    print(f"| exits, BatchNorm not folded (`fold_batchnorm: false`) | {n_obj / unfolded_s:.1f} |")
    print(f"| exits, TF-SAME padding copied (`pad_same_inside: false`) | {n_obj / padded_s:.1f} |")
    print(f"| box baseline | {n_obj / box_s:.1f} |")


if __name__ == "__main__":
    main()
