"""The check of a Tune sweep's saved state before it resumes (operators/tune_state.py), on hand-made folders.

The end-to-end cases (a real sweep resumed from a truncated searcher state, with and
without trials still to create) are in tests/test_tune.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from operators.tune_state import RemainingTrials, TuneStateError, check_experiment_state, missing_configs

SPACE = {"beta": {"grid": [0.0, 2.0]}, "downscale": {"grid": [0.25, 1.0]}, "blur_sigma": 0.0}
SEARCHER = "basic-variant-state-2026-12-03_10-00-00.json"


def _experiment(folder, trials, searcher: bytes | None):
    """``folder`` with Tune's two state files of a sweep: the trials' JSON and the searcher's pickle."""
    import ray.cloudpickle as cloudpickle

    folder.mkdir(parents=True)
    data = [[json.dumps({"trial_id": t, "status": status, "config": config}), "{}"] for t, status, config in trials]
    (folder / "experiment_state-2026-12-03_10-00-00.json").write_text(json.dumps({"trial_data": data}))
    if searcher is not None:
        (folder / SEARCHER).write_bytes(cloudpickle.dumps({"_finished": False}) if searcher == b"ok" else searcher)
    return folder


def _cfg(beta, downscale):
    return {"beta": beta, "downscale": downscale, "blur_sigma": 0.0}


def _restored(exp):
    """The searcher Tune's restore_from_dir makes of the state file."""
    import ray.cloudpickle as cloudpickle
    from ray.tune.search.basic_variant import BasicVariantGenerator

    gen = BasicVariantGenerator(max_concurrent=2)  # what the restored Tuner builds from max_concurrent_trials=2
    gen.set_state(cloudpickle.loads((exp / SEARCHER).read_bytes()))
    return gen


def test_missing_configs_counts_grid_combinations_and_draws_random_ones():
    have = [_cfg(0.0, 0.25), _cfg(2.0, 1.0)]
    got = missing_configs(SPACE, 1, have)
    assert sorted((c["beta"], c["downscale"]) for c in got) == [(0.0, 1.0), (2.0, 0.25)]
    assert all(c["blur_sigma"] == 0.0 for c in got)
    assert len(missing_configs(SPACE, 3, have)) == 4 * 3 - 2  # num_samples trials per combination
    lists = {"sizes": {"grid": [[256, 320], [320]]}}  # unhashable grid values
    assert missing_configs(lists, 1, [{"sizes": [320]}]) == [{"sizes": [256, 320]}]
    rand = {"beta": {"grid": [1.0]}, "eps": {"uniform": [0.1, 0.2]}}
    got = missing_configs(rand, 4, [{"beta": 1.0, "eps": 0.15}])
    assert len(got) == 3 and all(0.1 <= c["eps"] <= 0.2 and c["beta"] == 1.0 for c in got)


def test_readable_state_is_left_alone(tmp_path):
    exp = _experiment(tmp_path / "tune_psps", [("ab12c_00000", "TERMINATED", _cfg(0.0, 0.25))], b"ok")
    before = {p.name: p.read_bytes() for p in exp.iterdir()}
    assert check_experiment_state(str(exp), SPACE, 1, roots=[]) is None
    assert {p.name: p.read_bytes() for p in exp.iterdir()} == before
    assert check_experiment_state(str(tmp_path / "absent"), SPACE, 1, roots=[]) is None  # no state: a new sweep


def test_truncated_searcher_rebuilt_as_finished_when_every_trial_exists(tmp_path):
    trials = [(f"ab12c_{i:05d}", "TERMINATED", _cfg(b, d)) for i, (b, d) in
              enumerate([(0.0, 0.25), (2.0, 0.25), (0.0, 1.0), (2.0, 1.0)])]
    exp = _experiment(tmp_path / "tune_psps", trials, b"\x80\x05\x95")
    message = check_experiment_state(str(exp), SPACE, 1, roots=[])
    assert "rebuilt from the 4 trials" in message and "0 trial(s) still to create" in message
    assert (exp / f"{SEARCHER}.unreadable").read_bytes() == b"\x80\x05\x95"  # kept, under a name Tune does not read
    gen = _restored(exp)
    assert gen.next_trial() is None and gen.is_finished() and gen.total_samples == 4
    assert gen.max_concurrent == 2  # the Tuner's limit is not overwritten
    assert check_experiment_state(str(exp), SPACE, 1, roots=[]) is None  # readable now


def test_truncated_searcher_rebuilt_with_the_trials_still_to_create(tmp_path):
    trials = [("ab12c_00000", "TERMINATED", _cfg(0.0, 0.25)), ("ab12c_00001", "RUNNING", _cfg(2.0, 0.25))]
    exp = _experiment(tmp_path / "tune_psps", trials, b"")
    message = check_experiment_state(str(exp), SPACE, 1, roots=[])
    assert "2 trial(s) still to create" in message
    gen = _restored(exp)
    assert gen.total_samples == 4 and not gen.is_finished()
    assert gen._live_trials == {"ab12c_00001"}  # the running trial counts against max_concurrent on resume
    (it,) = gen._iterators
    assert isinstance(it, RemainingTrials)
    assert [(t["trial_id"], t["config"]) for t in it.trials] == [("ab12c_00002", _cfg(0.0, 1.0)),
                                                                  ("ab12c_00003", _cfg(2.0, 1.0))]
    assert [t["experiment_tag"] for t in it.trials] == ["2_beta=0.0000,downscale=1.0000",
                                                        "3_beta=2.0000,downscale=1.0000"]


def test_truncated_experiment_state_names_the_file(tmp_path):
    exp = _experiment(tmp_path / "tune_psps", [("ab12c_00000", "TERMINATED", _cfg(0.0, 0.25))], b"ok")
    f = exp / "experiment_state-2026-12-03_10-00-00.json"
    f.write_text(f.read_text()[:15])
    with pytest.raises(TuneStateError, match=r"experiment_state-2026-12-03_10-00-00\.json is unreadable"):
        check_experiment_state(str(exp), SPACE, 1, roots=[])


def test_unreadable_state_replaced_by_the_drivers_staged_copy(tmp_path):
    """Tune stages both files on the driver's node, then copies them: a kill during the copy leaves the pair complete."""
    trials = [("ab12c_00000", "TERMINATED", _cfg(0.0, 0.25)), ("ab12c_00001", "RUNNING", _cfg(2.0, 0.25))]
    roots = [str(tmp_path / "sessions/session_1/artifacts")]
    staged = _experiment(Path(roots[0], "2026-12-03_10-00-00/tune_psps/driver_artifacts"), trials, b"ok")
    exp = _experiment(tmp_path / "storage/tune_psps", trials[:1], b"ok")
    state = exp / "experiment_state-2026-12-03_10-00-00.json"
    state.write_bytes(state.read_bytes()[:15])
    assert "staged copy of session 2026-12-03_10-00-00" in check_experiment_state(str(exp), SPACE, 1, roots=roots)
    for name in (state.name, SEARCHER):
        assert (exp / name).read_bytes() == (staged / name).read_bytes()
    assert len((exp / f"{state.name}.unreadable").read_bytes()) == 15
    # A staged copy of another session is not used: that state belongs to another run of the sweep.
    state.write_bytes(b"{")
    (staged / state.name).rename(staged / "experiment_state-2026-12-03_09-00-00.json")
    with pytest.raises(TuneStateError, match="is unreadable"):
        check_experiment_state(str(exp), SPACE, 1, roots=roots)
