"""Each trainable method through the whole pipeline, tiny: stage 1 on Ray Train, labels from the Ray Data
actors with the trained checkpoint, the COCO export and the report -- configured by name only."""

from __future__ import annotations

import pytest

from pointseg.config import PipelineConfig, validate


def run(tmp_path, method: str, scheme: str, train: dict, params: dict | None = None, baselines=("voronoi",)) -> dict:
    import full_pipeline

    out = tmp_path / method
    cfg = validate(PipelineConfig, {
        "output": str(out),
        "dataset": {"kind": "synthetic", "synthetic": {"num_images": 4, "height": 64, "width": 64, "seed": 4}},
        "points": {"scheme": scheme},
        "generator": {"method": method, "params": params or {},
                      "train": {"batch_size": 2, "report_every": 1, "checkpoint_every": 2,
                                "storage_path": str(out / "stage1"), **train}},
        "ray_data": {"num_actors": 1, "batch_size": 2, "min_images_for_ray": 0},
        "report": {"num_overlays": 1, "baselines": list(baselines)},
        "review": {"enabled": False},
    })
    report = full_pipeline.run(cfg, str(out))
    g = report["generator_training"]
    assert g["trained_steps"] == train["steps"] and g["checkpoint"].endswith(cfg.generator.train.run_name)
    assert report["images"]["path"] == "ray" and report["images"]["exported"] == 4, report["images"]
    assert report["pseudo_labels"]["pq"] is not None
    return report


@pytest.mark.slow
def test_exits_from_extreme_points(ray_local, tmp_path):
    report = run(tmp_path, "exits", "extreme",
                 {"steps": 2, "warmup_steps": 1, "crop_size": 64, "max_objects_per_step": 4},
                 baselines=("box",))
    assert set(report["baselines"]) == {"box"} and report["method_summary"] is not None


@pytest.mark.slow
def test_epld_from_p1_points(ray_local, tmp_path):
    report = run(tmp_path, "epld", "p1",
                 {"steps": 2, "input_size": 64, "hidden_dim": 16, "layers": 2, "mask_stride": 8})
    assert report["method_summary"] is not None


@pytest.mark.slow
def test_p2seg_from_p1_points_trains_its_epld_source_first(ray_local, tmp_path):
    """P2Seg with ``semantic_source: epld`` and no EPLD checkpoint: the pipeline trains EPLD's stage 1
    first (``semantic_train``), then P2Seg's on that EPLD map (its trainable builds the source from the
    checkpoint, or raises), then labels."""
    epld = {"steps": 2, "batch_size": 2, "input_size": 64, "hidden_dim": 16, "layers": 2, "mask_stride": 8,
            "run_name": "epld_source"}
    report = run(tmp_path, "p2seg", "p1", {"steps": 2, "image_size": 64, "affinity_grid": 8, "width": 16},
                 params={"rounds": 1, "semantic_source": "epld", "semantic_train": epld,
                         "semantic_params": {"thing_split": "geodesic"}})
    source = report["generator_training"]["source"]
    assert source["trained_steps"] == 2 and source["checkpoint"].endswith("epld_source")
    assert report["method_summary"] is not None


def test_an_untrained_source_without_semantic_train_is_refused_and_a_shared_run_name_named(tmp_path):
    from pointseg.generators.p2seg import P2SegConfig

    with pytest.raises(ValueError, match="semantic_train to have the pipeline train it first"):
        P2SegConfig(semantic_source="epld")
    with pytest.raises(ValueError, match=r"(?s)semantic_train \(for semantic_source=epld\).*layerz"):
        P2SegConfig(semantic_source="epld", semantic_train={"layerz": 2})
    with pytest.raises(ValueError, match="psps has no stage 1"):
        P2SegConfig(semantic_source="psps", semantic_train={})
    with pytest.raises(ValueError, match="share run_name 'stage1'"):
        validate(PipelineConfig, {"generator": {"method": "p2seg", "train": {"enabled": True, "run_name": "stage1"},
                                                "params": {"semantic_source": "epld",
                                                           "semantic_train": {"run_name": "stage1"}}}})
