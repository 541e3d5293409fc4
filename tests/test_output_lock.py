"""One run at a time per output folder: a second run is refused naming the first, a killed holder frees the folder
at once, and on object stores a lock whose heartbeat stopped is taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import fsspec
import pytest
from conftest import ROOT

from pointseg.storage import LOCK_NAME, OutputInUseError, OutputLock

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from pointseg.storage import OutputLock
lock = OutputLock({out!r}, "a holder in a test").acquire()
print("held", flush=True)
time.sleep(600)
"""


def _hold_in_subprocess(out) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT), out=str(out))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_lock_on_a_local_folder_is_refused_until_the_first_is_released(tmp_path):
    out = tmp_path / "run"
    first = OutputLock(str(out), "flows/full_pipeline.py").acquire()
    holder = json.loads((out / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["what"] == "flows/full_pipeline.py"
    with pytest.raises(OutputInUseError, match=rf"in use by another pointseg run: flows/full_pipeline\.py, "
                                               rf"pid {os.getpid()} on host "):
        OutputLock(str(out), "flows/tune_sweep.py").acquire()
    first.release()
    with OutputLock(str(out), "flows/tune_sweep.py"):
        assert json.loads((out / LOCK_NAME).read_text())["what"] == "flows/tune_sweep.py"
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        OutputLock(str(tmp_path / "a_file"), "x").acquire()


def test_the_pipeline_and_the_sweep_refuse_a_folder_held_by_another_process_and_a_kill_frees_it(tmp_path):
    import full_pipeline
    import tune_sweep

    from pointseg.config import PipelineConfig, load_config
    from pointseg.tuning import TuneConfig

    out = tmp_path / "run"
    proc = _hold_in_subprocess(out)
    try:
        cfg = load_config(PipelineConfig, str(ROOT / "configs" / "full_pipeline.yaml"))
        with pytest.raises(OutputInUseError, match=rf"a holder in a test, pid {proc.pid} on host"):
            full_pipeline.run(cfg, str(out))
        tcfg = load_config(TuneConfig, str(ROOT / "configs" / "tune_psps.yaml"))
        with pytest.raises(OutputInUseError, match=rf"pid {proc.pid}"):
            tune_sweep.run(tcfg, str(out), tune_sweep.load_base_config(tcfg))
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing was written
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The kernel ended the killed holder's lock: no stale lock to clean up.
    with OutputLock(str(out), "flows/full_pipeline.py"):
        pass


def test_a_flow_run_as_a_script_exits_with_the_message(tmp_path):
    out = tmp_path / "run"
    proc = _hold_in_subprocess(out)
    try:
        res = subprocess.run([sys.executable, str(ROOT / "flows" / "pseudo_label.py"), "--output", str(out)],
                             capture_output=True, text=True, timeout=300)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert res.returncode != 0
    assert f"OutputInUseError: output {out} is in use by another pointseg run: a holder in a test, pid {proc.pid}" \
        in res.stderr


def test_object_store_lock_heartbeat_stale_takeover_and_release(caplog):
    fs = fsspec.filesystem("memory")
    out = "memory://lock-test/run"
    path = "/lock-test/run/" + LOCK_NAME
    first = OutputLock(out, "flows/full_pipeline.py", heartbeat_s=0.05, stale_after_s=60).acquire()
    beat0 = json.loads(fs.cat(path))["heartbeat"]
    deadline = time.time() + 10
    while json.loads(fs.cat(path))["heartbeat"] == beat0 and time.time() < deadline:
        time.sleep(0.02)
    assert json.loads(fs.cat(path))["heartbeat"] > beat0  # the holder keeps its lock fresh
    with pytest.raises(OutputInUseError, match=r"flows/full_pipeline\.py, pid .* last heartbeat was \d+ s ago"):
        OutputLock(out, "flows/tune_sweep.py").acquire()
    first.release()
    assert not fs.exists(path)

    # A holder that died without releasing: its heartbeat stops, and after stale_after_s the lock is taken over.
    dead = {"what": "flows/full_pipeline.py", "pid": 1, "host": "lost-node", "started": time.time() - 900,
            "heartbeat": time.time() - 600, "command": "python flows/full_pipeline.py", "token": "old"}
    fs.pipe(path, json.dumps(dead).encode())
    with caplog.at_level(logging.WARNING, logger="pointseg.storage"):
        with OutputLock(out, "flows/tune_sweep.py", stale_after_s=300) as lock:
            assert lock.took_over["host"] == "lost-node"
            assert json.loads(fs.cat(path))["what"] == "flows/tune_sweep.py"
    assert "taking over the lock of flows/full_pipeline.py, pid 1 on host lost-node" in caplog.text
    assert "last heartbeat was 600 s ago" in caplog.text
    assert not fs.exists(path)
    with pytest.raises(ValueError, match="must exceed heartbeat_s"):
        OutputLock(out, "x", heartbeat_s=10, stale_after_s=5)
