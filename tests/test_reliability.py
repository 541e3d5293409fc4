"""Nothing lost after labelling, resume that resumes, shards that are checked: the pipeline under faults.

* the driver SIGKILLed half-way: the rerun keeps what was labelled;
* one labelling actor killed mid-run: nothing lost or duplicated, at most one batch redone;
* bytes overwritten inside a shard: the row fails its checksum, is relabelled and reported;
* a truncated shard: quarantined once, named in the report, never warned about again;
* the disk full while a shard is written: the finished shards stay, the rerun resumes;
* the in-process path and the Ray path write the same shards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from pointseg.config import PipelineConfig, validate
from pointseg.data.prepare import iter_shard_rows


def config(output: Path, n: int = 12, **ray_data) -> dict:
    return {
        "output": str(output),
        "dataset": {"kind": "synthetic", "synthetic": {"num_images": n, "height": 64, "width": 64, "seed": 2}},
        "ray_data": {"num_actors": 1, "batch_size": 2, "no_progress_timeout_s": 300, **ray_data},
        "report": {"num_overlays": 0, "baselines": []},
    }


def run_flow(cfg: dict, output: Path) -> dict:
    import full_pipeline

    return full_pipeline.run(validate(PipelineConfig, cfg), str(output))


def shard_ids(output: Path) -> list[int]:
    return sorted(int(r["image_id"]) for r in iter_shard_rows(str(output / "shards"), ["image_id", "error"]) if not r["error"])


def exported_ids(output: Path) -> list[int]:
    return sorted(a["image_id"] for a in json.loads((output / "panoptic.json").read_text())["annotations"])


def test_in_process_and_ray_paths_write_the_same_shards(ray_local, tmp_path):
    a = run_flow(config(tmp_path / "a", min_images_for_ray=1000), tmp_path / "a")
    b = run_flow(config(tmp_path / "b", min_images_for_ray=0, num_actors=2), tmp_path / "b")
    assert a["images"]["path"] == "in_process" and b["images"]["path"] == "ray"
    files_a = sorted(p.name for p in (tmp_path / "a" / "shards").glob("*.parquet"))
    files_b = sorted(p.name for p in (tmp_path / "b" / "shards").glob("*.parquet"))
    assert files_a == files_b and len(files_a) == 6  # one file per batch of 2, named by fingerprint and ids
    for name in files_a:
        ta = pq.read_table(tmp_path / "a" / "shards" / name).to_pylist()
        tb = pq.read_table(tmp_path / "b" / "shards" / name).to_pylist()
        for ra, rb in zip(ta, tb):
            timing = ("seconds", "file_name", "diagnostics")  # wall times and the output folder differ
            assert {k: v for k, v in ra.items() if k not in timing} == {k: v for k, v in rb.items() if k not in timing}
            da, db = json.loads(ra["diagnostics"]), json.loads(rb["diagnostics"])
            assert {k: v for k, v in da.items() if "seconds" not in k} == {k: v for k, v in db.items() if "seconds" not in k}
    assert a["pseudo_labels"]["pq"] == pytest.approx(b["pseudo_labels"]["pq"])


def test_overwritten_bytes_in_a_shard_are_caught_by_the_checksum(tmp_path):
    out = tmp_path / "run"
    cfg = config(out, n=4)
    run_flow(cfg, out)
    rows = list(iter_shard_rows(str(out / "shards")))
    victim = max(rows, key=lambda r: len(r["label_png"]))
    file = next(p for p in (out / "shards").glob("*.parquet")
                if victim["image_id"] in pq.read_table(p, columns=["image_id"]).column(0).to_pylist())
    data = bytearray(file.read_bytes())
    needle = victim["label_png"][len(victim["label_png"]) // 2:][:64]
    at = data.find(needle)
    assert at > 0, "the label bytes are stored as is (no page compression over the PNG)"
    data[at:at + 64] = bytes((b ^ 0x5A) for b in data[at:at + 64])
    file.write_bytes(bytes(data))
    again = run_flow(cfg, out)
    assert again["images"]["labelled_now"] == 1 and again["images"]["corrupt_rows"] == {victim["image_id"]: file.name}
    assert any(f["stage"] == "shard checksum" and f["image_id"] == victim["image_id"] for f in again["failures"])
    assert exported_ids(out) == [0, 1, 2, 3]
    third = run_flow(cfg, out)  # the relabelled row verifies: nothing left to do
    assert third["images"]["labelled_now"] == 0 and not third["images"]["corrupt_rows"]


def test_a_truncated_shard_is_quarantined_once(tmp_path):
    out = tmp_path / "run"
    cfg = config(out, n=4)
    run_flow(cfg, out)
    file = sorted((out / "shards").glob("*.parquet"))[0]
    file.write_bytes(file.read_bytes()[:100])
    again = run_flow(cfg, out)
    assert again["images"]["labelled_now"] == 2
    (quarantined, reason), = again["images"]["quarantined"].items()
    assert quarantined.endswith(file.name) and (out / "shards_quarantine" / file.name).exists()
    assert any(f["stage"] == "shard quarantined" for f in again["failures"])
    assert "quarantined" in (out / "report.md").read_text()
    third = run_flow(cfg, out)
    assert third["images"]["labelled_now"] == 0 and not third["images"]["quarantined"]
    assert exported_ids(out) == [0, 1, 2, 3]


def _slow_cfg(out: Path, log_dir: Path, n: int, **ray_data) -> dict:
    cfg = config(out, n=n, **ray_data)
    cfg["generator"] = {"method": "tests.slow_generator:SlowPSPS",
                        "params": {"seconds_per_image": 0.25, "log_dir": str(log_dir)}}
    return cfg


def test_a_killed_driver_keeps_what_was_labelled(tmp_path):
    """SIGKILL the driver when about half the images are labelled; the rerun relabels only the rest."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    n = 24
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(_slow_cfg(out, logs, n, min_images_for_ray=1000)))
    script = ("import json, sys; sys.path[:0] = [sys.argv[2], sys.argv[2] + '/flows']; import full_pipeline; "
              "from pointseg.config import PipelineConfig, validate; "
              "full_pipeline.run(validate(PipelineConfig, json.load(open(sys.argv[1]))), json.load(open(sys.argv[1]))['output'])")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'flows'}")
    proc = subprocess.Popen([sys.executable, "-c", script, str(cfg_path), str(ROOT)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(shard_ids(out)) < n // 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = len(shard_ids(out))
    assert n // 2 <= kept < n, f"{kept} of {n} labelled when the driver was killed"
    report = run_flow(json.loads(cfg_path.read_text()), out)
    assert report["images"]["skipped_done"] == kept and report["images"]["labelled_now"] == n - kept
    assert kept / n >= 0.4
    assert exported_ids(out) == list(range(n))  # every image exported exactly once


def test_a_full_disk_stops_the_run_keeps_the_finished_batches_and_the_rerun_resumes(tmp_path, monkeypatch):
    """The disk fills during the third shard write: the run stops with the system's ENOSPC error, the two finished
    shards stay, the half-written one is never read, and the rerun (space freed) labels only the rest."""
    import errno

    from fsspec.implementations.local import LocalFileOpener

    out, n = tmp_path / "run", 12
    real_write, written = LocalFileOpener.write, []

    def filling_disk(self, data):
        if "/shards/" in self.path:
            if len(written) == 2:
                real_write(self, bytes(data)[: len(data) // 2])  # what fits, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
            written.append(self.path)
        return real_write(self, data)

    monkeypatch.setattr(LocalFileOpener, "write", filling_disk)
    with pytest.raises(OSError, match="No space left on device"):
        run_flow(config(out, n, min_images_for_ray=1000), out)
    monkeypatch.setattr(LocalFileOpener, "write", real_write)
    names = sorted(p.name for p in (out / "shards").iterdir())
    assert len(names) == 3 and sum(".parquet.tmp" in p for p in names) == 1  # two whole shards, one cut short
    assert len(shard_ids(out)) == 4
    report = run_flow(config(out, n, min_images_for_ray=1000), out)
    assert report["images"]["skipped_done"] == 4 and report["images"]["labelled_now"] == n - 4
    assert not [p for p in (out / "shards").iterdir() if ".tmp" in p.name]  # the partial file is gone
    assert exported_ids(out) == list(range(n)) and report["failures"] == []


def test_a_killed_actor_loses_nothing_and_redoes_at_most_one_batch(ray_local, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    n, batch = 16, 2
    cfg = _slow_cfg(out, logs, n, min_images_for_ray=0, num_actors=2, batch_size=batch)
    import threading

    def killer():
        deadline = time.time() + 180
        while time.time() < deadline:
            pids = sorted(logs.glob("actor-*.pid"))
            if len(pids) == 2 and len(shard_ids(out)) >= 4:
                os.kill(int(pids[0].read_text()), signal.SIGKILL)
                (logs / "killed").write_text(pids[0].read_text())
                return
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    report = run_flow(cfg, out)
    t.join()
    assert (logs / "killed").exists(), "the test did not get to kill an actor"
    labelled = len((logs / "labelled.log").read_text().splitlines())
    assert report["images"]["exported"] == n and exported_ids(out) == list(range(n))
    ids = [int(r["image_id"]) for r in iter_shard_rows(str(out / "shards"), ["image_id"])]
    assert sorted(ids) == list(range(n))  # no row lost, none duplicated
    assert n <= labelled <= n + batch, f"{labelled - n} images labelled twice"


def test_asking_for_a_gpu_on_a_cpu_cluster_is_a_clear_error(ray_local, tmp_path):
    cfg = config(tmp_path / "run", n=2, min_images_for_ray=0, num_gpus_per_actor=1, wait_for_min_actors_s=0.5)
    assert validate(PipelineConfig, cfg).ray_data.wait_for_min_actors_s == 0.5  # fractions are kept
    with pytest.raises(RuntimeError, match=r"num_gpus_per_actor=1 but the cluster has 0 GPU"):
        run_flow(cfg, tmp_path / "run")


def test_actors_that_do_not_start_in_time_name_the_key_to_raise(ray_local, tmp_path):
    cfg = config(tmp_path / "run", n=2, min_images_for_ray=0, wait_for_min_actors_s=1)
    cfg["generator"] = {"method": "tests.slow_generator:SlowPSPS", "params": {"start_seconds": 10}}
    with pytest.raises(RuntimeError, match=r"pseudo labels: the actors did not start within "
                                           r"ray_data.wait_for_min_actors_s=1 s"):
        run_flow(cfg, tmp_path / "run")


def test_a_second_local_ray_on_the_machine_does_not_break_ray_s_own_lookups(ray_local):
    """With another local Ray running (this session's), a flow's own local Ray is found by Ray's helpers that look
    the cluster up without an address (the state API, as Ray Train's placement-group cleaner calls it): an actor of
    the flow's Ray looks itself up and sees its cluster's address. With a plain ``ray.init()`` the lookup fails with
    "Found multiple active Ray instances". The flow's driver keeps its environment (no ``RAY_ADDRESS`` left behind)."""
    assert ray_local.is_initialized()  # the other local Ray
    script = r"""
import json, os, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/flows"]
import ray
from common import init_ray
from pointseg.config import RayConfig

init_ray(RayConfig(num_cpus=1))

@ray.remote(num_cpus=0.1)
def look():
    from ray.util.state import get_actor, list_nodes
    return os.environ.get("RAY_ADDRESS"), len(list_nodes(timeout=20))

seen, nodes = ray.get(look.remote(), timeout=120)
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "seen": seen, "nodes": nodes,
                  "driver": os.environ.get("RAY_ADDRESS")}))
ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", script, str(ROOT)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["seen"] == got["gcs"] and got["nodes"] == 1 and got["driver"] is None
