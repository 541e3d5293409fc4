"""Small pieces every flow shares: starting or joining Ray, stage timing, CLI parsing."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# Flows run as scripts (`python flows/x.py`, also inside `ray job submit`): make the
# repo importable without an install.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pointseg.config import RayConfig  # noqa: E402

log = logging.getLogger("pointseg.flows")

PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train 2.60's switch of its preemption watcher


def init_ray(cfg: RayConfig):
    """Join the cluster of a Ray job (bare ``ray.init()``) or start a local Ray.

    Inside ``ray job submit`` (``RAY_ADDRESS`` set by the job) or with
    ``ray.address`` configured, resources must not be passed: Ray 2.60 raises.
    """
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # Workers of this flow must import pointseg/operators from the repo.
    pythonpath = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)
    if address:
        ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, log_to_driver=True)
    else:
        # A local cluster inherits this environment: its prestarted workers can then take the actors at
        # once (a runtime_env would make Ray start a fresh worker process for each of them).
        os.environ["PYTHONPATH"] = pythonpath
        # One local node is never preempted: without the watcher each Ray Train run starts one actor
        # process fewer (about 3 CPU-seconds on a 2-core box). Set the variable to 1 to keep it.
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
        kwargs = {"num_cpus": cfg.num_cpus} if cfg.num_cpus else {}
        if cfg.temp_dir:
            kwargs["_temp_dir"] = str(Path(cfg.temp_dir).resolve())
        with own_address_for_ray_processes(ray):
            ray.init(address="local", **kwargs)
    return ray


@contextmanager
def own_address_for_ray_processes(ray):
    """While a local Ray starts, name its own GCS address in ``RAY_ADDRESS`` (and pick that port): its processes
    inherit the environment, so Ray's helpers that look the cluster up without an address (Ray Train's placement-
    group cleaner calls the state API) find this one even when another local Ray runs on the machine; without it
    they die with "Found multiple active Ray instances". The driver's own environment is restored afterwards, so a
    later ``ray.init`` in this process starts afresh."""
    import socket

    with socket.socket() as sock:  # a free port for the GCS (a small race with other programs, as any port pick)
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    wanted = {"RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}", "RAY_GCS_SERVER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class StageTimer:
    """Wall time of each named stage, for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        log.info("stage %s: start", name)
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 3)
            log.info("stage %s: %.1f s", name, self.seconds[name])


def base_parser(description: str, default_config: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=str(ROOT / default_config), help="YAML config")
    p.add_argument("--output", default=None, help="output root (fsspec URI); overrides config 'output'")
    p.add_argument("overrides", nargs="*", help="config overrides as key.path=value")
    return p


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def pipeline_args(doc: str, default_config: str):
    """The start of a pipeline flow's ``main``: logging, ``--config`` / ``--output`` /
    overrides parsed into a :class:`~pointseg.config.PipelineConfig`. Returns ``(cfg, output)``."""
    from pointseg.config import PipelineConfig, load_config

    setup_logging()
    args = base_parser(doc.splitlines()[0], default_config).parse_args()
    cfg = load_config(PipelineConfig, args.config, args.overrides)
    return cfg, args.output or cfg.output
