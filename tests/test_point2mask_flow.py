"""Point2Mask with learned maps through the full pipeline: Ray Train stage 1 -> Ray Data
pseudo labels with the trained checkpoint -> evaluation -> report.

Small on purpose: 4 synthetic 64x64 scenes, a 64x64 random-init MapNet, 3 steps,
one Ray Train worker at 0.5 CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "flows"))

from pointseg.config import PipelineConfig, validate  # noqa: E402
from pointseg.data.coco_panoptic_io import read_id_map, read_panoptic_annotations  # noqa: E402
from pointseg.data.prepare import join  # noqa: E402

STEPS = 3


def p2m_config(output: Path, maps: str = "learned", **train) -> PipelineConfig:
    return validate(PipelineConfig, {
        "output": str(output),
        "dataset": {"kind": "synthetic", "synthetic": {"num_images": 4, "height": 64, "width": 64, "seed": 5}},
        "generator": {
            "method": "point2mask", "params": {"maps": maps, "downscale": 1.0},
            "train": {
                "steps": STEPS, "image_size": 64, "batch_size": 2, "lr": 1e-3, "num_workers": 1, "cpus_per_worker": 0.5,
                "checkpoint_every": 2, "report_every": 1, "storage_path": str(output / "maps_train"),
                # L_bou from step 1 with refresh every step: the per-worker pseudo labels are exercised.
                "pretrained": False, "width": 16, "pseudo_start": 1, "pseudo_every": 1, **train,
            },
        },
        "ray_data": {"min_images_for_ray": 0},  # label through the Ray Data actors
        "report": {"num_overlays": 2, "baselines": []},
    })


def labels(output: Path) -> dict[int, np.ndarray]:
    _, _, anns = read_panoptic_annotations(join(str(output), "panoptic.json"))
    return {i: read_id_map(join(str(output), "panoptic"), a["file_name"]) for i, a in anns.items()}


@pytest.fixture(scope="module")
def learned_run(ray_local, tmp_path_factory):
    import full_pipeline

    out = tmp_path_factory.mktemp("p2m_learned")
    return out, full_pipeline.run(p2m_config(out), str(out))


def test_stage1_trains_and_the_actors_label_with_its_checkpoint(learned_run):
    from pointseg.generators.point2mask import MapNetTrainable
    from pointseg.train.engine import load_trained

    out, report = learned_run
    g = report["generator_training"]
    assert g["steps"] == STEPS and g["start_step"] == 0 and g["trained_steps"] == STEPS
    assert g["metrics"]["pseudo_refreshes"] >= 2 * (STEPS - 1)  # L_bou's pseudo labels came from the worker's maps
    # The checkpoint the generator got is the trained network's folder.
    assert report["config"]["generator"]["params"]["checkpoint"] == g["checkpoint"]
    net, meta = load_trained(g["checkpoint"], MapNetTrainable)
    assert meta["step"] == STEPS and meta["config"]["image_size"] == 64
    assert net(torch.zeros(1, 3, 64, 64))["sem_logits"].shape == (1, len(meta["categories"]), 64, 64)
    assert report["images"]["exported"] == 4 and not report["images"]["failed"] and report["images"]["path"] == "ray"
    assert report["pseudo_labels"]["pq"] is not None


def test_report_has_ot_diagnostics_and_map_pictures(learned_run):
    out, report = learned_run
    d = report["method_summary"]
    assert d["images"] == 4 and len(d["table"]) == 4
    assert set(d["summary"]) >= {"marginal_error_row", "marginal_error_col", "ot_iterations", "plan_entropy"}
    for q in d["summary"].values():
        assert q["max"] >= q["mean"] >= 0
    # Summary = aggregate of the per-image rows, which are the shards' diagnostics column.
    assert d["summary"]["plan_entropy"]["max"] == max(r["plan_entropy"] for r in d["table"])
    assert d["diverged_images"] == 0 and "centroid_fallbacks" in d["fallbacks"]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["method_summary"]["summary"] == d["summary"]
    md = (out / "report.md").read_text()
    assert "## Optimal transport diagnostics (per image)" in md and "## Stage 1: point2mask network (Ray Train)" in md
    assert "already trained" not in md  # this run trained its stage 1
    assert len(report["explain_pictures"]) == 2
    for rel in report["explain_pictures"]:
        assert f"]({rel})" in md
        from pointseg.data.images import read_image

        pic = read_image(str(out / rel))
        # image | P^s max | P^s argmax | P^b high | P^b low | cost: 6 tiles of (64 * 3) px
        assert pic.shape[1] == 6 * 192 and pic.std() > 0


def test_rerun_resumes_stage1_without_retraining(learned_run):
    """A rerun of the same command trains no step: the finished Ray Train run is not started again (its latest
    checkpoint is final, at the last step), and the exported weights are the first run's."""
    import full_pipeline

    from pointseg.train.checkpoint import read_checkpoint

    out, first = learned_run
    before = read_checkpoint(first["generator_training"]["checkpoint"]).model
    again = full_pipeline.run(p2m_config(out), str(out))
    g = again["generator_training"]
    assert g["start_step"] == STEPS and g["trained_steps"] == 0 and g["steps"] == STEPS
    # No new Ray Train checkpoint: the first run's last one was exported again.
    assert g["already_trained"] and not first["generator_training"]["already_trained"]
    assert g["ray_checkpoint"] == first["generator_training"]["ray_checkpoint"]
    after = read_checkpoint(g["checkpoint"])
    assert after.meta["step"] == STEPS
    assert before.keys() == after.model.keys() and all(torch.equal(before[k], after.model[k]) for k in before)
    assert again["images"]["labelled_now"] == 0 and again["images"]["skipped_done"] == 4  # same weights: no relabel
    assert f"- already trained: an earlier run of this run name reached step {STEPS};" in (out / "report.md").read_text()


def test_learned_maps_change_the_labels_against_lowlevel(learned_run, tmp_path):
    import full_pipeline

    out, _ = learned_run
    low = full_pipeline.run(p2m_config(tmp_path, maps="lowlevel"), str(tmp_path))
    assert "generator_training" not in low  # training-free mode: no stage 1
    assert low["method_summary"]["images"] == 4
    learned, lowlevel = labels(out), labels(tmp_path)
    assert learned.keys() == lowlevel.keys()
    assert any(not np.array_equal(learned[i], lowlevel[i]) for i in learned)


def test_a_given_checkpoint_is_used_not_retrained(tmp_path):
    cfg = p2m_config(tmp_path)
    assert cfg.generator.needs_training()
    given = validate(PipelineConfig, {"generator": {"method": "point2mask", "params": {"maps": "learned",
                                                                                       "checkpoint": "/x/ckpt"}}})
    assert not given.generator.needs_training()
    assert not p2m_config(tmp_path, maps="lowlevel").generator.needs_training()  # no network, nothing to train


def test_stage1_keys_are_validated_by_path():
    with pytest.raises(ValueError, match=r"generator\.train\.widht"):
        validate(PipelineConfig, {"generator": {"method": "point2mask", "train": {"widht": 8}}})
    with pytest.raises(ValueError, match=r"generator\.train.*psps has no stage 1"):
        validate(PipelineConfig, {"generator": {"method": "psps", "train": {"steps": 8}}})


def test_ot_section_says_when_nothing_was_transported():
    from pointseg.generators.point2mask.generator import OT_COUNTERS, OT_QUANTITIES, Point2MaskGenerator
    from pointseg.report import _summary_markdown

    def row(i, problems, **counts):
        return {"image_id": i, "solver": "mincost" if not problems else "exact", "diverged": False, "converged": True,
                **{k: float(problems) for k in OT_QUANTITIES}, **{k: counts.get(k, 0) for k in OT_COUNTERS}}

    def section(rows):
        return "\n".join(_summary_markdown(Point2MaskGenerator.summarize(rows)))

    mincost = section([row(1, 0), row(2, 0, fullres_retry=1)])
    assert "No transport problem was solved" in mincost and "fullres_retry 1" in mincost
    assert "| image_id |" not in mincost
    ot = section([row(1, 2), row(2, 0)])
    assert "No transport problem" not in ot and "| image_id |" in ot
    assert Point2MaskGenerator.summarize([{"seconds": 1.0}]) is None  # no OT diagnostics: nothing to say
