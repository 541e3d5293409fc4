"""`ray job submit` of flows/full_pipeline.py to a local head with token auth (Ray 2.60), end to end.

What the test does, as shell commands (ports are free ones picked at run time)::

    export HOME=$TMP/home RAY_AUTH_MODE=token PATH=.venv/bin:$PATH
    ray get-auth-token --generate                  # writes $HOME/.ray/auth_token
    ray start --head --block --port=P --dashboard-port=D --include-dashboard=true --num-cpus=2 \\
        --node-ip-address=127.0.0.1 --temp-dir=$TMP/ray  (+ free ports for the agents, see HEAD_PORTS)
    ray job submit --address http://127.0.0.1:D --submission-id ID --no-wait --working-dir . -- \\
        python flows/full_pipeline.py --output $TMP/run dataset.synthetic.num_images=3 ...
    ray job status --address http://127.0.0.1:D ID   # until "Job 'ID' succeeded"

Token auth: ``ray start --head`` turns it on when ``RAY_AUTH_MODE=token`` is set
(it then needs a token already: ``ray get-auth-token --generate``) or when a
token file exists; the job CLI only sends the token when ``RAY_AUTH_MODE=token``
is set in its own environment. The head is stopped by killing its process
group (``ray stop`` would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"
# Every port a head opens: fixed defaults (52365, 10001, ...) collide with other Rays on a shared box.
HEAD_PORTS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port",
              "node-manager-port", "object-manager-port")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def kill_session(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGKILL the head's process group, then any process of this session left (by PID, found by its temp dir)."""
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=30)
    for _ in range(10):
        left = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if temp_dir in cmdline:
                left.append(int(proc.name))
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_job_submit_full_pipeline(tmp_path):
    if not RAY.exists():
        pytest.skip(f"no ray CLI next to {sys.executable}")
    # Short temp dir: Ray's unix socket paths live under it (107-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="psjob", dir="/tmp")
    home, run = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TUNE_"))}
    env.update(HOME=str(home), RAY_AUTH_MODE="token", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")

    gen = ray_cli(env, "get-auth-token", "--generate")
    assert gen.returncode == 0, gen.stderr
    assert (home / ".ray" / "auth_token").read_text() == gen.stdout.strip()

    ports = dict(zip(HEAD_PORTS, free_ports(len(HEAD_PORTS))))
    head_cmd = [str(RAY), "start", "--head", "--block", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                "--include-dashboard=true", f"--temp-dir={temp_dir}", *(f"--{k}={v}" for k, v in ports.items())]
    head_log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(head_cmd, env=env, cwd=ROOT, stdout=head_log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    sid = f"pointseg-test-{os.getpid()}"
    try:
        # Submit; retry while the head's job agent is still starting ("No available agent").
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            sub = ray_cli(env, "job", "submit", "--address", address, "--submission-id", sid, "--no-wait",
                          "--working-dir", str(ROOT), "--",
                          "python", "flows/full_pipeline.py", "--output", str(run),
                          "dataset.synthetic.num_images=3", "dataset.synthetic.height=64",
                          "dataset.synthetic.width=64", "report.num_overlays=1")
            if sub.returncode == 0:
                break
            if "already exists" in sub.stderr + sub.stdout:  # an earlier attempt got through
                break
            assert time.monotonic() < deadline, f"job submit kept failing:\n{sub.stderr[-3000:]}"
            time.sleep(3)

        # Without RAY_AUTH_MODE=token the CLI sends no token and the head refuses it.
        no_auth = ray_cli({k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}, "job", "status", "--address",
                          address, sid)
        assert no_auth.returncode != 0 and "token" in (no_auth.stderr + no_auth.stdout).lower()

        status, deadline = "", time.monotonic() + 240
        while time.monotonic() < deadline:
            st = ray_cli(env, "job", "status", "--address", address, sid)
            text = (st.stdout + st.stderr).lower()  # "Job '<id>' succeeded" / "... failed" / "... was stopped"
            status = next((s for s in ("succeeded", "failed", "stopped") if s in text), "")
            if status:
                break
            time.sleep(5)
        if status != "succeeded":
            logs = ray_cli(env, "job", "logs", "--address", address, sid)
            pytest.fail(f"job {sid} ended as {status or 'still running after 240 s'}:\n{logs.stdout[-4000:]}")

        report = json.loads((run / "report.json").read_text())
        assert 0.0 < report["pseudo_labels"]["pq"] <= 1.0
        assert report["images"]["exported"] == 3 and report["images"]["failed"] == {}
        assert (run / "report.md").exists() and len(report["overlays"]) == 1

        # The job ran in an uploaded copy of the repo without .venv/.git/out (.gitignore + Ray's default excludes).
        pkgs = [p for p in Path(temp_dir).glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
        assert pkgs, "no working_dir package found"
        uploaded = {p.name for p in pkgs[0].iterdir()}
        assert {"flows", "pointseg", "configs"} <= uploaded
        assert not uploaded & {".venv", ".git", "out", "pointseg.egg-info"}
    finally:
        kill_session(head, temp_dir)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
