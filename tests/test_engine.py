"""The one training engine (pointseg.train.engine) in a plain process: steps, epochs, resume with the
epoch counter and the position in the epoch, skipped rows, a NaN loss, the time budget; and the safe
checkpoint files (pointseg.train.checkpoint)."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from pointseg.data.record import Category
from pointseg.train.checkpoint import (
    UnsafeCheckpointError,
    checkpoint_fingerprint,
    copy_checkpoint,
    load_tensors,
    read_checkpoint,
    save_checkpoint,
)
from pointseg.train.engine import EngineConfig, RowCollate, Trainable, fit_plain, iter_rows, load_trained

CATS = {1: Category(1, "a", True)}


class LineConfig(EngineConfig):
    nan_at_step: int | None = None


class Collate(RowCollate):
    """Rows ``{image_id, v}``; a row with ``v`` None is bad. Records every row it decodes."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __call__(self, rows):
        xs, ids = [], []
        for r in iter_rows(rows):
            if r["v"] is None:
                self.skip(r["image_id"], "value: missing")
                continue
            self.seen.append((self.epoch, r["image_id"]))
            xs.append([float(r["v"])])
            ids.append(int(r["image_id"]))
        return {"x": torch.tensor(xs), "image_ids": ids}


class Line(Trainable):
    """Fit y = 2x with one weight: the loss falls, and every step is visible."""

    name = "line"
    Config = LineConfig
    seen: list = []

    def build(self, pretrained=True):
        torch.manual_seed(0)
        return torch.nn.Linear(1, 1, bias=False)

    def collate(self, train=True):
        return Collate(self.seen)

    def loss(self, model, batch, step):
        loss = ((model(batch["x"]) - 2 * batch["x"]) ** 2).mean()
        if self.config.nan_at_step == step:
            loss = loss * float("nan")
        return {"loss": loss}


ROWS = [{"image_id": i, "v": float(i + 1) / 10} for i in range(6)]


def run(tmp_path, rows=ROWS, **cfg):
    Line.seen = []
    config = {"steps": 5, "batch_size": 2, "lr": 0.1, "checkpoint_every": 2, "report_every": 1, "max_grad_norm": None, **cfg}
    return fit_plain(Line(config, CATS), rows, str(tmp_path / "ck"), log_dir=str(tmp_path / "logs"))


def test_steps_epochs_logs_and_checkpoint(tmp_path):
    out = run(tmp_path)
    assert out["step"] == 5 and out["epoch"] == 1  # 3 batches per epoch: steps 4-5 are epoch 1
    history = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5] and history[-1]["loss"] < history[0]["loss"]
    assert [h["epoch"] for h in history] == [0, 0, 0, 1, 1]
    ck = read_checkpoint(str(tmp_path / "ck"), optimizer=True)
    assert (ck.meta["step"], ck.meta["epoch"], ck.meta["batch_in_epoch"]) == (5, 1, 2)
    assert ck.optimizer is not None and ck.meta["trainable"] == "line"
    model, meta = load_trained(str(tmp_path / "ck"), Line)
    assert not model.training and torch.equal(model.weight, ck.model["weight"])


def test_resume_continues_the_epoch_without_replaying_it(tmp_path):
    run(tmp_path, steps=2)  # epoch 0, batches 1-2 of 3
    first = list(Line.seen)
    out = run(tmp_path, steps=5)
    assert out["start_step"] == 2 and out["step"] == 5
    # The resumed run decoded only the rest of epoch 0 (its third batch) and then epoch 1: it did not
    # decode epoch 0's first two batches again, and every row of epoch 0 was trained on exactly once.
    rest = [i for e, i in Line.seen if e == 0]
    assert len(rest) == 2 and sorted(rest + [i for e, i in first]) == list(range(6))
    assert {e for e, _ in Line.seen} == {0, 1}
    history = [json.loads(x)["step"] for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert history == [1, 2, 3, 4, 5]  # metrics.jsonl continued, not restarted


def test_resume_of_a_finished_run_trains_nothing(tmp_path):
    run(tmp_path)
    out = run(tmp_path)
    assert out["start_step"] == out["step"] == 5 and Line.seen == []


def test_bad_rows_are_skipped_and_counted(tmp_path):
    rows = ROWS + [{"image_id": 9, "v": None}]
    out = run(tmp_path, rows=rows, steps=6)
    assert out["skipped_rows"] >= 1 and out["skip_reasons"] == {"value": out["skipped_rows"]}
    with pytest.raises(RuntimeError, match="took no step: every training row was skipped"):
        run(tmp_path / "all_bad", rows=[{"image_id": 1, "v": None}])


def test_a_nan_loss_names_the_step_and_the_images(tmp_path):
    with pytest.raises(FloatingPointError, match=r"at step 3 \(epoch 1\); batch image ids \[\d, \d\]"):
        run(tmp_path, nan_at_step=3)


def test_time_budget(tmp_path):
    with pytest.raises(TimeoutError, match="time budget"):
        run(tmp_path, steps=10_000, max_wall_s=1e-3)
    assert read_checkpoint(str(tmp_path / "ck")).meta["step"] >= 1  # the state reached is kept
    Line.seen = []
    out = fit_plain(Line({"steps": 10_000, "batch_size": 2, "lr": 0.1}, CATS), ROWS, str(tmp_path / "b"), budget_s=1e-3)
    assert out.get("budget_stop") and 1 <= out["step"] < 10_000  # a budget, not an error
    assert read_checkpoint(str(tmp_path / "b")).meta["step"] == out["step"]


# ----------------------------------------------------------------------------- checkpoint files


class Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    save_checkpoint(str(folder), {"trainable": "line", "config": {}, "categories": [], "step": 1},
                    {"weight": torch.zeros(1, 1)})
    with open(folder / "model.pt", "wb") as f:
        pickle.dump({"weight": Boom(marker)}, f)
    with pytest.raises(UnsafeCheckpointError, match=r"model\.pt: refused to load"):
        read_checkpoint(str(folder))
    with pytest.raises(UnsafeCheckpointError):
        load_trained(str(folder), Line)
    assert not marker.exists()
    torch.save({"weight": Boom(marker)}, folder / "model.pt")  # the torch zip format: refused as well
    with pytest.raises(UnsafeCheckpointError):
        load_tensors(str(folder / "model.pt"))
    assert not marker.exists()


def test_checkpoint_folders_on_any_fsspec_filesystem(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    uri = "memory://ckpt/run1"
    save_checkpoint(uri, {"trainable": "line", "step": 3}, state, {"state": {}, "param_groups": []}, {"ema": torch.ones(2)})
    ck = read_checkpoint(uri, optimizer=True, extra=True)
    assert torch.equal(ck.model["w"], state["w"]) and ck.step == 3 and torch.equal(ck.extra["ema"], torch.ones(2))
    copy_checkpoint(uri, str(tmp_path / "copy"))
    again = read_checkpoint(str(tmp_path / "copy"))
    assert torch.equal(again.model["w"], state["w"])
    assert checkpoint_fingerprint(uri) == checkpoint_fingerprint(str(tmp_path / "copy"))
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        read_checkpoint("memory://ckpt/absent")
    assert np.isfinite(float(ck.model["w"].sum()))
