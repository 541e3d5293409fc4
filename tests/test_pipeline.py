"""The Ray Data pseudo-label flow end to end: synthetic default, resume, and a corpus of bad input."""

from __future__ import annotations

import json

import pytest
from bad_corpus import CLICKS, make_bad_corpus

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
    # the contrast picture: all 4 images (num_contrasts 4), by decreasing best-IoU gain over voronoi
    c = report["contrast"]
    assert c["reference"] == "voronoi" and sorted(c["image_ids"]) == [0, 1, 2, 3]
    gain = {i: m["per_image"][i]["mean_best_iou"] - report["baselines"]["voronoi"]["per_image"][i]["mean_best_iou"]
            for i in c["image_ids"]}
    assert [gain[i] for i in c["image_ids"]] == sorted(gain.values(), reverse=True)
    assert "## Where the pseudo labels win and lose against voronoi" in md and "report/contrast.png" in md
    assert (out / c["png"]).stat().st_size > 0
    coco = json.loads((out / "panoptic.json").read_text())
    assert len(coco["annotations"]) == 4 and len(list((out / "panoptic").glob("*.png"))) == 4

    rows = list(iter_shard_rows(str(out / "shards")))
    assert sorted(r["image_id"] for r in rows) == [0, 1, 2, 3]
    assert {"image_id", "label_png", "segments_info", "method", "config_hash", "seconds", "error"} <= set(rows[0])
    assert all(r["method"] == "psps" and r["error"] == "" and r["label_png"] for r in rows)

    again = run_flow(TINY, out)  # resume: nothing left to label
    assert again["images"]["labelled_now"] == 0 and again["images"]["skipped_done"] == 4
    assert again["pseudo_labels"]["pq"] == pytest.approx(m["pq"])


def exported_once(output) -> list[int]:
    ids = [a["image_id"] for a in json.loads((output / "panoptic.json").read_text())["annotations"]]
    assert len(ids) == len(set(ids)), "an image was exported twice"
    return sorted(ids)


def bad_corpus_config(root) -> tuple[dict, object]:
    """The bad-input corpus (tests/bad_corpus.py) as a pipeline config, and the corpus."""
    corpus = make_bad_corpus(root)
    cfg = {
        **corpus.config(),
        "ray_data": {"num_actors": 1, "batch_size": 3, "no_progress_timeout_s": 300, "min_images_for_ray": 0},
        "report": {"num_overlays": 2, "baselines": []},
    }
    return cfg, corpus


def test_bad_input_is_reported_per_image_and_nothing_is_lost(ray_local, tmp_path):
    """Issue acceptance: a corpus of >= 25 kinds of bad input among good images through full_pipeline."""
    cfg, corpus = bad_corpus_config(tmp_path / "data")
    assert len({c.kind for c in corpus.cases if c.outcome != "labelled"}) >= 25 and len(corpus.labelled_ids) >= 8
    before = corpus.tree()
    report = run_flow(cfg, tmp_path / "run")
    assert corpus.tree() == before, "the input folder was written to"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"], "a file was written outside the output"
    assert exported_once(tmp_path / "run") == sorted(corpus.labelled_ids)
    # the report lists every bad item with its reason: failed images, reader and point-file problems
    listed = report["failures"]
    for image_id, reason in corpus.failed.items():
        assert any(f["image_id"] == image_id and reason in f["reason"] for f in listed), (image_id, reason)
    for case in corpus.reader_problems:
        assert any(f["image_id"] in case.image_ids and case.reason in f["reason"] for f in listed), case.kind
    md = (tmp_path / "run" / "report.md").read_text()
    assert all(str(image_id) in md for image_id in corpus.failed)
    failed = {int(k): v for k, v in report["images"]["failed"].items()}
    assert set(failed) == set(corpus.failed), failed
    for image_id, reason in corpus.failed.items():
        assert reason in failed[image_id], (image_id, failed[image_id])
    # good, gray, palette, RGBA, 16-bit, both EXIF cases, same-named files... all converted and labelled
    assert report["images"]["exported"] == len(corpus.labelled_ids)
    prep = report["prepare"]
    assert prep["points_for_unknown_images"] == [1234]
    for case in corpus.reader_problems:
        listed = [p["reason"] for p in prep["problems"] if p["image_id"] in case.image_ids]
        assert any(case.reason in r for r in listed), (case.kind, listed)
    rows = {r["image_id"]: r for r in iter_shard_rows(str(tmp_path / "run" / "shards"))}
    assert set(rows) == corpus.dataset_ids  # every image has a row, failed ones with their reason
    for image_id, reason in corpus.dropped_points.items():
        warnings = json.loads(rows[image_id]["warnings"])
        assert len(warnings) == 1 and reason in warnings[0], warnings
    # the two-colour images are labelled along the colour edge, points outside were dropped
    m = report["pseudo_labels"]
    assert m["num_images"] == len(corpus.dataset_ids) and m["pq_th"] > 0.4


def test_strict_mode_makes_the_first_error_fatal(ray_local, tmp_path):
    cfg, _ = bad_corpus_config(tmp_path / "data")
    cfg["strict"] = True
    with pytest.raises(Exception, match="image id 1 listed twice"):
        run_flow(cfg, tmp_path / "run")


def test_strict_mode_fails_on_a_broken_image_inside_ray(ray_local, tmp_path):
    cfg, corpus = bad_corpus_config(tmp_path / "data")
    keep = {1, *corpus.by_kind("truncated_jpeg").image_ids}
    ann = json.loads(corpus.annotations.read_text())
    ann["images"] = [im for im in ann["images"] if im["id"] in keep and im["file_name"] != "not_this_one.png"]
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] in keep]
    corpus.annotations.write_text(json.dumps(ann))
    corpus.points.write_text("".join(json.dumps({"image_id": i, "points": CLICKS}) + "\n" for i in sorted(keep)))
    cfg["strict"] = True
    (truncated,) = corpus.by_kind("truncated_jpeg").image_ids
    with pytest.raises(Exception, match=f"image {truncated}: decode"):
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
