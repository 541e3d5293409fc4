"""Shared test fixtures: repo paths, the real data in ../shared/data, a local Ray."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
for p in (ROOT, ROOT / "flows"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data, skipping the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (../shared/data is not part of the repo)")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    on the shared 2-core CI box more threads only add contention."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray for the session, 2 CPUs, temp files under pytest's tmp dir."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, _temp_dir=str(tmp_path_factory.mktemp("ray")),
                 runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'flows'}"}})
    yield ray
    ray.shutdown()
