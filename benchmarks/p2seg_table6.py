"""P2Seg Table 6 direction, training-free: S2I "Points First" against "Semantic Results First".

Both S2I variants read the same stage-1 semantic map, the PSPS pseudo labels
of the same P1 points turned into classes (``p2seg`` with ``use_network:
false``, :mod:`pointseg.generators.p2seg.s2i`). Every ground-truth thing is
paired with the pseudo mask its own point produced (P1: one point per object;
a point left without a mask scores IoU 0), as in Table 6: the number of pseudo
masks with IoU > 0.5 / 0.7 / 0.9 against their object and the mean IoU over
all objects. Paper (VOC, SAM semantic map): Points First 9544 / 7417 / 2558,
66.57; Semantic Results First 5782 / 4939 / 2440, 58.49.

PSPS's own instances and Voronoi are printed for reference (not part of Table 6).

    python benchmarks/p2seg_table6.py                       # coco-mini, 80 images, P1 seed 0
    python benchmarks/p2seg_table6.py --background stuff    # VOC-panoptic protocol (a background click)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

from point2mask_ablation import load_dataset, seeded_ious  # noqa: E402

from pointseg.data.coco import add_background_segment, background_category  # noqa: E402
from pointseg.data.points import sample_points, validate_points  # noqa: E402
from pointseg.generators import build_generator  # noqa: E402

ROWS = [
    ("Semantic Results First", "p2seg", {"use_network": False, "priority": "semantic"}),
    ("Points First", "p2seg", {"use_network": False, "priority": "points"}),
    ("(PSPS instances)", "psps", {}),
    ("(Voronoi)", "voronoi", {}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=80)
    ap.add_argument("--point-seed", type=int, default=0)
    ap.add_argument("--background", choices=["void", "stuff"], default="void")
    ap.add_argument("--psps", default="{}", help="PSPS params of the semantic map, as YAML")
    args = ap.parse_args()
    import yaml

    psps = yaml.safe_load(args.psps) or {}
    cats, records, _ = load_dataset("coco-mini", args.images, args.point_seed)
    if args.background == "stuff":
        bg = background_category(cats)
        cats = {**cats, bg.id: bg}
        records = [add_background_segment(r, bg.id) for r in records]
        for r in records:
            r.points, _ = validate_points(sample_points(r, "p1", args.point_seed), r.height, r.width, cats)
    print(f"coco-mini: {len(records)} images, P1 seed {args.point_seed}, background {args.background}, "
          f"semantic map: PSPS {psps}")
    print(f"{'method':24s} {'IoU>50':>7s} {'IoU>70':>7s} {'IoU>90':>7s} {'mean IoU':>9s} {'objects':>8s} "
          f"{'lost':>5s} {'boxes':>6s} {'s':>6s}")
    for name, method, params in ROWS:
        if method == "p2seg":
            params = {**params, "semantic_params": psps}
        elif method == "psps":
            params = psps
        gen = build_generator(method, params, cats)
        ious, lost, boxes = [], 0, 0
        t0 = time.perf_counter()
        for r in records:
            label = gen([r.image], [r.points])[0]
            objects = {int(s) for s, c in zip(r.points.segment, r.points.category_id) if cats[int(c)].isthing}
            ious += [v for k, v in seeded_ious(label, r).items() if k in objects]
            lost += int(label.diagnostics.get("lost_points", 0))
            boxes += int(label.diagnostics.get("default_boxes", 0))
        v = np.asarray(ious)
        print(f"{name:24s} {int((v > 0.5).sum()):7d} {int((v > 0.7).sum()):7d} {int((v > 0.9).sum()):7d} "
              f"{100 * v.mean():9.2f} {len(v):8d} {lost:5d} {boxes:6d} {time.perf_counter() - t0:6.1f}")


if __name__ == "__main__":
    main()
