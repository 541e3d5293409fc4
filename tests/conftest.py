"""Shared test fixtures: repo paths, the real data in ../shared/data, a local Ray."""

from __future__ import annotations

import os
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


def red_blue_image(h: int, w: int, edge: int, seed: int = 0):
    """``(h, w, 3)`` uint8: red columns ``0 .. edge - 1``, blue from ``edge``, each pixel off by up to 3 (seeded
    noise, so the geodesic costs have no ties): the two-colour scene of the ``foreground_band`` tests."""
    import numpy as np

    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :edge], img[:, edge:] = (200, 30, 30), (30, 30, 200)
    return np.clip(img.astype(int) + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)


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
        # Inherited by the local cluster's workers (as flows/common.py does): prestarted workers can take actors.
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "flows"),
                                                               os.environ.get("PYTHONPATH", "")) if p)
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # as flows/common.py's local Ray
        from common import own_address_for_ray_processes  # flows/common.py: as a flow's local Ray

        with own_address_for_ray_processes(ray):
            ray.init(address="local", num_cpus=2, _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    ray.shutdown()


def label_run(output: str, num_images: int, size: int, broken=(), unlabelled=()):
    """A real run labelled in this process by the pipeline's own labelling stage (PSPS, no Ray).

    Synthetic inputs; the images ``broken`` are made unreadable, the images
    ``unlabelled`` are left out of labelling (as after an interrupted run).
    Returns ``(PipelineConfig, categories)``.
    """
    from operators.pseudo_label import run_pseudo_labels
    from pointseg.config import PipelineConfig
    from pointseg.data.prepare import prepare_inputs, read_index, write_index
    from pointseg.generators import generator_fingerprint

    cfg = PipelineConfig.model_validate({"dataset": {"kind": "synthetic", "synthetic": {
        "num_images": num_images, "height": size, "width": size, "seed": 0}}})
    cats, _ = prepare_inputs(cfg.dataset, cfg.points, output)
    for i in broken:
        with open(f"{output}/images/{i:012d}.png", "wb") as f:
            f.write(b"not a png")
    index = read_index(f"{output}/index/index.parquet")
    write_index(f"{output}/index/index.parquet", [r for r in index if r["image_id"] not in unlabelled])
    run_pseudo_labels(cfg, cats, output, generator_fingerprint(cfg.generator.method, cfg.generator.params),
                      use_ray=False)
    write_index(f"{output}/index/index.parquet", index)  # the unlabelled images are back in the index
    return cfg, cats


@pytest.fixture(scope="session")
def review_run(tmp_path_factory):
    """A real small run and its review page, shared by the review tests.

    10 synthetic 48x48 images labelled by PSPS in process (the pipeline's
    labelling stage); image 3 is unreadable, image 7 was never labelled. The
    page has 4 cards per page and 2 suggestions per image; ``report.json``
    holds ``per_image`` and the review summary. Returns ``(output folder, categories)``.
    """
    import json

    from pointseg.review.page import write_review

    out = tmp_path_factory.mktemp("review_run")
    cfg, cats = label_run(str(out), 10, 48, broken=(3,), unlabelled=(7,))
    report = {"method": "psps", "config": cfg.model_dump(mode="json")}
    review = write_review(str(out), report, progress=False, page_size=4, num_suggestions=2)
    report["per_image"] = review["per_image"]
    report["review"] = dict(review)
    (out / "report.json").write_text(json.dumps(report))
    return out, cats
