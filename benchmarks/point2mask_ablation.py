"""Point2Mask ablation: MinCost against OT and the supplier schemes, as a Table 7-style PQ table.

On the same images, points and maps, prints pseudo-label PQ / PQ_th / SQ_th /
RQ_th / PQ_st for:

* Voronoi (Euclidean nearest point, no image) and PSPS (the training-free
  foundation baseline, its own defaults);
* Point2Mask MinCost (Table 7's MC: argmin of the same geodesic costs);
* Point2Mask OT x {equal, nearest_point, nearest_centroid} (Table 5) with the
  exact solver, and OT nearest_centroid with the paper's reference solver
  (T = 80 log-domain updates, eps = 1e-3, Appendix A);
* OT nearest_centroid with ``centroid_core=0.5``: each centroid taken over the
  cheaper half of its initial mask (our extension; the paper uses the whole mask);
* a diagnostic row, OT with ground-truth supplier units ("oracle k",
  :func:`oracle_supplier_units`): the same costs, the sizes a perfect Eq. 4
  would give;

on the chosen maps (``--maps lowlevel``: LAB / LAB-Sobel, training-free;
``--maps learned``: a MapNet checkpoint, given or trained first).

On the synthetic set a second table breaks PQ_th down by where the instance
sits (:class:`pointseg.data.synthetic.SceneLayout`): members of a touching
same-class pair with a weak border (one texture, no outline), of a strong
pair, and all other things. Each P1 point seeds one predicted segment, so a
ground-truth thing is matched to the segment its own point seeded; it is a
true positive when their IoU > 0.5, and ``PQ = sum IoU(TP) / n`` over the
``n`` things of the group (each unmatched thing is one FN and its seeded
segment one FP).

Commands (the README figures come from these; ``OMP_NUM_THREADS=1`` matters on
a loaded 2-core box: two torch threads stalled training 5-10x there)::

    # training-free maps, 64 held-out synthetic images
    python benchmarks/point2mask_ablation.py --dataset synthetic --images 64 --data-seed 1
    # learned maps: train a MapNet on 96 synthetic images (seed 0; 600 steps, ~3 min CPU) ...
    python benchmarks/point2mask_ablation.py --dataset synthetic --train-steps 600 --train-images 96 \
        --lr 1e-3 --train-only --checkpoint out/p2m_maps_synthetic.pt
    # ... and evaluate it on 64 held-out images (seed 1)
    python benchmarks/point2mask_ablation.py --dataset synthetic --maps learned \
        --checkpoint out/p2m_maps_synthetic.pt --data-seed 1 --images 64
    # coco-mini, 80 images, P1 seed 0 (the map net trains on the same images' points:
    # pseudo labels are a training-set product)
    python benchmarks/point2mask_ablation.py --dataset coco-mini --images 80 --train-steps 200 \
        --train-size 256 --train-batch 2 --lr 1e-3 --train-only --checkpoint out/p2m_maps_coco_mini.pt
    python benchmarks/point2mask_ablation.py --dataset coco-mini --images 80 --maps learned \
        --checkpoint out/p2m_maps_coco_mini.pt --only "P2M MinCost,P2M OT nearest_centroid,P2M OT centroid T=80"

The ``k err`` column is the L1 error of a row's supplier units against the
oracle's, as a fraction of the transported pixels (:func:`oracle_supplier_units`).

Points are P1 (``pointseg.data.points.sample_points``, seed ``--point-seed``).
Wall and process CPU seconds of training and of each row are printed.
"""

from __future__ import annotations

import argparse
import json
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing

import pointseg.generators.point2mask.assign as p2m  # noqa: E402  (its supplier_units is swapped for the oracle)
from pointseg.data.points import sample_points, validate_points  # noqa: E402
from pointseg.generators import build_generator  # noqa: E402
from pointseg.metrics import PQEvaluator  # noqa: E402

COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini"
COCO_PAN = ROOT.parent / "shared" / "data" / "coco-panoptic-samples"
GROUPS = ("pair_weak", "pair_strong", "other")


def load_dataset(name: str, n: int, point_seed: int, size: int = 128, data_seed: int = 0, point_draws: int = 1):
    """``(categories, records with points and gt, layouts or None)``.

    Synthetic: scenes ``0..n-1`` of dataset ``data_seed`` with their
    :class:`~pointseg.data.synthetic.SceneLayout`. coco-mini: the first ``n``
    images of ``../shared/data/coco-mini`` (no layouts). coco-panoptic: the 2
    images of ``../shared/data/coco-panoptic-samples`` (things *and* stuff).
    ``point_draws > 1``: every image ``point_draws`` times with P1 seeds
    ``point_seed, point_seed + 1, ...`` (image ids ``1000 * id + draw``).
    """
    layouts = None
    if name == "synthetic":
        from pointseg.data.synthetic import make_scene_with_layout, synthetic_categories

        cats = synthetic_categories()
        pairs = [make_scene_with_layout(data_seed, i, size, size) for i in range(n)]
        records, layouts = [p[0] for p in pairs], [p[1] for p in pairs]
    elif name == "coco-mini":
        from pointseg.data.coco import instances_to_panoptic, read_coco_instances

        if not COCO_MINI.exists():
            raise SystemExit(f"coco-mini not found at {COCO_MINI} (../shared/data is not part of the repo)")
        cats, stream = read_coco_instances(
            str(COCO_MINI / "annotations" / "instances_train2017.json"), str(COCO_MINI / "train2017"),
            load_images=True, max_images=n,
        )
        records = [instances_to_panoptic(r)[0] for r in stream]
    elif name == "coco-panoptic":
        from pointseg.data.coco import read_coco_panoptic

        if not COCO_PAN.exists():
            raise SystemExit(f"coco-panoptic-samples not found at {COCO_PAN} (../shared/data is not part of the repo)")
        cats, stream = read_coco_panoptic(str(COCO_PAN / "panoptic_examples.json"), str(COCO_PAN / "panoptic_examples"),
                                          str(COCO_PAN / "images"), load_images=True, max_images=n)
        records = list(stream)
    else:
        raise SystemExit(f"--dataset must be synthetic, coco-mini or coco-panoptic, got {name!r}")
    if point_draws > 1:
        import copy

        drawn = []
        for r in records:
            for d in range(point_draws):
                c = copy.copy(r)
                c.image_id = 1000 * r.image_id + d
                c.points, _ = validate_points(sample_points(r, "p1", point_seed + d), r.height, r.width, cats)
                drawn.append(c)
        layouts = [lay for lay in layouts for _ in range(point_draws)] if layouts is not None else None
        return cats, drawn, layouts
    for r in records:
        r.points, _ = validate_points(sample_points(r, "p1", point_seed), r.height, r.width, cats)
    return cats, records, layouts


def _thing_groups(record, layout) -> dict[int, str]:
    """Ground-truth thing segment id -> ``pair_weak`` / ``pair_strong`` / ``other``."""
    out = {s.id: "other" for s in record.segments if s.isthing}
    for a, b, weak in layout.touching_pairs:
        out[a] = out[b] = "pair_weak" if weak else "pair_strong"
    return out


def seeded_ious(label, record) -> dict[int, float]:
    """IoU of every ground-truth thing with the predicted segment its own point seeded (0 if none)."""
    pred_of = {s["source_segment"]: s["id"] for s in label.segments_info if s["isthing"]}
    out = {}
    for s in record.segments:
        if not s.isthing:
            continue
        pid = pred_of.get(s.id)
        if pid is None:
            out[s.id] = 0.0
            continue
        m = label.id_map == pid
        out[s.id] = float((m & s.mask).sum() / max((m | s.mask).sum(), 1))
    return out


def _oracle_k(gt_id_map: np.ndarray, costs, scope, members, point_rc) -> np.ndarray:
    """Ground-truth supplier units of one transport problem (:func:`oracle_supplier_units`)."""
    import cv2

    h, w = costs.shape[-2:]
    gt = cv2.resize(gt_id_map.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST)
    lab = costs[members][:, scope].argmin(0)
    gt_scope = gt[scope]
    for slot, gi in enumerate(members):
        r, c = point_rc[gi][0]
        if gt[r, c] != 0:
            lab = np.where(gt_scope == gt[r, c], slot, lab)
    return np.bincount(lab, minlength=len(members)).astype(np.int64)


@contextlib.contextmanager
def oracle_supplier_units(gt_id_map: np.ndarray, use: bool, record: list):
    """Supplier units against ground truth, per transport problem.

    The oracle: within a transport problem, a pixel counts for the supplier
    whose point lies in the pixel's ground-truth segment, and for its MinCost
    supplier when no supplier's point does (stuff or void pixels MinCost gave
    to things). ``use``: Point2Mask's ``k`` is replaced by the oracle (the
    transport cost is unchanged, so this bounds what better ``k`` alone can
    buy). Always: ``(sum_i |k_i - k_oracle_i|, n)`` of each problem is appended
    to ``record`` (the "k err" column: the L1 error of the scheme's ``k`` as a
    fraction of the problem's pixels).
    """
    original = p2m.supplier_units

    def wrapped(scheme, costs, scope, members, recompute, point_rc, centroid_iters=1, centroid_core=1.0):
        k_or = _oracle_k(gt_id_map, costs, scope, members, point_rc)
        if use:
            k, fb = k_or, 0
        else:
            k, fb = original(scheme, costs, scope, members, recompute, point_rc, centroid_iters, centroid_core)
        record.append((int(np.abs(k - k_or).sum()), int(scope.sum())))
        return k, fb

    p2m.supplier_units = wrapped  # looked up at call time by point2mask.assign._solve_problem
    try:
        yield
    finally:
        p2m.supplier_units = original


def score(method: str, params: dict, cats, records, layouts=None, oracle: bool = False) -> dict:
    """PQ of one generator on ``records``; a failed image counts as an empty prediction.

    ``oracle``: ground-truth supplier units (:func:`oracle_supplier_units`), a diagnostic.
    """
    gen = build_generator(method, params, cats)
    ev = PQEvaluator(cats)
    t0, c0 = time.perf_counter(), time.process_time()
    diags, failed, k_errors = [], 0, []
    by_group: dict[str, list[float]] = {g: [] for g in GROUPS}
    for i, r in enumerate(records):
        gt_map, gt_info = r.panoptic()
        try:
            with oracle_supplier_units(gt_map, oracle, k_errors):
                lab = gen.generate(r.image, r.points)
            pred = (lab.id_map, lab.segments_info)
            diags.append(lab.diagnostics)
        except Exception as exc:  # noqa: BLE001 - scored as empty, reported
            failed += 1
            print(f"  {method} image {r.image_id}: {type(exc).__name__}: {exc}", file=sys.stderr)
            lab = None
            pred = (np.zeros_like(gt_map), [])
        ev.process(gt_map, gt_info, *pred, image_id=r.image_id)
        if layouts is not None:
            ious = seeded_ious(lab, r) if lab is not None else {}
            for sid, grp in _thing_groups(r, layouts[i]).items():
                by_group[grp].append(ious.get(sid, 0.0))
    out = ev.evaluate()
    out["seconds"] = time.perf_counter() - t0
    out["cpu_seconds"] = time.process_time() - c0
    out["failed"] = failed
    out["err_row"] = max((d.get("marginal_error_row", 0.0) for d in diags), default=float("nan"))
    out["err_col"] = max((d.get("marginal_error_col", 0.0) for d in diags), default=float("nan"))
    out["diverged"] = sum(int(d.get("ot_diverged", 0)) for d in diags)
    out["fallbacks"] = sum(int(d.get("centroid_fallbacks", 0)) for d in diags)
    out["groups"] = {g: _group_pq(v) for g, v in by_group.items()}
    # pooled L1 error of the supplier units against the oracle (module docstring)
    out["k_err"] = sum(e for e, _ in k_errors) / max(sum(n for _, n in k_errors), 1) if k_errors else float("nan")
    return out


def _group_pq(ious: list[float]) -> dict:
    """Seeded PQ / SQ / RQ of a group of things (module docstring)."""
    a = np.asarray(ious, float)
    n, tp = len(a), a > 0.5
    return {
        "n": n,
        "pq": float(a[tp].sum() / n) if n else float("nan"),
        "sq": float(a[tp].mean()) if tp.any() else float("nan"),
        "rq": float(tp.mean()) if n else float("nan"),
        "miou": float(a.mean()) if n else float("nan"),
    }


def rows(p2m: dict) -> list[tuple[str, str, dict]]:
    """Table rows ``(label, method, params)``; ``p2m`` holds the maps and any ``--set`` keys."""
    ot = {**p2m, "assignment": "ot"}
    return [
        ("Voronoi", "voronoi", {}),
        ("PSPS", "psps", {}),
        ("P2M MinCost", "point2mask", {**p2m, "assignment": "mincost"}),
        ("P2M OT equal", "point2mask", {**ot, "supplier_scheme": "equal"}),
        ("P2M OT nearest_point", "point2mask", {**ot, "supplier_scheme": "nearest_point"}),
        ("P2M OT nearest_centroid", "point2mask", {**ot, "supplier_scheme": "nearest_centroid"}),
        ("P2M OT centroid T=80", "point2mask",
         {**ot, "supplier_scheme": "nearest_centroid", "solver": "reference", "n_iter": 80, "eps": 1e-3}),
        ("P2M OT centroid core 0.5", "point2mask", {**ot, "supplier_scheme": "nearest_centroid", "centroid_core": 0.5}),
        ("P2M OT oracle k", "point2mask", ot),  # diagnostic: ground-truth supplier units
    ]


def train(args, cats, base: dict) -> str:
    """Train a MapNet (``--train-steps``) on P1 points with the plain engine; return the checkpoint folder."""
    import logging
    import tempfile

    import torch
    from PIL import Image

    from pointseg.generators.point2mask import MapNetTrainable
    from pointseg.train.engine import fit_plain

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    n = args.train_images or args.images
    _, records, _ = load_dataset(args.dataset, n, args.point_seed, args.size, args.train_data_seed)
    ckpt = args.checkpoint or str(ROOT / "out" / f"point2mask_maps_{args.dataset}")
    images = Path(tempfile.mkdtemp(prefix="p2m-ablation-"))
    rows = []
    for r in records:  # the engine reads index rows: images on disk, points as JSON
        Image.fromarray(r.image).save(images / f"{r.image_id}.png")
        rows.append({"image_id": r.image_id, "file_name": str(images / f"{r.image_id}.png"), "height": r.height,
                     "width": r.width, "points": json.dumps(r.points.to_list())})
    trainable = MapNetTrainable(
        {"steps": args.train_steps, "image_size": args.train_size, "batch_size": args.train_batch, "lr": args.lr,
         "pseudo_every": args.pseudo_every, "pseudo_start": args.pseudo_start, "report_every": 20,
         "checkpoint_every": max(args.train_steps // 4, 1), "loss": {"loss_stride": args.loss_stride}},
        cats, {"generator": {k: v for k, v in base.items() if k not in ("maps", "checkpoint")}})
    t0, c0 = time.perf_counter(), time.process_time()
    res = fit_plain(trainable, rows, ckpt, resume=args.resume)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    last = {k: round(float(v), 3) for k, v in res.items() if k.startswith("loss")}
    print(f"# trained MapNet on {len(records)} {args.dataset} images (data seed {args.train_data_seed}): "
          f"steps {res['start_step']}->{res['step']} at {args.train_size}px, batch {args.train_batch}, "
          f"{wall:.0f} s wall, {cpu:.0f} s CPU ({torch.get_num_threads()} threads), "
          f"{trainable.cache.refreshes} pseudo-label refreshes -> {ckpt}", flush=True)
    print(f"# mean loss terms over the last report window: {last}", flush=True)
    return ckpt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="synthetic", choices=["synthetic", "coco-mini", "coco-panoptic"])
    ap.add_argument("--images", type=int, default=24, help="evaluation images")
    ap.add_argument("--size", type=int, default=128, help="synthetic image side")
    ap.add_argument("--data-seed", type=int, default=0, help="synthetic dataset seed of the evaluation images")
    ap.add_argument("--point-seed", type=int, default=0)
    ap.add_argument("--point-draws", type=int, default=1, help="score every image with this many P1 draws")
    ap.add_argument("--maps", default="lowlevel", choices=["lowlevel", "learned"])
    ap.add_argument("--checkpoint", default=None, help="MapNet checkpoint (--maps learned); written by --train-steps")
    ap.add_argument("--train-steps", type=int, default=0, help="train the MapNet first (implies --maps learned)")
    ap.add_argument("--train-images", type=int, default=0, help="training images (default: --images)")
    ap.add_argument("--train-data-seed", type=int, default=0, help="synthetic dataset seed of the training images")
    ap.add_argument("--train-size", type=int, default=128, help="square training / inference size of the MapNet")
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--loss-stride", type=int, default=1, help="L_sem^LAB / L_sem^RGB at 1/stride resolution")
    ap.add_argument("--pseudo-every", type=int, default=20, help="K: refresh an image's L_bou pseudo labels when K steps old")
    ap.add_argument("--pseudo-start", type=int, default=20, help="first step with L_bou")
    ap.add_argument("--resume", action="store_true", help="continue training from --checkpoint")
    ap.add_argument("--train-only", action="store_true", help="stop after training")
    ap.add_argument("--only", default=None, help="comma-separated row labels to run (default: all)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra Point2Mask config (YAML value), e.g. --set beta=1.0")
    args = ap.parse_args()
    base: dict = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        base[k] = yaml.safe_load(v)
    if args.train_steps:
        args.maps = "learned"
        from pointseg.data.synthetic import synthetic_categories

        cats = synthetic_categories() if args.dataset == "synthetic" else load_dataset(args.dataset, 1, 0)[0]
        args.checkpoint = train(args, cats, base)
        if args.train_only:
            return
    if args.maps == "learned":
        if not args.checkpoint:
            raise SystemExit("--maps learned needs --checkpoint PATH or --train-steps N")
        base.update(maps="learned", checkpoint=args.checkpoint)
    cats, records, layouts = load_dataset(args.dataset, args.images, args.point_seed, args.size, args.data_seed,
                                          args.point_draws)
    seed_note = f", data seed {args.data_seed}" if args.dataset == "synthetic" else ""
    print(f"# {args.dataset}, {len(records)} images{seed_note}, P1 points (seed {args.point_seed}), "
          f"{args.maps} maps, point2mask config {base}")
    head = (f"{'method':26s} {'PQ':>6s} {'PQ_th':>6s} {'SQ_th':>6s} {'RQ_th':>6s} {'PQ_st':>6s} "
            f"{'err_row':>8s} {'err_col':>8s} {'k err':>6s} {'wall s':>7s} {'cpu s':>7s}")
    print(head)
    print("-" * len(head))
    wanted = set(args.only.split(",")) if args.only else None
    results = []
    for label, method, params in rows(base):
        if wanted and label not in wanted:
            continue
        r = score(method, params, cats, records, layouts, oracle=label.endswith("oracle k"))
        results.append((label, r))
        f = lambda v: f"{100 * v:6.2f}" if v == v else "   nan"  # noqa: E731
        is_ot = method == "point2mask" and "MinCost" not in label
        e = lambda v: f"{v:8.1e}" if is_ot else f"{'-':>8s}"  # noqa: E731
        k_cell = lambda r: f"{r['k_err']:6.3f}" if is_ot and r["k_err"] == r["k_err"] else f"{'-':>6s}"  # noqa: E731
        extra = f"  failed={r['failed']}" if r["failed"] else ""
        extra += f"  diverged={r['diverged']}" if r["diverged"] else ""
        extra += f"  centroid_fallbacks={r['fallbacks']}" if r["fallbacks"] else ""
        print(f"{label:26s} {f(r['pq'])} {f(r['pq_th'])} {f(r['sq_th'])} {f(r['rq_th'])} {f(r['pq_st'])} "
              f"{e(r['err_row'])} {e(r['err_col'])} {k_cell(r)} {r['seconds']:7.1f} {r['cpu_seconds']:7.1f}{extra}", flush=True)
    if layouts is not None:
        n = {g: results[0][1]["groups"][g]["n"] for g in GROUPS}
        print(f"\n# seeded PQ / SQ / RQ of things by layout (n things: {n}); mIoU = mean seeded IoU")
        head = f"{'method':26s}" + "".join(f" {g + ' PQ':>15s} {'SQ':>5s} {'RQ':>5s} {'mIoU':>5s}" for g in GROUPS)
        print(head)
        print("-" * len(head))
        for label, r in results:
            cells = "".join(
                f" {100 * r['groups'][g]['pq']:15.2f} {100 * r['groups'][g]['sq']:5.1f} {100 * r['groups'][g]['rq']:5.1f} "
                f"{100 * r['groups'][g]['miou']:5.1f}" for g in GROUPS)
            print(f"{label:26s}{cells}", flush=True)


if __name__ == "__main__":
    main()
