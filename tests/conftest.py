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


@pytest.fixture(scope="session")
def review_run(tmp_path_factory):
    """A real small run and its review page, shared by the review tests.

    10 synthetic 48x48 images labelled by PSPS in process (the pipeline's
    shard rows); image 3 is unreadable, image 7 was never labelled. The page
    has 4 cards per page and 2 suggestions per image; ``report.json`` holds
    ``per_image`` and the review summary as ``full_pipeline`` stores them.
    Returns ``(output folder, categories)``.
    """
    import json

    from pointseg.config import DatasetConfig, PointsConfig
    from pointseg.data.prepare import prepare_inputs, read_index, write_index
    from pointseg.data.shards import label_in_process
    from pointseg.review.page import write_review

    out = tmp_path_factory.mktemp("review_run")
    cats, _ = prepare_inputs(DatasetConfig(kind="synthetic", synthetic={"num_images": 10, "height": 48, "width": 48,
                                                                        "seed": 0}), PointsConfig(), str(out))
    (out / "images" / f"{3:012d}.png").write_bytes(b"not a png")
    index = read_index(str(out / "index" / "index.parquet"))
    write_index(str(out / "index" / "index.parquet"), [r for r in index if r["image_id"] != 7])
    label_in_process(str(out), "psps", {}, cats, progress=False)
    write_index(str(out / "index" / "index.parquet"), index)  # the unlabelled image is back in the index
    report = {"method": "psps", "config": {"generator": {"method": "psps", "params": {}}}}
    review = write_review(str(out), report, progress=False, page_size=4, num_suggestions=2)
    report["per_image"] = review["per_image"]
    report["review"] = {k: v for k, v in review.items()}
    (out / "report.json").write_text(json.dumps(report))
    return out, cats
