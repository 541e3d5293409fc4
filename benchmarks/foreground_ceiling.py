"""What a perfect foreground decision is worth: PSPS's geodesic split kept inside the ground-truth foreground.

A diagnostic ceiling, not a method (it reads the ground truth). On coco-mini
with P1 clicks it labels the chosen half of the images in three ways:

* ``psps``: PSPS as it is (every pixel to the nearest click in its geodesic
  cost, paths across the whole image);
* ``gt fg dilated D``: the ground-truth thing pixels, grown by ``D`` pixels
  (a 3 x 3 dilation ``D`` times: a foreground decision that errs towards the
  background), are the foreground. Thing clicks split it with PSPS's cost, but
  every path stays inside it (:func:`pointseg.geodesic.split_within`); a
  foreground part no click reaches from inside takes the open split. Pixels
  outside it are VOID in the ``void`` protocol and go to the nearest stuff
  click (the one ``background`` click) in the ``stuff`` protocol.

* ``learned fg``, with ``--foreground-checkpoint CK``: the foreground is the
  thing pixels of a trained EPLD network's ``stuff``-protocol labels
  (``--foreground-config``'s generator params, default the kept
  ``configs/epld_coco_mini.yaml``), which use each image's ``background``
  click. In the ``void`` protocol this reads a click that protocol does not
  have: it asks what the learned decision would add there if it could be
  made, i.e. whether the void target is out of reach of the decision itself.
  In ``void`` a second row, ``outside filled``, gives the pixels outside that
  foreground PSPS's open split instead of VOID (the foreground only keeps the
  split's paths inside it, as EPLD's ``split_within: foreground``).

* ``clicks-only fg, void Q``, with ``--pu-checkpoint CK`` (a ``void``-protocol
  EPLD network, trained on the thing clicks alone): a foreground decision
  learned from every image's thing clicks and nothing else, as the ``void``
  protocol allows. A linear positive-unlabelled classifier (Elkan & Noto 2008,
  :func:`pu_classifier`) separates the network's ``F^fuse`` at the clicks of
  all the images (the labelled positives) from ``F^fuse`` at every
  :data:`PU_UNLABELLED_STRIDE`-th cell of every image (unlabelled: foreground
  and background alike); its logit minus ``--pu-distance`` per tenth of the
  image diagonal from the nearest click (a spatial prior: a click's object is
  around it) scores each cell, bilinearly resized to the image. PSPS's open
  split is kept, and the fraction ``Q`` of each image's pixels that score
  lowest is VOID (the click pixels stay labelled). No VOID at all is the
  ``psps`` row.

Each row prints PQ, PQ_th, mask AP / AP50 and the mean best IoU per object
(:func:`pointseg.evaluation.score`). The gap between ``psps`` and ``gt fg``
bounds what any learned foreground / background decision can add to PSPS's
split; ``void`` counts only how the things share the foreground, ``stuff``
also counts the background. This is how EPLD's ``split_within: foreground``
and the void-protocol target of the EPLD issue are read (README "Measured").

Commands (from the repo root)::

    python benchmarks/foreground_ceiling.py --background both --split report
    python benchmarks/foreground_ceiling.py --background void --split choose --dilate 0,3,8,16
    python benchmarks/foreground_ceiling.py --background both --split report --dilate 0,8 \
        --foreground-checkpoint out/quality/stage1/epld-<data>-<run>
    python benchmarks/foreground_ceiling.py --background void --split choose --dilate '' \
        --pu-checkpoint out/quality/stage1/epld-<void data>-<run> --pu-void 0.1,0.3,0.5 --pu-distance 1
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
from pointseg.generators.psps import PSPSConfig, cells_read_by, geodesic_cost, scaled_points, upsample_labels  # noqa: E402
from pointseg.geodesic import nearest_source, split_within  # noqa: E402
from pointseg.train.rows import index_record  # noqa: E402


def foreground(gt_map: np.ndarray, gt_info: list[dict], cats, dilate: int) -> np.ndarray:
    """``(H, W) bool``: the ground truth's thing pixels, dilated ``dilate`` times by a 3 x 3 square."""
    things = [s["id"] for s in gt_info if cats[s["category_id"]].isthing and not s.get("iscrowd", 0)]
    fg = np.isin(gt_map, things)
    if dilate:
        fg = cv2.dilate(fg.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=dilate) > 0
    return fg


def split_inside(image, points, groups, fg: np.ndarray | None, cfg: PSPSConfig, fill: bool = False) -> np.ndarray:
    """Group index per pixel (``-1`` = VOID): PSPS, or with ``fg`` the split kept inside ``fg`` (module doc);
    ``fill``: without a stuff click, the pixels outside ``fg`` take PSPS's open split instead of VOID."""
    height, width = image.shape[:2]
    cost, (h, w) = geodesic_cost(image, cfg.downscale, cfg.blur_sigma, cfg.beta)
    cells = scaled_points(points, height, width, h, w)
    group_of = group_of_points(groups, len(points))
    if fg is None:
        return upsample_labels(nearest_source(cost, cells, labels=group_of)[1], height, width)
    thing = np.array([groups[g].isthing for g in group_of])
    inside = cells_read_by(fg, h, w)
    inside[cells[thing, 0], cells[thing, 1]] = True
    # a foreground part without a click: the open split among the things
    label = split_within(lambda edges: nearest_source(edges, cells[thing], labels=group_of[thing])[1], cost, inside)
    if (~thing).any():  # outside: the nearest stuff click
        stuff = nearest_source(cost, cells[~thing], labels=group_of[~thing])[1]
        label = np.where(inside, label, stuff)
    if fill and not (~thing).any():
        label = np.where(inside, label, nearest_source(cost, cells, labels=group_of)[1])
    full = upsample_labels(label, height, width)
    return full if (~thing).any() or fill else np.where(fg, full, -1)


def learned_foregrounds(args, split: str) -> dict[int, np.ndarray]:
    """``{image_id: (H, W) bool}``: the thing pixels of the ``--foreground-checkpoint`` EPLD network's labels in the
    ``stuff`` protocol (its ``background`` click included), with ``--foreground-config``'s generator params."""
    from pointseg.config import read_yaml
    from pointseg.evaluation import label_rows
    from pointseg.generators import generator_class

    section = (read_yaml(args.foreground_config) or {}).get("generator") or {}
    cls = generator_class(section.get("method", "psps"))
    params = {**(section.get("params") or {}), "checkpoint": args.foreground_checkpoint}
    out, cats, _ = prepare(args, "stuff")
    gt = GroundTruth(out)
    rows = gt.rows(split_rows(read_index(join(out, "index", "index.parquet")), split))
    gen = cls(params, cats)
    fgs: dict[int, np.ndarray] = {}
    for row, label, err in label_rows(gen, rows, 8, progress=not args.quiet):
        if label is None:
            raise SystemExit(f"image {row['image_id']}: the foreground network failed: {err}")
        things = [s["id"] for s in label.segments_info if s["isthing"]]
        fgs[int(row["image_id"])] = np.isin(label.id_map, things)
    return fgs


#: Every how many cells of the ``F^fuse`` grid (row-major) one is an unlabelled sample of the PU classifier.
PU_UNLABELLED_STRIDE = 7


def pu_classifier(positives: np.ndarray, unlabelled: np.ndarray, l2: float = 1e-3,
                  iterations: int = 300) -> tuple[np.ndarray, float]:
    """A linear positive-unlabelled classifier (Elkan & Noto 2008): ``(w (D,), b)``.

    Logistic regression of the labelled positives ``(P, D)`` against the
    unlabelled samples ``(U, D)``, each set weighted to half the loss, plus
    ``l2 * ||w||^2``, minimised by L-BFGS from zero. When the labelled
    positives are a random sample of all the positives, ``w . x + b`` ranks
    samples as ``P(positive | x)`` does (Elkan & Noto's Lemma 1), so a threshold
    on it is a foreground decision that needs no negative example.
    """
    x = torch.from_numpy(np.concatenate([positives, unlabelled])).double()
    y = torch.cat([torch.ones(len(positives)), torch.zeros(len(unlabelled))]).double()
    weight = torch.where(y > 0, 0.5 / len(positives), 0.5 / len(unlabelled))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (weight * torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none")).sum()
        loss = loss + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), float(b.detach())


def pu_foregrounds(args, split: str, distance: float) -> dict[int, np.ndarray]:
    """``{image_id: (H, W) float}``: how foreground-like each pixel is, learned from the thing clicks alone with
    the ``--pu-checkpoint`` void-protocol EPLD network's ``F^fuse`` (module docstring); higher is more
    foreground. The classifier is fitted on every image's clicks (as stage 1 trains on them), scores ``split``."""
    from pointseg.generators.epld.generator import EPLDGenerator, unit_features

    out, cats, _ = prepare(args, "void")
    gt = GroundTruth(out)
    index = read_index(join(out, "index", "index.parquet"))
    chosen = {int(r["image_id"]) for r in split_rows(index, split)}
    gen = EPLDGenerator({"checkpoint": args.pu_checkpoint}, cats)
    rows = gt.rows(split_rows(index, "all"))
    cells: dict[int, tuple] = {}  # image id -> (unit F^fuse (D, h, w), click cells (K, 2), (H, W))
    for start in tqdm(range(0, len(rows), 8), desc="F^fuse", unit="batch", disable=args.quiet):
        recs = [index_record(dict(r), cats) for r in rows[start : start + 8]]
        fuse = gen.fuse_features([r.image for r in recs], [r.points for r in recs])
        for r, rec, f in zip(rows[start : start + 8], recs, fuse):
            height, width = rec.image.shape[:2]
            things = np.array([cats[int(c)].isthing for c in rec.points.category_id], bool)
            grid = unit_features(f, tuple(f.shape[-2:]))
            cells[int(r["image_id"])] = (grid, scaled_points(rec.points, height, width, *grid.shape[1:])[things],
                                         (height, width))
    positives = np.concatenate([g[:, c[:, 0], c[:, 1]].T for g, c, _ in cells.values()])
    unlabelled = np.concatenate([g.reshape(len(g), -1).T[::PU_UNLABELLED_STRIDE] for g, _, _ in cells.values()])
    w, b = pu_classifier(positives, unlabelled)
    scores = {}
    for image_id, (grid, clicks, (height, width)) in cells.items():
        if image_id not in chosen:
            continue
        h, w_ = grid.shape[1:]
        logit = np.tensordot(w, grid, axes=1) + b
        if distance and len(clicks):
            yy, xx = np.mgrid[0:h, 0:w_]
            near = np.min([np.hypot(yy - cy, xx - cx) for cy, cx in clicks], axis=0)
            logit = logit - distance * near / (0.1 * np.hypot(h, w_))
        scores[image_id] = cv2.resize(logit.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return scores


def foreground_auc(score: np.ndarray, fg: np.ndarray) -> float:
    """The area under the ROC curve of ``score`` separating ``fg`` from the rest (the Mann-Whitney U over the
    pixels, ties counted half); NaN when ``fg`` is all or none of them."""
    from scipy.stats import rankdata

    fg = np.asarray(fg, bool).ravel()
    pos, neg = int(fg.sum()), int((~fg).sum())
    if not pos or not neg:
        return float("nan")
    ranks = rankdata(np.asarray(score, np.float64).ravel())
    return float((ranks[fg].sum() - pos * (pos + 1) / 2) / (pos * neg))


def void_least_foreground(label: np.ndarray, score: np.ndarray, fraction: float, keep: np.ndarray) -> np.ndarray:
    """``label`` (H, W) with the ``fraction`` of its pixels that score lowest set to -1 (VOID), except the pixels
    at ``keep`` ``(K, 2)`` (row, column; the clicks)."""
    out = label.copy()
    if fraction > 0:
        cut = score < np.quantile(score, fraction)
        cut[keep[:, 0], keep[:, 1]] = False
        out[cut] = -1
    return out


def labelled_pu(rows, cats, scores: dict, fraction: float, progress: bool):
    """PSPS's open split of each row with :func:`void_least_foreground` of its clicks-only score."""
    cfg = PSPSConfig()
    for row in tqdm(rows, desc=f"clicks-only fg {fraction:g}", unit="img", disable=not progress):
        rec = index_record(dict(row), cats)
        groups = seed_groups(rec.points, cats)
        height, width = rec.image.shape[:2]
        label = split_inside(rec.image, rec.points, groups, None, cfg)
        label = void_least_foreground(label, scores[int(row["image_id"])], fraction, rec.points.pixels(height, width))
        yield row, assemble(label, groups), ""


def labelled(rows, gt: GroundTruth, cats, dilate: int | None, progress: bool, learned: dict | None = None,
             fill: bool = False):
    """PSPS's split of each row: open (``dilate`` None), inside the ground-truth foreground grown by ``dilate``,
    or inside ``learned[image_id]`` (``fill``: see :func:`split_inside`)."""
    cfg = PSPSConfig()
    for row in tqdm(rows, desc="learned fg" if learned else f"dilate {dilate}", unit="img", disable=not progress):
        rec = index_record(dict(row), cats)
        groups = seed_groups(rec.points, cats)
        if learned is not None:
            if int(row["image_id"]) not in learned:
                raise SystemExit(f"image {row['image_id']} has no learned foreground (not in the stuff protocol's rows)")
            fg = learned[int(row["image_id"])]
        else:
            fg = None if dilate is None else foreground(*gt.load(int(row["image_id"])), cats, dilate)
        yield row, assemble(split_inside(rec.image, rec.points, groups, fg, cfg, fill), groups), ""


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--background", default="both", choices=["void", "stuff", "both"])
    ap.add_argument("--split", default="report", choices=SPLITS)
    ap.add_argument("--dilate", default="0,3,8", help="comma-separated dilations of the ground-truth foreground")
    ap.add_argument("--data-root", default=str(SHARED))
    ap.add_argument("--images", type=int, default=None, help="first N images (default: all 80)")
    ap.add_argument("--workdir", default=str(ROOT / "out" / "quality"))
    ap.add_argument("--foreground-checkpoint", default=None,
                    help="also a row with a trained EPLD network's stuff-protocol foreground (module docstring)")
    ap.add_argument("--foreground-config", default=str(ROOT / "configs" / "epld_coco_mini.yaml"),
                    help="pipeline config whose generator params label with --foreground-checkpoint")
    ap.add_argument("--pu-checkpoint", default=None,
                    help="also rows with a foreground learned from the thing clicks alone by this void-protocol "
                         "EPLD network's F^fuse (module docstring)")
    ap.add_argument("--pu-void", default="0.1,0.3,0.5",
                    help="comma-separated fractions of each image left VOID where the clicks-only score is lowest")
    ap.add_argument("--pu-distance", type=float, default=1.0,
                    help="logits the clicks-only score loses per tenth of the image diagonal from the nearest click")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if not (Path(args.data_root) / "coco-mini").exists():
        raise SystemExit(f"coco-mini not found under {args.data_root} (it lives in ../shared/data beside the repo)")
    args.dataset, args.points, args.point_seed, args.size, args.data_seed = "coco-mini", "p1", 0, 128, 0
    try:
        dilations = [int(d) for d in args.dilate.split(",") if d != ""]
        fractions = [float(q) for q in args.pu_void.split(",") if q.strip()]
    except ValueError:
        raise SystemExit(f"--dilate {args.dilate!r} / --pu-void {args.pu_void!r}: comma-separated numbers") from None
    if any(d < 0 for d in dilations):
        raise SystemExit(f"--dilate {args.dilate!r}: dilations are >= 0")
    if any(not 0 <= q < 1 for q in fractions):
        raise SystemExit(f"--pu-void {args.pu_void!r}: fractions in [0, 1)")
    if not (np.isfinite(args.pu_distance) and args.pu_distance >= 0):
        raise SystemExit(f"--pu-distance {args.pu_distance}: finite and >= 0")
    if args.pu_checkpoint and args.background != "void":
        raise SystemExit("--pu-checkpoint: a foreground from the thing clicks alone is for --background void (the "
                         "stuff protocol has a background click)")
    learned = learned_foregrounds(args, args.split) if args.foreground_checkpoint else None
    pu_scores = pu_foregrounds(args, args.split, args.pu_distance) if args.pu_checkpoint else None
    results = {}
    for background in (["void", "stuff"] if args.background == "both" else [args.background]):
        out, cats, _ = prepare(args, background)
        gt = GroundTruth(out)
        rows = gt.rows(split_rows(read_index(join(out, "index", "index.parquet")), args.split))
        table = []
        for dilate in [None, *dilations]:
            name = "psps" if dilate is None else f"gt fg dilated {dilate}"
            res = score(labelled(rows, gt, cats, dilate, not args.quiet), gt, cats)
            res["seconds_per_image"] = res["label_seconds"] / max(res["num_images"], 1)
            table.append((name, res))
        fills = [] if learned is None else [False, True] if background == "void" else [False]
        for fill in fills:  # "outside filled" only where no stuff click labels the outside
            res = score(labelled(rows, gt, cats, None, not args.quiet, learned, fill), gt, cats)
            res["seconds_per_image"] = res["label_seconds"] / max(res["num_images"], 1)
            table.append(("learned fg, outside filled" if fill else "learned fg", res))
        if pu_scores is not None:
            aucs = [foreground_auc(pu_scores[int(r["image_id"])], foreground(*gt.load(int(r["image_id"])), cats, 0))
                    for r in rows]
            print(f"# clicks-only foreground score vs the ground-truth thing pixels: mean AUC per image "
                  f"{np.nanmean(aucs):.3f} over {int(np.isfinite(aucs).sum())} images", flush=True)
            results["clicks_only_auc"] = float(np.nanmean(aucs))
        for fraction in fractions if pu_scores is not None else []:
            res = score(labelled_pu(rows, cats, pu_scores, fraction, not args.quiet), gt, cats)
            res["seconds_per_image"] = res["label_seconds"] / max(res["num_images"], 1)
            table.append((f"clicks-only fg, void {fraction:g}", res))
        print(fmt_table(f"\n# {background} protocol, {args.split} split: PSPS's split inside the ground-truth "
                        "foreground (a ceiling, module docstring)", table), flush=True)
        results[background] = {name: res for name, res in table}
    return results


if __name__ == "__main__":
    main()
