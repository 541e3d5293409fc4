"""Review page at scale: build a synthetic run of N images, write its page, time the first screen in Chromium.

1. ``prepare_inputs`` (synthetic scenes, P1 clicks) and PSPS labels by the
   pipeline's labelling stage in this process (``run_pseudo_labels``, no Ray);
2. ``write_review`` (thumbnails, detail pictures, data.js, suggestions.jsonl);
3. headless Chromium (the system's, driven by playwright) opens
   ``review/index.html`` from the folder ``--repeat`` times, each in a new page:
   seconds from navigation to the first screen (the first page of cards in
   the DOM and its visible thumbnails decoded). Printed, never asserted.

    python benchmarks/review_page.py                     # 2,000 images of 32x32
    python benchmarks/review_page.py --images 48 --size 128 --screenshots docs   # the README pictures
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing

from operators.pseudo_label import run_pseudo_labels  # noqa: E402
from pointseg.config import PipelineConfig  # noqa: E402
from pointseg.data.prepare import prepare_inputs  # noqa: E402
from pointseg.generators import generator_fingerprint  # noqa: E402
from pointseg.review.page import write_review  # noqa: E402
from pointseg.review.browser import chromium, open_review  # noqa: E402


def small_png(path: Path) -> None:
    """Re-save a screenshot with a 256-colour palette (a quarter of the bytes, for the README)."""
    from PIL import Image

    with Image.open(path) as im:
        q = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    q.save(path, optimize=True)


def folder_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=32, help="synthetic image side (>= 32)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--output", default=None, help="keep the run here (default: a temporary folder)")
    p.add_argument("--broken", type=int, default=0, help="make this many images unreadable (failed cards)")
    p.add_argument("--screenshots", type=Path, default=None,
                   help="write review_list.png and review_detail.png of the page here")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.output or tmp)
        t = time.perf_counter()
        cfg = PipelineConfig.model_validate({"dataset": {"kind": "synthetic", "synthetic": {
            "num_images": args.images, "height": args.size, "width": args.size, "seed": 0}}})
        cats, _ = prepare_inputs(cfg.dataset, cfg.points, str(out))
        t_prep = time.perf_counter() - t
        for i in range(args.broken):  # every 7th image, so that they spread over the order
            (out / "images" / f"{7 * i + 5:012d}.png").write_bytes(b"truncated")
        t = time.perf_counter()
        run_pseudo_labels(cfg, cats, str(out), generator_fingerprint(cfg.generator.method, cfg.generator.params),
                          use_ray=False)
        t_label = time.perf_counter() - t
        t = time.perf_counter()
        review = write_review(str(out), {"method": "psps", "config": cfg.model_dump(mode="json")})
        t_review = time.perf_counter() - t
        files, size = folder_size(out / "review")
        data_kb = (out / "review" / "data.js").stat().st_size / 1024
        print(f"{args.images} images of {args.size}x{args.size}: prepare {t_prep:.1f} s, PSPS labels {t_label:.1f} s, "
              f"review page {t_review:.1f} s ({t_review / args.images * 1e3:.1f} ms/image); "
              f"review/ holds {files} files, {size / 2**20:.1f} MiB; data.js {data_kb:.0f} KiB")
        if review["correlation"]:
            print(f"Spearman(per-image uncertainty, PQ) = {review['correlation']['spearman']:+.3f} "
                  f"over {review['correlation']['images']} images")
        seconds = []
        with chromium() as browser:
            for i in range(args.repeat):
                page, s, problems, urls = open_review(browser, out / "review" / "index.html")
                seconds.append(s)
                if problems:
                    raise SystemExit(f"page problems: {problems}")
                if i == 0 and args.screenshots is not None:
                    args.screenshots.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(args.screenshots / "review_list.png"))
                    small_png(args.screenshots / "review_list.png")
                    worst = next(r for r in review["per_image"] if not r["error"])
                    page.click(f".card[data-id='{worst['image_id']}']")
                    page.wait_for_selector(f"body[data-detail='{worst['image_id']}']")
                    page.wait_for_function("Array.from(document.querySelectorAll('.panel img'))"
                                           ".every(i => i.hidden || i.complete)")
                    page.screenshot(path=str(args.screenshots / "review_detail.png"), full_page=True)
                    small_png(args.screenshots / "review_detail.png")
                page.close()
        print(f"first screen in headless Chromium: min {min(seconds):.2f} s, median {statistics.median(seconds):.2f} s "
              f"over {len(seconds)} loads (target < 2 s)")


if __name__ == "__main__":
    main()
