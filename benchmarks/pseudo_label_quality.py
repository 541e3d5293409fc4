"""Pseudo-label quality of one generator beside the trivial baselines, on a fixed split: the shared harness.

What it does, per background protocol (``--background void|stuff|both``):

1. prepares the dataset with :func:`pointseg.data.prepare.prepare_inputs` into
   ``WORKDIR/data/<settings>/`` (index, ground truth, points), reused by every
   later run with the same dataset settings;
2. for a generator whose class says ``trains(config)`` (a
   :class:`~pointseg.generators.base.TrainableGenerator` without weights),
   trains ``cls.stage1`` with :func:`pointseg.train.engine.fit_plain` on ALL
   index rows (every image's clicks, never a ground-truth mask),
   ``context={"generator": params}``, into ``WORKDIR/stage1/<...>/`` (a rerun
   with the same data, params and ``--train-set`` reuses or resumes it), and
   labels with ``params.checkpoint`` set to it. Each protocol trains its own
   stage 1 (the label space differs: ``stuff`` adds the background class);
   ``--checkpoint`` gives one trained stage 1 to every protocol run. A
   generator that reads an untrained source (``cls.source_stage``, e.g.
   P2Seg's ``semantic_train``) has the source's stage 1 trained first the same
   way, its checkpoint handed over;
3. labels the images of the split in this process
   (:func:`pointseg.evaluation.label_rows`, ``--batch-size`` images per
   generator call) and scores them (:func:`pointseg.evaluation.score`): PQ,
   PQ_th, PQ_st, SQ, RQ, mIoU, mask AP, AP50, mean best IoU per object, with the
   number of images, failed images and seconds per image (decode included);
4. prints one table per protocol, the method and its baselines as rows.

Protocols (``dataset.background``): ``void`` = pixels outside every instance are
VOID (PQ over things only on coco-mini); ``stuff`` = the VOC-panoptic protocol,
one ``background`` stuff segment per image with one P1 click. They apply to
instance datasets (coco-mini); synthetic and coco-panoptic label their own stuff
and are scored once, as they are.

Split (``--split``): image ids sorted; ``choose`` = first half (settle settings
there), ``report`` = second half (quote figures from there; the default),
``all``. Stage 1 always trains on every image's clicks.

Commands (from the repo root; ``OMP_NUM_THREADS=1`` on a shared box)::

    # PSPS and Voronoi, coco-mini P1 seed 0, both protocols, the report half (40 images)
    python benchmarks/pseudo_label_quality.py --dataset coco-mini --background both --method psps
    # all 80 images
    python benchmarks/pseudo_label_quality.py --dataset coco-mini --background both --method psps --split all
    # Point2Mask, training-free maps, MinCost vs OT nearest-centroid (exact solver)
    python benchmarks/pseudo_label_quality.py --dataset coco-mini --background both --method point2mask \\
        --set maps=lowlevel --set assignment=mincost
    python benchmarks/pseudo_label_quality.py --dataset coco-mini --background both --method point2mask \\
        --set maps=lowlevel --set assignment=ot --set supplier_scheme=nearest_centroid --set solver=exact
    # ... with the k err of the centroid supplier units (point2mask_ablation's oracle)
    python benchmarks/pseudo_label_quality.py --dataset coco-mini --background stuff --method point2mask \\
        --set maps=lowlevel --set assignment=ot --k-error --baselines ""
    # synthetic default (24 images 128², P1 seed 0), all images: the `make demo` figures
    python benchmarks/pseudo_label_quality.py --dataset synthetic --images 24 --split all --method psps
    # a trainable generator: stage 1 on all 80 images' clicks, then labels; JSON for scripts
    python benchmarks/pseudo_label_quality.py --dataset coco-mini --background both --method epld \\
        --train-set steps=500 --json out/epld.json
    # reuse a trained stage 1 / only train it
    python benchmarks/pseudo_label_quality.py ... --checkpoint WORKDIR/stage1/<folder>
    python benchmarks/pseudo_label_quality.py ... --train-only

    # what a pipeline config trains and labels (its generator method, params and stage-1 settings)
    python benchmarks/pseudo_label_quality.py --dataset coco-mini --background stuff --split report \\
        --config configs/epld_coco_mini.yaml

``--set key=value`` (repeatable, YAML-parsed values) sets generator params;
``--train-set key=value`` the stage-1 config (``cls.stage1.Config``);
``--method`` is any ``GENERATORS`` name or ``module:Class``; ``--k-error``
(Point2Mask) adds the ``k err`` of ``benchmarks/point2mask_ablation.py`` (the
L1 error of the supplier units against ground truth); ``--baselines``
defaults to ``voronoi,psps`` for P1/P10 and to ``box`` for extreme points (when
it exists). ``--json OUT`` writes every figure, per-image PQ / mean best IoU and
the failed images with their reasons.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import yaml  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing

from pointseg.config import (DatasetConfig, GeneratorSection, PointsConfig, SyntheticDataConfig, deep_merge,  # noqa: E402
                             read_yaml, validate)
from pointseg.data.prepare import clear_dir, join, load_categories, prepare_inputs, read_index  # noqa: E402
from pointseg.evaluation import (SPLITS, GroundTruth, comparison_sheet, contrasting_images, label_rows,  # noqa: E402
                                 labels_by_id, reference_baseline, score, split_rows)
from pointseg.viz.overlay import save_png  # noqa: E402
from pointseg.fingerprint import config_hash  # noqa: E402
from pointseg.generators import GENERATORS, generator_class  # noqa: E402
from pointseg.train.engine import fit_plain  # noqa: E402

#: The real data beside the repo (never part of it): ``../shared/data``, or ``../../shared/data`` for a git
#: worktree kept in a folder beside the main clone; ``--data-root`` points anywhere else.
SHARED = next((p for p in (ROOT.parent / "shared" / "data", ROOT.parent.parent / "shared" / "data") if p.exists()),
              ROOT.parent / "shared" / "data")
#: Table columns: (header, result key).
COLUMNS = (("PQ", "pq"), ("PQ_th", "pq_th"), ("PQ_st", "pq_st"), ("SQ", "sq"), ("RQ", "rq"), ("mIoU", "miou"),
           ("mask AP", "mask_ap"), ("AP50", "mask_ap50"), ("mean best IoU", "mean_best_iou"))


def parse_sets(items: list[str], flag: str) -> dict:
    """``["a=1", "b.c=x"]`` -> ``{"a": 1, "b": {"c": "x"}}`` (values parsed as YAML)."""
    out: dict = {}
    for kv in items:
        if "=" not in kv:
            raise SystemExit(f"{flag} {kv!r}: expected KEY=VALUE")
        key, value = kv.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def dataset_config(args, background: str) -> DatasetConfig:
    """The :class:`DatasetConfig` of ``--dataset`` (real data under ``--data-root``, default ``../shared/data``)."""
    if args.dataset == "synthetic":
        return DatasetConfig(kind="synthetic", synthetic=SyntheticDataConfig(
            num_images=args.images or 24, height=args.size, width=args.size, seed=args.data_seed))
    root = Path(args.data_root)
    folder = root / ("coco-mini" if args.dataset == "coco-mini" else "coco-panoptic-samples")
    if not folder.exists():
        raise SystemExit(f"{args.dataset} not found at {folder}: the real data lives in ../shared/data beside the repo "
                         "and is not part of it; pass --data-root DIR, or use --dataset synthetic")
    if args.dataset == "coco-mini":
        return DatasetConfig(kind="coco_instances", annotations=str(folder / "annotations" / "instances_train2017.json"),
                             images=str(folder / "train2017"), background=background, max_images=args.images)
    return DatasetConfig(kind="coco_panoptic", annotations=str(folder / "panoptic_examples.json"),
                         panoptic_dir=str(folder / "panoptic_examples"), images=str(folder / "images"),
                         max_images=args.images)


def protocols(args) -> list[str]:
    """Background protocols to run: both only apply to instance datasets."""
    wanted = ["void", "stuff"] if args.background == "both" else [args.background]
    if args.dataset != "coco-mini":
        if "stuff" in wanted:
            print(f"# note: --background {args.background} applies to instance datasets; {args.dataset} labels its "
                  "own stuff and is scored as it is")
        return ["native"]
    return wanted


def prepare(args, background: str) -> tuple[str, dict, str]:
    """``(output root, categories, data key)``; reuses a folder prepared with the same settings."""
    ds = dataset_config(args, "void" if background == "native" else background)
    pts = PointsConfig(scheme=args.points, seed=args.point_seed)
    settings = {"dataset": ds.model_dump(mode="json"), "points": pts.model_dump(mode="json")}
    key = config_hash(settings)
    name = f"{args.dataset}-{background}-{args.points}-s{args.point_seed}-n{args.images or 'all'}-{key}"
    out = str(Path(args.workdir) / "data" / name)
    marker = Path(out) / "prepared.json"
    if marker.exists() and json.loads(marker.read_text()).get("settings") == settings:
        return out, load_categories(join(out, "categories.json")), key
    clear_dir(out)
    t0 = time.perf_counter()
    cats, rep = prepare_inputs(ds, pts, out)
    marker.write_text(json.dumps({"settings": settings, "report": rep.to_dict(),
                                  "seconds": time.perf_counter() - t0}, indent=1))
    return out, cats, key


def train_stage1(args, cls, params, cats, out: str, data_key: str, train_cfg=None) -> tuple[str, dict]:
    """Train ``cls.stage1`` on every index row of ``out`` with ``train_cfg`` (default: ``--train-set``);
    returns ``(checkpoint, info)``."""
    if train_cfg is None:
        train_cfg = cls.stage1.Config.model_validate(deep_merge(args.config_train or {},
                                                                parse_sets(args.train_set, "--train-set")))
    run_key = config_hash({"method": cls.name, "params": params.model_dump(mode="json"),
                           "train": train_cfg.model_dump(mode="json"), "data": data_key})
    ckpt = str(Path(args.workdir) / "stage1" / f"{cls.name}-{data_key}-{run_key}")
    rows = read_index(join(out, "index", "index.parquet"))
    trainable = cls.stage1(train_cfg, cats, context={"generator": params})
    print(f"# stage 1 ({cls.stage1.name}): {train_cfg.steps} steps on all {len(rows)} images' clicks -> {ckpt}",
          flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    res = fit_plain(trainable, rows, ckpt, log_dir=ckpt + ".logs")
    info = {"checkpoint": ckpt, "wall_seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "steps": res.get("step"), "start_step": res.get("start_step"), "last_loss": res.get("loss"),
            "skipped_rows": res.get("skipped_rows"), "skip_reasons": res.get("skip_reasons")}
    print(f"# stage 1 done: steps {info['start_step']}->{info['steps']} in {info['wall_seconds']:.0f} s wall, "
          f"{info['cpu_seconds']:.0f} s CPU; last loss {info['last_loss']}; skipped rows {info['skipped_rows']}",
          flush=True)
    return ckpt, info


def labels_with_k_error(gen, rows, gt: GroundTruth, record: list, progress: bool):
    """:func:`label_rows` one image at a time inside the Point2Mask ablation's ``oracle_supplier_units``
    (ground-truth supplier units recorded, not used), which appends ``(L1 error of k, pixels)`` per
    transport problem to ``record``."""
    from point2mask_ablation import oracle_supplier_units  # benchmarks/ is this script's folder

    for row in tqdm(rows, desc="label (k err)", unit="img", disable=not progress):
        with oracle_supplier_units(gt.load(int(row["image_id"]))[0], False, record):
            yield from label_rows(gen, [row], 1, progress=False)


def run_method(method: str, params: dict, cats, out: str, rows, args, k_error: bool = False) -> dict:
    gen = generator_class(method)(params, cats)
    gt = GroundTruth(out)
    t0 = time.perf_counter()
    k_record: list = []
    labelled = (labels_with_k_error(gen, rows, gt, k_record, not args.quiet) if k_error
                else label_rows(gen, rows, args.batch_size, progress=not args.quiet))
    res = score(labelled, gt, cats)
    res["seconds"] = time.perf_counter() - t0
    res["seconds_per_image"] = res["label_seconds"] / max(res["num_images"], 1)
    if k_error:
        pixels = sum(n for _, n in k_record)
        res["k_err"] = sum(e for e, _ in k_record) / pixels if pixels else None
        res["k_err_problems"] = len(k_record)
    return res


def generator_settings(args) -> dict:
    """With ``--config``: set ``args.method`` and ``args.config_train`` from the pipeline config's ``generator``
    section (validated as the pipeline validates it) and return its params as written; else ``{}``."""
    args.config_train = None
    if not args.config:
        args.method = args.method or "psps"
        return {}
    section = (read_yaml(args.config) or {}).get("generator") or {}
    try:
        validate(GeneratorSection, section, source=args.config)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    method = section.get("method", "psps")
    if args.method and args.method != method:
        raise SystemExit(f"--method {args.method} but {args.config} has generator.method {method}")
    args.method = method
    args.config_train = section.get("train") or None
    print(f"# {args.config}: generator {method}, its params and stage-1 train settings (then --set / --train-set)")
    return section.get("params") or {}


def default_baselines(args) -> list[str]:
    if args.baselines is not None:
        return [b for b in args.baselines.split(",") if b]
    if args.points == "extreme":
        if "box" in GENERATORS:
            return ["box"]
        print("# note: the filled-box baseline for extreme points is not in GENERATORS yet; no baseline row")
        return []
    return ["voronoi", "psps"]


def fmt_table(title: str, rows: list[tuple[str, dict]]) -> str:
    head = f"{'method':30s}" + "".join(f" {h:>7s}" if len(h) <= 7 else f" {h:>13s}" for h, _ in COLUMNS)
    head += f" {'#images':>7s} {'#failed':>7s} {'s/img':>7s}"
    lines = [title, head, "-" * len(head)]
    for name, r in rows:
        cells = ""
        for h, k in COLUMNS:
            v = r.get(k)
            w = 7 if len(h) <= 7 else 13
            cells += f" {'-':>{w}s}" if v is None else f" {100 * v:{w}.2f}"
        lines.append(f"{name[:30]:30s}{cells} {r['num_images']:7d} {len(r['failed']):7d} "
                     f"{r['seconds_per_image']:7.3f}")
    return "\n".join(lines)


def draw_gallery(args, background: str, table: list[tuple[str, dict]], params, cats, gt: GroundTruth,
                 rows) -> dict:
    """``--gallery K``: the K contrasting images (:func:`pointseg.evaluation.contrasting_images` of the method
    against the first baseline, psps first if listed), labelled again by every row of ``table`` (the trained
    generators are deterministic: these are the scored labels) and drawn with
    :func:`pointseg.evaluation.comparison_sheet`; ``{"png", "image_ids", "reference"}``."""
    method, res = table[0]
    reference = reference_baseline(name for name, _ in table[1:])
    ref_scores = dict(table)[reference]["per_image"] if reference else {
        i: {"mean_best_iou": 0.0} for i in res["per_image"]}  # no baseline: its best and worst images
    ids = contrasting_images(res["per_image"], ref_scores, args.gallery)
    by_id = {int(r["image_id"]): r for r in rows}
    chosen = [by_id[i] for i in ids]
    methods = [(name, labels_by_id(generator_class(name)(params if name == method else {}, cats), chosen,
                                   args.batch_size), r["per_image"]) for name, r in table]
    sheet = comparison_sheet(chosen, methods, gt, cats)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in method)
    png = Path(args.workdir) / "gallery" / f"{safe}-{args.dataset}-{background}-{args.split}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    save_png(str(png), sheet)
    return {"png": str(png), "image_ids": ids, "reference": reference}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="synthetic", choices=["synthetic", "coco-mini", "coco-panoptic"])
    ap.add_argument("--data-root", default=str(SHARED), help="folder holding coco-mini/ and coco-panoptic-samples/")
    ap.add_argument("--images", type=int, default=None, help="first N images (synthetic default 24; coco: all)")
    ap.add_argument("--size", type=int, default=128, help="synthetic image side")
    ap.add_argument("--data-seed", type=int, default=0, help="synthetic dataset seed")
    ap.add_argument("--background", default="void", choices=["void", "stuff", "both"])
    ap.add_argument("--points", default="p1", choices=["p1", "p10", "extreme"])
    ap.add_argument("--point-seed", type=int, default=0)
    ap.add_argument("--split", default="report", choices=SPLITS,
                    help="image ids sorted: choose = first half, report = second half (default), all")
    ap.add_argument("--method", default=None, help="a GENERATORS name or module:Class (default psps, or --config's)")
    ap.add_argument("--config", default=None, metavar="PIPELINE_YAML",
                    help="take the generator's method, params and stage-1 train settings from a pipeline config "
                         "(e.g. configs/epld_coco_mini.yaml), with --set / --train-set on top; the data, points and "
                         "split stay this script's flags")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="generator param (YAML value)")
    ap.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                    help="stage-1 config of a trainable generator (YAML value)")
    ap.add_argument("--checkpoint", default=None, help="a trained stage-1 checkpoint folder: no training")
    ap.add_argument("--train-only", action="store_true", help="train stage 1 and stop")
    ap.add_argument("--baselines", default=None, help="comma-separated generator names (default: by --points)")
    ap.add_argument("--batch-size", type=int, default=8, help="images per generator call")
    ap.add_argument("--workdir", default=str(ROOT / "out" / "quality"),
                    help="prepared data and stage-1 checkpoints (reused across runs)")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--k-error", action="store_true",
                    help="point2mask: also measure the k err of benchmarks/point2mask_ablation.py (labels one image "
                         "at a time)")
    ap.add_argument("--gallery", type=int, default=0, metavar="K",
                    help="also draw K images of the split side by side (image + clicks, ground truth, the method, "
                         "its baselines) into WORKDIR/gallery/: the K/2 where the method's mean best IoU beats the "
                         "first baseline's (psps if listed) by most, and the K/2 where it loses by most")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.gallery < 0:
        raise SystemExit(f"--gallery must be >= 0, got {args.gallery}")

    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pointseg.train").setLevel(logging.INFO)

    config_params = generator_settings(args)
    cls = generator_class(args.method)
    try:
        params = cls.Config.model_validate(deep_merge(config_params, parse_sets(args.set, "--set")))
    except ValueError as e:  # pydantic's ValidationError: name the key and the reason, no traceback
        raise SystemExit(f"{args.method} params (--config / --set): {e}") from None
    if args.checkpoint:
        if "checkpoint" not in type(params).model_fields:
            raise SystemExit(f"--checkpoint: {args.method} has no checkpoint parameter")
        params = params.model_copy(update={"checkpoint": args.checkpoint})
    baselines = [b for b in default_baselines(args) if b != args.method]
    for b in baselines:
        generator_class(b)  # an unknown name fails before any work

    results: dict = {"settings": {k: v for k, v in vars(args).items()}, "protocols": {}}
    for background in protocols(args):
        out, cats, data_key = prepare(args, background)
        gt = GroundTruth(out)
        index = read_index(join(out, "index", "index.parquet"))
        rows = split_rows(gt.rows(index), args.split)
        proto: dict = {"data": out, "index_rows": len(index), "rows_with_gt": len(gt.rows(index)), "rows": {}}
        run_params = params
        source = cls.source_stage(params)
        if source is not None:  # e.g. P2Seg's semantic_train: the source's stage 1 first, on the same clicks
            ckpt, proto["source_stage1"] = train_stage1(args, generator_class(source.method), source.params, cats, out,
                                                        data_key, source.train)
            run_params = run_params.model_copy(update=source.attach(ckpt))
        if cls.trains(run_params):
            ckpt, proto["stage1"] = train_stage1(args, cls, run_params, cats, out, data_key)
            run_params = run_params.model_copy(update={"checkpoint": ckpt})
        if args.train_only:
            results["protocols"][background] = proto
            continue
        table = [(args.method, run_method(args.method, run_params, cats, out, rows, args, k_error=args.k_error))]
        table += [(b, run_method(b, {}, cats, out, rows, args)) for b in baselines]
        proto["rows"] = {name: r for name, r in table}
        results["protocols"][background] = proto
        ids = [int(r["image_id"]) for r in rows]
        span = f"ids {min(ids)}..{max(ids)}" if ids else "no images"
        print()
        print(fmt_table(f"## {args.dataset}, background {background}, {args.points.upper()} seed {args.point_seed}, "
                        f"split {args.split} ({len(rows)} of {len(gt.rows(index))} images, {span}); "
                        f"{args.method} {run_params.model_dump(exclude_unset=True) or '(default params)'}", table))
        if args.k_error:
            r = table[0][1]
            print(f"k err of {args.method} (L1 error of the supplier units k against ground truth, as a fraction "
                  f"of the transported pixels; point2mask_ablation.oracle_supplier_units): "
                  + (f"{r['k_err']:.3f} over {r['k_err_problems']} transport problems" if r["k_err"] is not None
                     else "no transport problem was solved"))
        if proto.get("stage1"):
            s = proto["stage1"]
            print(f"stage-1 training: {s['wall_seconds']:.0f} s wall ({s['cpu_seconds']:.0f} s CPU), "
                  f"steps {s['start_step']}->{s['steps']}")
        for name, r in table:
            for image_id, reason in sorted(r["failed"].items()):
                print(f"  failed [{name}] image {image_id}: {reason}")
        if args.gallery and rows:
            proto["gallery"] = draw_gallery(args, background, table, run_params, cats, gt, rows)
            print(f"# gallery ({len(proto['gallery']['image_ids'])} images): {proto['gallery']['png']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        print(f"# results written to {args.json}")
    return results


if __name__ == "__main__":
    main()
