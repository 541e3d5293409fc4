"""The Ray Data pseudo-label flow end to end: synthetic default, resume, and a corpus of bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from pointseg.config import PipelineConfig, load_config, validate
from pointseg.data.prepare import iter_shard_rows

TINY = {
    "dataset": {"kind": "synthetic", "synthetic": {"num_images": 4, "height": 64, "width": 64, "seed": 1}},
    "ray_data": {"num_actors": 1, "batch_size": 2, "no_progress_timeout_s": 300, "min_images_for_ray": 0},
    "report": {"num_overlays": 1, "baselines": ["voronoi"]},
}


def run_flow(cfg_dict: dict, output):
    import full_pipeline

    cfg = validate(PipelineConfig, cfg_dict)
    return full_pipeline.run(cfg, str(output))


def test_default_config_loads_and_wrong_keys_are_named(tmp_path):
    from conftest import ROOT

    cfg = load_config(PipelineConfig, str(ROOT / "configs/full_pipeline.yaml"), ["generator.params.beta=0.5"])
    assert cfg.generator.params.beta == 0.5 and cfg.dataset.kind == "synthetic"
    with pytest.raises(ValueError, match=r"ray_data\.num_actorz"):
        load_config(PipelineConfig, str(ROOT / "configs/full_pipeline.yaml"), ["ray_data.num_actorz=2"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(Exception, match="could not determine a constructor|python/object"):
        load_config(PipelineConfig, str(bad))  # safe_load only


def test_synthetic_flow_end_to_end_and_resume(ray_local, tmp_path):
    out = tmp_path / "run"
    report = run_flow(TINY, out)
    m = report["pseudo_labels"]
    for key in ("pq", "pq_th", "pq_st", "sq", "rq", "miou"):
        assert 0.0 <= m[key] <= 1.0
    # PSPS uses the image; on scenes with large stuff regions Voronoi cells cannot match segments.
    assert m["pq"] > report["baselines"]["voronoi"]["pq"]
    assert report["images"]["exported"] == 4 and not report["images"]["failed"]
    assert set(report["timings"]) >= {"prepare", "pseudo_label", "evaluate", "report"}
    saved = json.loads((out / "report.json").read_text())
    assert saved["pseudo_labels"]["pq"] == pytest.approx(m["pq"])
    md = (out / "report.md").read_text()
    assert "| psps |" in md and "overlay_" in md
    assert (out / report["overlays"][0]).stat().st_size > 0
    coco = json.loads((out / "panoptic.json").read_text())
    assert len(coco["annotations"]) == 4 and len(list((out / "panoptic").glob("*.png"))) == 4

    rows = list(iter_shard_rows(str(out / "shards")))
    assert sorted(r["image_id"] for r in rows) == [0, 1, 2, 3]
    assert {"image_id", "label_png", "segments_info", "method", "config_hash", "seconds", "error"} <= set(rows[0])
    assert all(r["method"] == "psps" and r["error"] == "" and r["label_png"] for r in rows)

    again = run_flow(TINY, out)  # resume: nothing left to label
    assert again["images"]["labelled_now"] == 0 and again["images"]["skipped_done"] == 4
    assert again["pseudo_labels"]["pq"] == pytest.approx(m["pq"])


def _square_polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def make_bad_corpus(root):
    """A COCO instances dataset where most kinds of bad input occur once."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    h, w = 48, 64
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, :32] = (200, 40, 40)
    rgb[:, 32:] = (40, 40, 200)
    Image.fromarray(rgb).save(img_dir / "good.png")
    Image.fromarray(rgb[..., 0]).convert("L").save(img_dir / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((h, w), 255, np.uint8)])).save(img_dir / "rgba.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(img_dir / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: displayed after a 90 degree turn
    Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1))).save(img_dir / "exif.jpg", exif=exif, quality=95)
    Image.fromarray(rgb).save(img_dir / "full.jpg", quality=95)
    (img_dir / "truncated.jpg").write_bytes((img_dir / "full.jpg").read_bytes()[:300])
    (img_dir / "text.jpg").write_text("not an image")
    Image.fromarray(rgb).save(img_dir / "nopoints.png")
    names = ["good.png", "gray.png", "rgba.png", "deep16.png", "exif.jpg", "truncated.jpg", "text.jpg", "missing.jpg", "nopoints.png"]
    images = [{"id": i + 1, "file_name": n, "height": h, "width": w} for i, n in enumerate(names)]
    images.append({"id": 1, "file_name": "dup.png", "height": h, "width": w})  # duplicate id
    anns, aid = [], 1
    for im in images[: len(names)]:
        for cat, box in ((1, (2, 2, 30, 46)), (2, (34, 2, 62, 46))):
            anns.append({"id": aid, "image_id": im["id"], "category_id": cat, "iscrowd": 0,
                         "segmentation": _square_polygon(*box), "area": 1.0, "bbox": [0, 0, 1, 1]})
            aid += 1
    anns.append({"id": aid, "image_id": 999, "category_id": 1, "iscrowd": 0, "segmentation": _square_polygon(0, 0, 5, 5), "area": 1, "bbox": [0, 0, 5, 5]})
    anns.append({"id": aid + 1, "image_id": 1, "category_id": 77, "iscrowd": 0, "segmentation": _square_polygon(0, 0, 5, 5), "area": 1, "bbox": [0, 0, 5, 5]})
    cats = [{"id": 1, "name": "red", "supercategory": "x"}, {"id": 2, "name": "blue", "supercategory": "x"}]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))

    def pts(extra=()):
        return [{"x": 10.0, "y": 20.0, "segment": 1, "category_id": 1}, {"x": 50.0, "y": 20.0, "segment": 2, "category_id": 2}, *extra]

    lines = [{"image_id": 1, "points": pts([{"x": 500.0, "y": 3.0, "segment": 3, "category_id": 1},
                                             {"x": math.nan, "y": 3.0, "segment": 4, "category_id": 1},
                                             {"x": 5.0, "y": 5.0, "segment": 5, "category_id": 42}])}]
    lines += [{"image_id": i, "points": pts()} for i in range(2, 9)]
    lines += [{"image_id": 9, "points": []}, {"image_id": 1234, "points": pts()}]
    (root / "points.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return {
        "dataset": {"kind": "coco_instances", "annotations": str(root / "ann.json"), "images": str(img_dir)},
        "points": {"file": str(root / "points.jsonl")},
        "ray_data": {"num_actors": 1, "batch_size": 3, "no_progress_timeout_s": 300, "min_images_for_ray": 0},
        "report": {"num_overlays": 2, "baselines": []},
    }


def test_bad_input_is_reported_per_image_and_nothing_is_lost(ray_local, tmp_path):
    cfg = make_bad_corpus(tmp_path / "data")
    report = run_flow(cfg, tmp_path / "run")
    failed = {int(k): v for k, v in report["images"]["failed"].items()}
    assert set(failed) == {6, 7, 8, 9}, failed
    assert "decode" in failed[6] and "decode" in failed[7] and "decode" in failed[8]
    assert "no valid points" in failed[9]
    assert report["images"]["exported"] == 5  # good, gray, RGBA, 16-bit, EXIF all converted and labelled
    prep = report["prepare"]
    assert prep["points_for_unknown_images"] == [1234]
    assert prep["images_without_points"] == [9]
    assert {"duplicate_image", "unknown_image", "unknown_category"} <= set(prep["reader_counts"])
    rows = {r["image_id"]: r for r in iter_shard_rows(str(tmp_path / "run" / "shards"))}
    assert set(rows) == set(range(1, 10))  # every image has a row, failed ones with their reason
    warnings = json.loads(rows[1]["warnings"])
    assert len(warnings) == 3 and any("outside" in w for w in warnings) and any("finite" in w for w in warnings)
    # the two-colour image is labelled along the colour edge, points outside it were dropped
    m = report["pseudo_labels"]
    assert m["num_images"] == 9 and m["pq_th"] > 0.4


def test_strict_mode_makes_the_first_error_fatal(ray_local, tmp_path):
    cfg = make_bad_corpus(tmp_path / "data")
    cfg["strict"] = True
    with pytest.raises(Exception, match="image id 1 listed twice"):
        run_flow(cfg, tmp_path / "run")


def test_strict_mode_fails_on_a_broken_image_inside_ray(ray_local, tmp_path):
    cfg = make_bad_corpus(tmp_path / "data")
    ann = json.loads((tmp_path / "data" / "ann.json").read_text())
    ann["images"] = [im for im in ann["images"] if im["file_name"] in ("good.png", "truncated.jpg")]
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] in (1, 6) and a["category_id"] in (1, 2)]
    (tmp_path / "data" / "ann.json").write_text(json.dumps(ann))
    lines = [json.loads(x) for x in (tmp_path / "data" / "points.jsonl").read_text().splitlines()]
    keep = [dict(x, points=x["points"][:2]) for x in lines if x["image_id"] in (1, 6)]
    (tmp_path / "data" / "points.jsonl").write_text("\n".join(json.dumps(x) for x in keep) + "\n")
    cfg["strict"] = True
    with pytest.raises(Exception, match="image 6: decode"):
        run_flow(cfg, tmp_path / "run")


def test_changed_generator_config_relabels_on_resume(ray_local, tmp_path):
    out = tmp_path / "run"
    first = run_flow(TINY, out)
    assert first["images"]["labelled_now"] == 4
    changed = {**TINY, "generator": {"method": "psps", "params": {"beta": 2.0}}}
    second = run_flow(changed, out)
    assert second["images"]["labelled_now"] == 4 and second["images"]["exported"] == 4
    hashes = {r["config_hash"] for r in iter_shard_rows(str(out / "shards"))}
    assert len(hashes) == 2  # both runs' rows are kept; only the current config's rows are exported
    again = run_flow(changed, out)
    assert again["images"]["labelled_now"] == 0
