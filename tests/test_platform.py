"""The platform contract end to end: a toy trainable generator (tests/toy_generator.py, under 80 lines:
a tiny net and its loss) trains through Ray Train, labels through the Ray Data actors and the COCO export,
named only in the config -- nothing in flows/ or operators/ knows it."""

from __future__ import annotations

import json

import torch

from conftest import ROOT
from pointseg.config import PipelineConfig, validate
from pointseg.data.prepare import iter_shard_rows
from pointseg.train.engine import load_trained


def test_the_toy_generator_is_small():
    assert len((ROOT / "tests" / "toy_generator.py").read_text().splitlines()) <= 80


def test_a_toy_trainable_generator_runs_through_the_pipeline(ray_local, tmp_path):
    import full_pipeline

    from tests.toy_generator import ToyTrainable

    out = tmp_path / "run"
    cfg = validate(PipelineConfig, {
        "output": str(out),
        "dataset": {"kind": "synthetic", "synthetic": {"num_images": 4, "height": 48, "width": 48, "seed": 7}},
        "generator": {"method": "tests.toy_generator:ToyGenerator",
                      "train": {"steps": 4, "batch_size": 2, "report_every": 1, "checkpoint_every": 2,
                                "storage_path": str(out / "stage1")}},
        "ray_data": {"num_actors": 1, "batch_size": 2, "min_images_for_ray": 0},
        "report": {"num_overlays": 1, "baselines": ["voronoi"]},
    })
    assert cfg.generator.needs_training()
    report = full_pipeline.run(cfg, str(out))
    g = report["generator_training"]
    assert g["steps"] == 4 and g["trained_steps"] == 4 and g["skipped_rows"] == 0
    net, meta = load_trained(g["checkpoint"], ToyTrainable)
    assert isinstance(net, torch.nn.Conv2d) and meta["step"] == 4
    assert report["images"]["path"] == "ray" and report["images"]["exported"] == 4 and not report["images"]["failed"]
    coco = json.loads((out / "panoptic.json").read_text())
    assert len(coco["annotations"]) == 4 and all(a["segments_info"] for a in coco["annotations"])
    assert report["pseudo_labels"]["pq"] is not None
    assert {r["method"] for r in iter_shard_rows(str(out / "shards"), ["method"])} == {"tests.toy_generator:ToyGenerator"}
