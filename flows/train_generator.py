"""Stage 1 of any trainable generator: train its network on the dataset's points with Ray Train.

    python flows/train_generator.py --config configs/point2mask_trained.yaml --output out/p2m [generator.train.steps=400 ...]

    prepare inputs (OUTPUT/index: image_id, file_name, height, width, points)
      -> TorchTrainer(train_loop_per_worker)        # operators/training.py: the one engine per worker
           generator_class.stage1: collate (index rows -> batch), loss; checkpoints to RunConfig(storage_path)/run_name
      -> OUTPUT/models/<generator.train.run_name>/  # what generator.params.checkpoint points at

``generator.train`` is typed by the method's stage-1 config. Rerunning with the
same ``generator.train.run_name`` and ``storage_path`` resumes from the latest
checkpoint (a finished run is not started again: its final checkpoint is exported). TensorBoard:
``tensorboard --logdir STORAGE/RUN/tensorboard``.
"""

from __future__ import annotations

import json

from common import StageTimer, init_ray, pipeline_args

from operators.training import train_generator
from pointseg.data.prepare import prepare_inputs
from pointseg.storage import OutputLock


def main() -> None:
    cfg, output = pipeline_args(__doc__, "configs/point2mask_trained.yaml")
    if cfg.generator.generator_class.stage1 is None:
        raise SystemExit(f"generator.method={cfg.generator.method} has no stage 1: it labels from the points alone")
    if not cfg.generator.needs_training():
        raise SystemExit(f"nothing to train: generator.params.checkpoint is set ({cfg.generator.params.checkpoint}), "
                         "generator.train.enabled is false, or this configuration uses no network")
    with OutputLock(output, "flows/train_generator.py"):  # one run at a time per output folder
        timer = StageTimer()
        with timer.stage("prepare"):
            categories, _ = prepare_inputs(cfg.dataset, cfg.points, output, cfg.strict)
        init_ray(cfg.ray)
        with timer.stage("generator_training"):
            out = train_generator(cfg, categories, output)
        out.pop("history")
        print(json.dumps({**out, "seconds": timer.seconds}, indent=2, default=str))
        print(f"label with: generator.params.checkpoint={out['checkpoint']}")


if __name__ == "__main__":
    main()
