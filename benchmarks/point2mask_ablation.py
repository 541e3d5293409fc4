"""Point2Mask ablation: MinCost against OT and the three supplier schemes, as a PQ table.

On the same images, points and maps, prints pseudo-label PQ / PQ_th / PQ_st /
SQ_th / RQ_th for:

* Voronoi (Euclidean nearest point, no image) and PSPS (the training-free
  foundation baseline, its own defaults);
* Point2Mask MinCost (Table 7's MC: argmin of the same geodesic costs);
* Point2Mask OT x {equal, nearest_point, nearest_centroid} (Table 5);

plus, per OT row, the largest marginal errors and total solver seconds.

Run (training-free maps by default; ``--checkpoint`` uses learned maps)::

    python benchmarks/point2mask_ablation.py --dataset synthetic --images 24
    python benchmarks/point2mask_ablation.py --dataset coco-mini --images 80
    python benchmarks/point2mask_ablation.py --dataset synthetic --set thing_competition=class --set beta=1.0
    python benchmarks/point2mask_ablation.py --dataset coco-mini --images 80 --train-steps 300   # + learned maps

Points are P1 (``pointseg.data.points.sample_points``, seed ``--point-seed``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing

from pointseg.data.points import sample_points, validate_points  # noqa: E402
from pointseg.generators import build_generator  # noqa: E402
from pointseg.metrics import PQEvaluator  # noqa: E402

COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini"


def load_dataset(name: str, n: int, point_seed: int, size: int = 128):
    """``(categories, [(image, points, gt_id_map, gt_segments_info, image_id)], records with points)``."""
    if name == "synthetic":
        from pointseg.data.synthetic import SyntheticDataset

        ds = SyntheticDataset(n, height=size, width=size, seed=0)
        cats, records = ds.categories, list(ds)
    elif name == "coco-mini":
        from pointseg.data.coco import instances_to_panoptic, read_coco_instances

        if not COCO_MINI.exists():
            raise SystemExit(f"coco-mini not found at {COCO_MINI} (../shared/data is not part of the repo)")
        cats, stream = read_coco_instances(
            str(COCO_MINI / "annotations" / "instances_train2017.json"), str(COCO_MINI / "train2017"),
            load_images=True, max_images=n,
        )
        records = [instances_to_panoptic(r)[0] for r in stream]
    else:
        raise SystemExit(f"--dataset must be synthetic or coco-mini, got {name!r}")
    items = []
    for r in records:
        pts, _ = validate_points(sample_points(r, "p1", point_seed), r.height, r.width, cats)
        r.points = pts
        gt_map, gt_info = r.panoptic()
        items.append((r.image, pts, gt_map, gt_info, r.image_id))
    return cats, items, records


def score(method: str, params: dict, cats, items) -> dict:
    """PQ of one generator on ``items``; a failed image counts as an empty prediction."""
    gen = build_generator(method, params, cats)
    ev = PQEvaluator(cats)
    t0 = time.perf_counter()
    errs, diags, failed = [], [], 0
    for image, pts, gt_map, gt_info, image_id in items:
        try:
            lab = gen.generate(image, pts)
            pred = (lab.id_map, lab.segments_info)
            diags.append(lab.diagnostics)
        except Exception as exc:  # noqa: BLE001 - scored as empty, reported
            failed += 1
            print(f"  {method} image {image_id}: {type(exc).__name__}: {exc}", file=sys.stderr)
            pred = (np.zeros_like(gt_map), [])
        ev.process(gt_map, gt_info, *pred, image_id=image_id)
    out = ev.evaluate()
    out["seconds"] = time.perf_counter() - t0
    out["failed"] = failed
    out["err_row"] = max((d.get("marginal_error_row", 0.0) for d in diags), default=float("nan"))
    out["err_col"] = max((d.get("marginal_error_col", 0.0) for d in diags), default=float("nan"))
    out["diverged"] = sum(int(d.get("ot_diverged", 0)) for d in diags)
    out["fallbacks"] = sum(int(d.get("centroid_fallbacks", 0)) for d in diags)
    return out


def rows(base: dict, learned: dict | None = None) -> list[tuple[str, str, dict]]:
    p2m = dict(base)
    extra = []
    if learned:
        extra = [
            ("P2M learned MinCost", "point2mask", {**p2m, **learned, "assignment": "mincost"}),
            ("P2M learned OT centroid", "point2mask", {**p2m, **learned, "assignment": "ot"}),
        ]
    return extra + [
        ("Voronoi", "voronoi", {}),
        ("PSPS", "psps", {}),
        ("P2M MinCost", "point2mask", {**p2m, "assignment": "mincost"}),
        ("P2M OT equal", "point2mask", {**p2m, "assignment": "ot", "supplier_scheme": "equal"}),
        ("P2M OT nearest_point", "point2mask", {**p2m, "assignment": "ot", "supplier_scheme": "nearest_point"}),
        ("P2M OT nearest_centroid", "point2mask", {**p2m, "assignment": "ot", "supplier_scheme": "nearest_centroid"}),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="synthetic", choices=["synthetic", "coco-mini"])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--size", type=int, default=128, help="synthetic image side")
    ap.add_argument("--point-seed", type=int, default=0)
    ap.add_argument("--checkpoint", default=None, help="MapNet checkpoint: adds learned-map rows (trained first with --train-steps)")
    ap.add_argument("--train-steps", type=int, default=0, help="train the MapNet on these images' points first")
    ap.add_argument("--train-size", type=int, default=256, help="square training size of the MapNet")
    ap.add_argument("--loss-stride", type=int, default=2, help="L_sem^LAB / L_sem^RGB at 1/stride resolution")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra Point2Mask config (YAML value), e.g. --set beta=1.0")
    args = ap.parse_args()
    base: dict = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        base[k] = yaml.safe_load(v)
    cats, items, records = load_dataset(args.dataset, args.images, args.point_seed, args.size)
    print(f"# {args.dataset}, {len(items)} images, P1 points (seed {args.point_seed}), point2mask extra config {base}")
    learned = None
    if args.train_steps:
        import logging

        from pointseg.losses.point2mask import Point2MaskLossConfig
        from pointseg.train.point2mask_maps import MapTrainConfig, train_map_net

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        ckpt = args.checkpoint or str(ROOT / "out" / f"point2mask_maps_{args.dataset}.pt")
        cfg = MapTrainConfig(image_size=args.train_size, loss=Point2MaskLossConfig(loss_stride=args.loss_stride),
                             generator={k: v for k, v in base.items() if k != "maps"})
        res = train_map_net(records, cats, cfg, steps=args.train_steps, checkpoint_path=ckpt, resume=False)
        print(f"# trained MapNet: {args.train_steps} steps at {args.train_size}px in {res['seconds']:.0f} s "
              f"({res['pseudo_refreshes']} pseudo-label refreshes) -> {ckpt}; last terms "
              f"{ {k: round(v, 3) for k, v in res['history'][-1].items()} }")
        args.checkpoint = ckpt
    if args.checkpoint:
        learned = {"maps": "learned", "checkpoint": args.checkpoint}
    head = f"{'method':26s} {'PQ':>6s} {'PQ_th':>6s} {'SQ_th':>6s} {'RQ_th':>6s} {'PQ_st':>6s} {'err_row':>8s} {'err_col':>8s} {'s':>6s}"
    print(head)
    print("-" * len(head))
    for label, method, params in rows(base, learned):
        r = score(method, params, cats, items)
        f = lambda v: f"{100 * v:6.2f}" if v == v else "   nan"  # noqa: E731
        e = lambda v: f"{v:8.1e}" if method == "point2mask" and "MinCost" not in label else f"{'-':>8s}"  # noqa: E731
        extra = f"  failed={r['failed']}" if r["failed"] else ""
        extra += f"  diverged={r['diverged']}" if r["diverged"] else ""
        extra += f"  centroid_fallbacks={r['fallbacks']}" if r["fallbacks"] else ""
        print(f"{label:26s} {f(r['pq'])} {f(r['pq_th'])} {f(r['sq_th'])} {f(r['rq_th'])} {f(r['pq_st'])} "
              f"{e(r['err_row'])} {e(r['err_col'])} {r['seconds']:6.1f}{extra}", flush=True)


if __name__ == "__main__":
    main()
