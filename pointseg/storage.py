"""Writing files so that a reader never sees half of one (a kill mid-write leaves the old file or none), and one
run at a time per output folder."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

import fsspec

log = logging.getLogger(__name__)


def write_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` (any fsspec URI), creating the parent folder.

    On a local filesystem through a temp name of this call's own and a rename (two writers of one file, such as
    a batch redone by a second actor, never share a temp file); object stores write an object whole. A killed
    writer leaves ``<name>.tmp<...>``, which no reader takes for the file.
    """
    fs, path = fsspec.core.url_to_fs(uri)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "file" in protocols:
        tmp = f"{path}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


# --- one run per output folder -------------------------------------------------------------------------------------

LOCK_NAME = ".pointseg.lock"


class OutputInUseError(RuntimeError):
    """Another pointseg run is writing the same output folder."""


def _holder_text(info: dict) -> str:
    if not info:
        return "another process (its lock file holds no details yet)"
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"{info.get('what', 'a pointseg run')}, pid {info.get('pid', '?')} on host {info.get('host', '?')}, "
            f"started {when} (command: {info.get('command', '?')})")


def _read_json(fs, path: str) -> dict:
    try:
        with fs.open(path, "rb") as f:
            data = json.loads(f.read().decode() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


class OutputLock:
    """Holds an output folder for one run, so that two runs cannot interleave their shards, checkpoints and reports
    (a job submitted twice, a retry started while the first attempt still runs).

    A local folder is locked with the kernel's ``flock`` on ``OUTPUT/.pointseg.lock``: the lock ends with the process
    however it ends (SIGKILL, a lost shell), so there are no stale locks to clean up. The file itself stays; it
    names the last holder. Other fsspec filesystems (object stores) have no such lock: there the file is written
    with a heartbeat every ``heartbeat_s`` and deleted on release, and a file whose heartbeat is older than
    ``stale_after_s`` is taken over with a warning. That lock is advisory: two runs started within the same
    moment on an object store can both pass it.
    """

    def __init__(self, output: str, what: str, *, heartbeat_s: float = 30.0, stale_after_s: float = 180.0):
        if stale_after_s <= heartbeat_s:
            raise ValueError(f"stale_after_s ({stale_after_s}) must exceed heartbeat_s ({heartbeat_s})")
        self.output, self.what = output, what
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.fs, root = fsspec.core.url_to_fs(output)
        self.path = root.rstrip("/") + "/" + LOCK_NAME
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.local = "file" in protocols
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.took_over: dict | None = None  # the stale holder replaced (object stores only)

    def _info(self) -> dict:
        return {"what": self.what, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "heartbeat": time.time(), "command": " ".join(sys.argv) or "?", "token": uuid.uuid4().hex}

    def acquire(self) -> "OutputLock":
        folder = self.path.rsplit("/", 1)[0]
        if self.fs.exists(folder) and not self.fs.isdir(folder):
            raise NotADirectoryError(f"output {self.output} is a file, not a folder")
        self.fs.makedirs(folder, exist_ok=True)
        if self.local:
            self._acquire_local()
        else:
            self._acquire_remote()
        return self

    def _acquire_local(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_json(self.fs, self.path)
            os.close(fd)
            raise OutputInUseError(
                f"output {self.output} is in use by another pointseg run: {_holder_text(holder)}. Wait for it to "
                f"end or stop it, or pass another --output: two runs writing one folder would interleave their "
                f"shards, checkpoints and reports") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._info()).encode(), 0)
        self._fd = fd

    def _acquire_remote(self) -> None:
        held = _read_json(self.fs, self.path) if self.fs.exists(self.path) else None
        if held is not None:
            age = time.time() - float(held.get("heartbeat", 0) or 0)
            if age < self.stale_after_s:
                raise OutputInUseError(
                    f"output {self.output} is in use by another pointseg run: {_holder_text(held)}; its last "
                    f"heartbeat was {age:.0f} s ago (a lock is stale after {self.stale_after_s:.0f} s). Wait for it "
                    f"to end or stop it, or pass another --output")
            log.warning("output %s: taking over the lock of %s, whose last heartbeat was %.0f s ago",
                        self.output, _holder_text(held), age)
            self.took_over = held
        self._mine = self._info()
        self._write_remote()
        self._stop.clear()  # a lock object may be taken again after a release
        self._beat = threading.Thread(target=self._heartbeat, name="pointseg-output-lock", daemon=True)
        self._beat.start()

    def _write_remote(self) -> None:
        self._mine["heartbeat"] = time.time()
        with self.fs.open(self.path, "wb") as f:
            f.write(json.dumps(self._mine).encode())

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write_remote()
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next one
                log.warning("output %s: could not refresh the lock's heartbeat", self.output, exc_info=True)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor ends the flock
            self._fd = None
        if self._beat is not None:
            self._stop.set()
            self._beat.join()
            self._beat = None
            if _read_json(self.fs, self.path).get("token") == self._mine["token"]:
                self.fs.rm(self.path)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
