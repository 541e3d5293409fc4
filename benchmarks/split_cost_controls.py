"""Controls for EPLD's ``split_features``: what PSPS's split gains from cost terms that learn nothing.

EPLD's ``split_features: W`` adds ``W * ||F(k) - F(l)||`` of the trained
network's own ``F^fuse`` to every edge of PSPS's geodesic cost when it splits
the foreground among the things (in the ``void`` protocol: the whole image).
This benchmark asks how much of that gain needs the training. On coco-mini
with P1 clicks it labels one half of the images with PSPS's split (every pixel
to the nearest click; LAB colour + ``beta`` * Sobel boundary at half size,
:mod:`pointseg.generators.psps`), plus one term on every edge:

* ``step W``: a constant ``W`` per step, diagonal or not (the papers'
  8-neighbour costs weigh every step alike). It pulls the split towards a
  spatial one (Voronoi's);
* ``imagenet W``: ``W * ||F(k) - F(l)||`` of frozen ImageNet
  EfficientNet-Lite0 features (the backbone EPLD's network is built on, with
  its offline weights; no training), the image resized to ``--input-size``
  square as EPLD's network sees it, each level of ``--levels`` (level ``i``
  has stride ``2**(i+1)``) resized bilinearly to the working grid and
  L2-normalised per pixel, the levels concatenated.

Each row prints PQ, PQ_th, mask AP / AP50 and the mean best IoU per object
(:func:`pointseg.evaluation.score`). Choose a weight on ``--split choose``,
report it on ``--split report`` (README "Measured", EPLD's void rows).

Commands (from the repo root)::

    python benchmarks/split_cost_controls.py --split choose --steps 0.003,0.01,0.03 --imagenet 0.02,0.05,0.1,0.3
    python benchmarks/split_cost_controls.py --split report --steps 0.01 --imagenet 0.05
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pseudo_label_quality import SHARED, fmt_table, prepare  # noqa: E402

from pointseg.data.prepare import join, read_index  # noqa: E402
from pointseg.evaluation import SPLITS, GroundTruth, score, split_rows  # noqa: E402
from pointseg.generators.base import assemble, group_of_points, seed_groups  # noqa: E402
from pointseg.generators.psps import PSPSConfig, geodesic_cost, scaled_points, upsample_labels  # noqa: E402
from pointseg.generators.epld.generator import unit_features  # noqa: E402
from pointseg.geodesic import edge_costs, nearest_source  # noqa: E402
from pointseg.train.rows import index_record  # noqa: E402


def weights(text: str, flag: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag} {text!r}: comma-separated numbers, e.g. 0.01,0.03") from None
    if any(not np.isfinite(x) or x < 0 for x in out):
        raise SystemExit(f"{flag} {text!r}: weights must be finite and >= 0")
    return out


def imagenet_features(backbone, mean, std, image: np.ndarray, input_size: int, levels: list[int],
                      size: tuple[int, int]) -> np.ndarray:
    """``(C, h, w)``: the frozen backbone's ``levels`` of ``image`` seen at ``input_size`` square, each resized
    bilinearly to ``size`` and L2-normalised per pixel, concatenated."""
    x = cv2.resize(image, (input_size, input_size), interpolation=cv2.INTER_AREA)
    t = torch.from_numpy(x).float().permute(2, 0, 1)[None] / 255.0
    with torch.no_grad():
        feats = backbone((t - mean) / std)
    return np.concatenate([unit_features(feats[level][0], size) for level in levels])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--background", default="void", choices=["void", "stuff"])
    ap.add_argument("--split", default="report", choices=SPLITS)
    ap.add_argument("--steps", default="0.01", help="comma-separated constant step costs W")
    ap.add_argument("--imagenet", default="0.05", help="comma-separated weights W of the frozen feature distance")
    ap.add_argument("--levels", default="1,2", help="backbone levels (1: stride 4, 2: stride 8, 3: 16, 4: 32)")
    ap.add_argument("--input-size", type=int, default=320, help="square input of the backbone (EPLD's network: 320)")
    ap.add_argument("--data-root", default=str(SHARED))
    ap.add_argument("--images", type=int, default=None, help="first N images (default: all 80)")
    ap.add_argument("--workdir", default=str(ROOT / "out" / "quality"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if not (Path(args.data_root) / "coco-mini").exists():
        raise SystemExit(f"coco-mini not found under {args.data_root} (it lives in ../shared/data beside the repo)")
    steps, imagenet = weights(args.steps, "--steps"), weights(args.imagenet, "--imagenet")
    try:
        levels = sorted({int(x) for x in args.levels.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--levels {args.levels!r}: comma-separated integers 0..4") from None
    if not levels or not set(levels) <= set(range(5)):
        raise SystemExit(f"--levels {args.levels!r}: comma-separated integers 0..4")
    if args.input_size < 32 or args.input_size % 32:
        raise SystemExit(f"--input-size {args.input_size}: a multiple of 32")
    args.dataset, args.points, args.point_seed, args.size, args.data_seed = "coco-mini", "p1", 0, 128, 0
    out, cats, _ = prepare(args, args.background)
    gt = GroundTruth(out)
    rows = gt.rows(split_rows(read_index(join(out, "index", "index.parquet")), args.split))

    backbone = None
    if imagenet:
        from pointseg.models.backbones import build_timm_backbone, normalization

        backbone, _ = build_timm_backbone("efficientnet_lite0", pretrained=True, out_indices=(0, 1, 2, 3, 4))
        backbone.eval()
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization("efficientnet_lite0"))
    cfg = PSPSConfig()
    images = []  # per image: (row, PSPS's cost, feature edge lengths, click cells, their groups, groups, H, W)
    for row in tqdm(rows, desc="costs", unit="img", disable=args.quiet):
        rec = index_record(dict(row), cats)
        height, width = rec.image.shape[:2]
        cost, (h, w) = geodesic_cost(rec.image, cfg.downscale, cfg.blur_sigma, cfg.beta)
        feature = None
        if backbone is not None:
            feature = edge_costs(imagenet_features(backbone, mean, std, rec.image, args.input_size, levels, (h, w)))
        groups = seed_groups(rec.points, cats)
        images.append((row, cost, feature, scaled_points(rec.points, height, width, h, w),
                       group_of_points(groups, len(rec.points)), groups, height, width))

    def labelled(term: str, weight: float):
        for row, cost, feature, cells, group_of, groups, height, width in images:
            extra = 0.0 if weight == 0 else weight * (feature if term == "imagenet" else np.isfinite(cost))
            label = nearest_source(cost + extra, cells, labels=group_of)[1]
            yield row, assemble(upsample_labels(label, height, width), groups), ""

    table = []
    for term, ws in (("psps", [0.0]), ("step", steps), ("imagenet", imagenet)):
        for weight in ws:
            res = score(labelled(term, weight), gt, cats)
            res["seconds_per_image"] = res["label_seconds"] / max(res["num_images"], 1)
            table.append(("psps" if term == "psps" else f"{term} {weight:g}", res))
    print(fmt_table(f"\n# {args.background} protocol, {args.split} split: PSPS's split plus a cost term that learns "
                    f"nothing (imagenet: levels {levels} at {args.input_size} px)", table), flush=True)
    return {name: res for name, res in table}


if __name__ == "__main__":
    main()
