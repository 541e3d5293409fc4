"""Stage 2: train a STAGE2_MODELS row on the pseudo-label shards with Ray Train.

    python flows/train.py --config configs/train.yaml --output out/run [train.steps=400 ...]

Needs ``OUTPUT/shards`` (flows/pseudo_label.py or flows/full_pipeline.py first).

    shard rows (error == "" and image_id not in validation)
      -> TorchTrainer(train_loop_per_worker)       # operators/training.py: the one engine per worker
      -> OUTPUT/models/<train.run_name>/           # what flows/evaluate_model.py --checkpoint reads

Rerunning with the same ``train.run_name`` and ``train.storage_path`` resumes
from the latest checkpoint, epoch counter included. TensorBoard:
``tensorboard --logdir STORAGE/RUN/tensorboard``.
"""

from __future__ import annotations

import json

from common import StageTimer, init_ray, pipeline_args

from operators.training import train_stage2
from pointseg.data.prepare import join, load_categories
from pointseg.storage import OutputLock


def main() -> None:
    cfg, output = pipeline_args(__doc__, "configs/train.yaml")
    with OutputLock(output, "flows/train.py"):  # one run at a time per output folder
        categories = load_categories(join(output, "categories.json"))
        init_ray(cfg.ray)
        timer = StageTimer()
        with timer.stage("train"):
            out = train_stage2(cfg, categories, output)
        out.pop("history")
        print(json.dumps({**out, "seconds": timer.seconds}, indent=2, default=str))


if __name__ == "__main__":
    main()
