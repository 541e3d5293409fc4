"""Pseudo labels only: prepare the inputs, label them (Ray Data actors, or in-process when small),
export COCO panoptic.

    python flows/pseudo_label.py --config configs/full_pipeline.yaml --output DIR [key.path=value ...]

A trainable generator needs its stage-1 weights in ``generator.params.checkpoint``
(``flows/train_generator.py`` makes them).
"""

from __future__ import annotations

import json

from common import StageTimer, init_ray, pipeline_args

from operators.pseudo_label import export_panoptic, run_pseudo_labels
from pointseg.data.prepare import prepare_inputs
from pointseg.generators import generator_fingerprint
from pointseg.storage import OutputLock


def main() -> None:
    cfg, output = pipeline_args(__doc__, "configs/full_pipeline.yaml")
    with OutputLock(output, "flows/pseudo_label.py"):  # one run at a time per output folder
        timer = StageTimer()
        with timer.stage("prepare"):
            categories, prep = prepare_inputs(cfg.dataset, cfg.points, output, cfg.strict)
        fingerprint = generator_fingerprint(cfg.generator.method, cfg.generator.params)
        with timer.stage("pseudo_label"):
            counts = run_pseudo_labels(cfg, categories, output, fingerprint, ensure_ray=lambda: init_ray(cfg.ray))
        with timer.stage("export"):
            exported = export_panoptic(output, categories, fingerprint)
        print(json.dumps({"prepare": prep.to_dict(), **counts, "export": exported, "seconds": timer.seconds}, indent=2,
                         default=str))


if __name__ == "__main__":
    main()
