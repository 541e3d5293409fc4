"""Stage-2 Ray Train flow: worker crash recovery, resume, bad shard rows, evaluation.

Small on purpose: 64x64 synthetic scenes, a few steps of a tiny random-init
Mask2Former. The shards hold the ground truth as "pseudo labels", so the data
are known exactly; two extra rows are broken (corrupt PNG, segments_info that
disagrees with the PNG) and must be skipped and counted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "flows"))

from pointseg.config import PipelineConfig, validate  # noqa: E402
from pointseg.data.coco_panoptic_io import read_id_map, read_panoptic_annotations  # noqa: E402
from pointseg.data.panoptic_format import encode_png  # noqa: E402
from pointseg.data.prepare import join, prepare_inputs, read_index  # noqa: E402
from pointseg.data.record import Points  # noqa: E402

TINY_PANOPTIC = {
    "image_size": 64, "pretrained": False, "num_queries": 8, "decoder_layers": 1, "encoder_layers": 1,
    "hidden_dim": 32, "feature_size": 32, "mask_feature_size": 32, "encoder_feedforward_dim": 64,
    "dim_feedforward": 64, "num_attention_heads": 2, "train_num_points": 512,
}
N_IMAGES = 8


def tiny_config(output: Path, **train) -> PipelineConfig:
    return validate(PipelineConfig, {
        "output": str(output),
        "dataset": {"kind": "synthetic", "synthetic": {"num_images": N_IMAGES, "height": 64, "width": 64, "seed": 3}},
        "train": {
            "enabled": True, "model": "mask2former", "params": TINY_PANOPTIC, "steps": 4, "batch_size": 2, "lr": 1e-3,
            "checkpoint_every": 2, "report_every": 1, "num_workers": 1, "cpus_per_worker": 0.5,
            "max_failures": 1, "storage_path": str(output / "train"), **train,
        },
    })


def write_gt_shards(output: Path, cfg: PipelineConfig, bad_rows: bool = True) -> dict:
    """Shards whose labels are the ground truth, plus a corrupt PNG row and a disagreeing row."""
    categories, _ = prepare_inputs(cfg.dataset, cfg.points, str(output))
    _, _, gt = read_panoptic_annotations(join(str(output), "gt", "panoptic.json"))
    rows = []
    for r in read_index(join(str(output), "index", "index.parquet")):
        ann = gt[r["image_id"]]
        id_map = read_id_map(join(str(output), "gt", "panoptic"), ann["file_name"])
        rows.append({
            "image_id": r["image_id"], "file_name": r["file_name"], "height": r["height"], "width": r["width"],
            "method": "gt", "config_hash": "", "label_png": encode_png(id_map),
            "segments_info": json.dumps(ann["segments_info"]), "diagnostics": "{}", "seconds": 0.0, "error": "",
        })
    train_ids = sorted(r["image_id"] for r in rows)
    if bad_rows:  # two training images (not validation: val_every=4 holds out ids[0] and ids[4])
        corrupt = next(r for r in rows if r["image_id"] == train_ids[1])
        corrupt["label_png"] = corrupt["label_png"][:40] + b"garbage"
        disagree = next(r for r in rows if r["image_id"] == train_ids[2])
        info = json.loads(disagree["segments_info"])
        disagree["segments_info"] = json.dumps(info[:-1])  # a PNG id with no segments_info entry
    failed = dict(rows[3], label_png=b"", segments_info="[]", error="generator failed")
    (output / "shards").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows + [failed]), output / "shards" / "part-0.parquet")
    return categories


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2")
    cfg = tiny_config(out)
    return out, write_gt_shards(out, cfg)


@pytest.fixture(scope="module")
def resumed(ray_local, data, tmp_path_factory):
    """A 2-step run, rerun under the same name to step 6 with rank 0's worker exiting after step 5 (checkpoints
    every 2 steps), the same 6 steps uninterrupted, and that run rerun to step 8 from its Ray Train record cut
    short: four Ray Train runs that the two tests below share."""
    from operators.training import train_stage2

    out, categories = data
    marker = tmp_path_factory.mktemp("crash") / "crashed"
    first = train_stage2(tiny_config(out, run_name="resume", steps=2), categories, str(out))
    second = train_stage2(tiny_config(out, run_name="resume", steps=6), categories, str(out),
                          loop_extra={"crash_at_step": 5, "crash_marker": str(marker)})
    straight = train_stage2(tiny_config(out, run_name="straight", steps=6), categories, str(out))
    # Ray Train rewrites its checkpoint record in place; a controller killed mid-write leaves it cut short, and
    # Ray Train would then refuse every rerun of the name. The record is rebuilt from the checkpoint folders.
    record = out / "train" / "straight" / "checkpoint_manager_snapshot.json"
    record.write_bytes(record.read_bytes()[:50])
    third = train_stage2(tiny_config(out, run_name="straight", steps=8), categories, str(out))
    return first, second, straight, marker, third


def test_worker_crash_is_recovered_and_bad_rows_are_counted(resumed):
    from pointseg.train.checkpoint import read_meta

    _, res, _, marker, _ = resumed
    assert marker.read_text() == "crashed at step 5\n", "the test hook did not fire: the worker never passed step 5"
    assert res["metrics"]["step"] == 6
    assert read_meta(res["checkpoint"])["step"] == 6  # the exported model folder holds the last step
    # The error row is filtered before training; the two broken rows are skipped by the collate,
    # once per epoch that reads them (>= 1 epoch each).
    assert res["error_rows"] == 1 and res["train_rows"] == N_IMAGES - 2
    assert res["skipped_rows"] >= 2
    assert sorted(k.split()[0] for k in res["skip_reasons"]) == ["label_png", "segments_info"]
    # TensorBoard events and the metrics history live in the run dir.
    assert list(Path(res["log_dir"]).glob("events.out.tfevents.*"))
    # (step, the step its worker group started from): the first run's two steps, the rerun's from the step-2
    # checkpoint up to the crash, then the restarted worker's from a checkpoint of the run: step 4's, or step 2's
    # when the controller had not yet taken in step 4's report when the worker died (seen here: Ray Train then
    # redoes steps 3-5; the step-4 folder it wrote is not used).
    history = [(h["step"], h["start_step"]) for h in res["history"]]
    assert history[:5] == [(1, 0), (2, 0), (3, 2), (4, 2), (5, 2)], history
    restart = history[5][1]
    assert restart in (2, 4) and history[5:] == [(s, restart) for s in range(restart + 1, 7)], history


def test_rerun_with_same_name_resumes_from_checkpoint_and_epoch(resumed):
    first, second, straight, _, third = resumed
    assert first["metrics"]["step"] == 2 and first["start_step"] == 0
    assert second["metrics"]["step"] == 6 and second["history"][2]["start_step"] == 2
    # The epoch counter and the position in the epoch survived both resumes (the rerun's and the restarted
    # worker's): every step falls in the same epoch as in one uninterrupted run (a restart at epoch 0 would
    # replay epoch 0's batches).
    epochs = {h["step"]: h["epoch"] for h in straight["history"]}
    assert sorted(epochs) == [1, 2, 3, 4, 5, 6] and max(epochs.values()) >= 1, epochs
    assert [(h["step"], h["epoch"]) for h in second["history"]] == [
        (h["step"], epochs[h["step"]]) for h in second["history"]], (second["history"], epochs)
    # The third run found the record truncated: rebuilt from the checkpoint folders, it resumed at step 6.
    run = Path(third["run_dir"])
    assert len((run / "checkpoint_manager_snapshot.json.unreadable").read_bytes()) == 50
    assert third["metrics"]["step"] == 8 and [h["start_step"] for h in third["history"][-2:]] == [6, 6]


def test_a_finished_run_is_found_only_from_a_final_checkpoint_of_the_trainable(tmp_path, caplog):
    """``finished_run`` reads Ray Train's record of the run's checkpoints (written by hand here, in the shape of
    the one a real run leaves: the point2mask flow's rerun test skips a real finished run)."""
    import torch

    from operators.training import RAY_CHECKPOINT_SNAPSHOT, finished_run
    from pointseg.train.checkpoint import save_checkpoint

    run = tmp_path / "store" / "r"
    save_checkpoint(str(run / "checkpoint_b"), {"trainable": "toy", "step": 4}, {"w": torch.zeros(1)})

    def record(**metrics):
        latest = {"checkpoint_dir_name": "checkpoint_b", "metrics": {"step": 4, "final": True, "loss": 0.5, **metrics}}
        (run / RAY_CHECKPOINT_SNAPSHOT).write_text(json.dumps({"ray_version": "2.60.0", "latest_checkpoint_result": latest}))

    store = str(tmp_path / "store")
    assert finished_run(store, "r", "toy", 4) is None  # no record yet
    record()
    ckpt, metrics = finished_run(store, "r", "toy", 4)
    assert ckpt == str(run / "checkpoint_b") and metrics["loss"] == 0.5
    assert finished_run(store, "r", "toy", 3) is not None  # fewer steps asked: still nothing to train
    assert finished_run(store, "r", "toy", 5) is None  # more steps asked: Ray Train resumes at step 4
    assert finished_run(store, "r", "other", 4) is None  # another trainable: Ray Train's resume names it
    assert finished_run(store, "other_run", "toy", 4) is None
    record(final=False)  # stopped by max_wall_s or a crash before its last step
    assert finished_run(store, "r", "toy", 4) is None
    (run / RAY_CHECKPOINT_SNAPSHOT).write_text("{not json")
    assert finished_run(store, "r", "toy", 4) is None and "could not be read" in caplog.text


def test_truncated_run_record_is_rebuilt_from_the_checkpoint_folders(tmp_path, caplog):
    """Ray Train's record, cut short, is rebuilt in Ray's own schema from the complete checkpoint folders."""
    import torch
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    from operators.training import RAY_CHECKPOINT_SNAPSHOT, finished_run, repair_run_snapshot
    from pointseg.train.checkpoint import save_checkpoint

    run = tmp_path / "store" / "r"
    for name, step in (("checkpoint_2026-12-03_10-00-02", 4), ("checkpoint_2026-12-03_10-00-01", 2)):
        save_checkpoint(str(run / name), {"trainable": "toy", "step": step,
                                          "metrics": {"step": step, "loss": 1.0 / step, "final": step == 4}},
                        {"w": torch.zeros(1)})
    (run / "checkpoint_2026-12-03_10-00-03").mkdir()  # a folder whose meta.json was never written
    store = str(tmp_path / "store")
    assert repair_run_snapshot(store, "r") is None  # no record: nothing to do
    (run / RAY_CHECKPOINT_SNAPSHOT).write_text('{"ray_version":"2.60.0","checkpoint_res')
    assert "rebuilt from the run's 2 complete checkpoint folder(s)" in repair_run_snapshot(store, "r")
    state = _CheckpointManagerState.model_validate_json((run / RAY_CHECKPOINT_SNAPSHOT).read_text())
    assert [r.checkpoint_dir_name for r in state.checkpoint_results] == ["checkpoint_2026-12-03_10-00-01",
                                                                        "checkpoint_2026-12-03_10-00-02"]
    assert state.latest_checkpoint_result.metrics == {"step": 4, "loss": 0.25, "final": True}
    assert state.checkpoint_report_indices == [0, 1] and state.current_report_index == 2
    assert (run / f"{RAY_CHECKPOINT_SNAPSHOT}.unreadable").read_text().endswith("checkpoint_res")
    assert finished_run(store, "r", "toy", 4)[0] == str(run / "checkpoint_2026-12-03_10-00-02")
    assert repair_run_snapshot(store, "r") is None  # readable now


def test_empty_training_set_names_the_filter(ray_local, tmp_path):
    from operators.training import train_stage2

    cfg = tiny_config(tmp_path)
    categories = write_gt_shards(tmp_path, cfg, bad_rows=False)
    table = pq.read_table(tmp_path / "shards" / "part-0.parquet").to_pylist()
    for r in table:
        r["error"] = "boom"
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "shards" / "part-0.parquet")
    with pytest.raises(ValueError, match="filter error == ''"):
        train_stage2(cfg, categories, str(tmp_path))


def test_point_disk_label_matches_hand_drawn_disks():
    from pointseg.data.synthetic import synthetic_categories
    from pointseg.train.stage2 import point_disk_label

    cats = synthetic_categories()
    thing = next(c for c in cats.values() if c.isthing).id
    stuff = next(c for c in cats.values() if not c.isthing).id
    pts = Points([[5, 5], [20, 10], [30, 30], [2, 30]], [0, 0, 1, 2], [thing, thing, thing, stuff])
    id_map, info = point_disk_label(pts, 40, 40, 2, cats)
    yy, xx = np.mgrid[:40, :40]
    disk = lambda x, y: (yy - y) ** 2 + (xx - x) ** 2 <= 4  # noqa: E731
    assert ((id_map == 1) == (disk(5, 5) | disk(20, 10))).all()  # two clicks, one thing segment
    assert ((id_map == 2) == disk(30, 30)).all()
    assert ((id_map == 3) == disk(2, 30)).all()
    assert [(s["id"], s["category_id"], s["area"]) for s in info] == [(1, thing, 26), (2, thing, 13), (3, stuff, 13)]


def test_actor_pool_evaluation_equals_in_process_scores(ray_local, data):
    """The Ray Data actor pool + driver merge gives the PQ of a plain loop over the same images.

    A random-init Mask R-CNN (its random heads give detections above the 0.05
    score floor, so there is something to score); mask AP is in [0, 1].
    """
    import torch

    from operators.evaluation import evaluate_in_process, evaluate_model
    from pointseg.data.images import read_image
    from pointseg.metrics import PQEvaluator
    from pointseg.train.checkpoint import save_checkpoint
    from pointseg.train.stage2 import STAGE2_MODELS, load_stage2, validation_ids

    out, categories = data
    cfg = tiny_config(out, model="mask_rcnn", params={"image_size": 64, "pretrained": False}, eval={"batch_size": 2})
    torch.manual_seed(0)
    trainable = STAGE2_MODELS["mask_rcnn"](cfg.train, categories)
    ckpt = str(out / "eval_ckpt")
    save_checkpoint(ckpt, {**trainable.meta(), "step": 0}, trainable.build().state_dict())
    index = read_index(join(str(out), "index", "index.parquet"))
    val = sorted(validation_ids([r["image_id"] for r in index], 4))
    res = evaluate_model(cfg, categories, str(out), ckpt, val)
    assert res["metrics"]["num_images"] == len(val) and not res["metrics"]["failed_images"]

    model, trainable, _ = load_stage2(ckpt)
    _, _, gt = read_panoptic_annotations(join(str(out), "gt", "panoptic.json"))
    ev = PQEvaluator(categories)
    n_pred = 0
    for r in index:
        if r["image_id"] in val:
            (pred,) = trainable.predict(model, [read_image(r["file_name"])])
            n_pred += len(pred.instances)
            ann = gt[r["image_id"]]
            ev.process(read_id_map(join(str(out), "gt", "panoptic"), ann["file_name"]), ann["segments_info"],
                       pred.id_map, pred.segments_info)
    want = ev.evaluate()
    assert n_pred > 0 and res["metrics"]["num_detections"] == n_pred
    for k in ("pq", "sq", "rq", "pq_th", "pq_st"):
        assert res["metrics"][k] == pytest.approx(want[k], abs=1e-12, nan_ok=True), k
    assert all(0.0 <= res["metrics"][k] <= 1.0 for k in ("ap", "ap50", "ap75"))
    assert res["metrics"]["ap50"] >= res["metrics"]["ap75"]
    in_process = evaluate_in_process(cfg, categories, str(out), ckpt, val)
    assert in_process["pq"] == pytest.approx(res["metrics"]["pq"], nan_ok=True)


def test_a_broken_image_is_a_failed_row_not_a_failed_evaluation(data, tmp_path):
    import torch

    from operators.evaluation import EvaluateModel, EvaluationMerge
    from pointseg.train.checkpoint import save_checkpoint
    from pointseg.train.stage2 import STAGE2_MODELS

    out, categories = data
    cfg = tiny_config(out, model="mask_rcnn", params={"image_size": 64, "pretrained": False})
    torch.manual_seed(0)
    trainable = STAGE2_MODELS["mask_rcnn"](cfg.train, categories)
    ckpt = str(tmp_path / "ckpt")
    save_checkpoint(ckpt, {**trainable.meta(), "step": 0}, trainable.build().state_dict())
    index = read_index(join(str(out), "index", "index.parquet"))[:2]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    ev = EvaluateModel(ckpt, join(str(out), "gt", "panoptic.json"), join(str(out), "gt", "panoptic"))
    batch = {k: np.array([r[k] for r in index], dtype=object) for k in ("image_id", "file_name", "height", "width")}
    batch["file_name"][1] = str(broken)
    rows = ev(batch)
    assert rows["error"][0] == "" and "decode" in rows["error"][1]
    merge = EvaluationMerge(categories, "instance")
    merge.add(rows)
    m = merge.metrics()
    assert m["num_images"] == 2 and list(m["failed_images"]) == [int(index[1]["image_id"])]
    assert {"ap", "ap50", "agnostic_ap", "agnostic_ap50"} <= set(m)
