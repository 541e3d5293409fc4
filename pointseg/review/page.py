"""Write the static review page of a run: ``OUTPUT/review/index.html`` and its assets.

Reads the run through fsspec (any URI: a local folder, a bucket)::

    OUTPUT/index/index.parquet     images, their clicks, reader errors
    OUTPUT/shards/*.parquet        pseudo labels (label_png, segments_info, error, uncertainty_png, ...),
                                   rows whose checksum fails are left out (pointseg.data.shards)
    OUTPUT/categories.json
    OUTPUT/gt/panoptic.json + gt/panoptic/*.png    ground truth, when the run has it
    OUTPUT/report.json             optional: method, config, and per-image scores it already has

and writes::

    OUTPUT/review/index.html       the page (Jinja2 template, inline CSS and JavaScript)
    OUTPUT/review/data.js          the per-image table, loaded with <script src> (works from file://)
    OUTPUT/review/details/chunk-NNNNN.js   clicks, suggestions and segments, loaded on demand
    OUTPUT/review/per_image.json   the same table for scripts
    OUTPUT/review/a/{thumb,img,label,unc,gt}/<image_id>.jpg   pictures
    OUTPUT/suggestions.jsonl       next clicks in the point-label format (points.file)

No server and no network resource: open ``index.html`` from the folder or from
a synced copy of the bucket. The page shows one page of cards at a time (lazy
thumbnails), so 10,000 images stay fast.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

import cv2
import fsspec
import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape
from tqdm import tqdm

from pointseg.data.coco_panoptic_io import read_id_map, read_panoptic_annotations
from pointseg.data.images import encode_jpeg, read_image_as_annotated
from pointseg.data.panoptic_format import decode_png
from pointseg.data.points import write_points_jsonl
from pointseg.data.prepare import join, load_categories, open_out, read_index
from pointseg.data.record import Category, Points
from pointseg.data.shards import decode_uncertainty, iter_verified_rows
from pointseg.generators import generator_fingerprint
from pointseg.review.table import (
    SORTS,
    default_sort,
    error_stage,
    image_quality,
    uncertainty_quality_correlation,
    worst_first,
)
from pointseg.review.options import ReviewOptions
from pointseg.uncertainty import (
    image_summary,
    runner_up_segments,
    segment_summary,
    suggest_clicks,
)
from pointseg.viz.maps import heatmap
from pointseg.viz.overlay import blend, colorize

log = logging.getLogger("pointseg.review")

#: Shard columns the page reads (``uncertainty_png`` may be absent in older runs).
SHARD_FIELDS = ["image_id", "file_name", "height", "width", "method", "config_hash", "label_png", "segments_info",
                "warnings", "error", "uncertainty_png"]
#: Keys of a per-image row that a run's ``report.json["per_image"]`` may provide.
SCORE_KEYS = ("pq", "mean_best_iou", "tp", "fp", "fn", "uncertainty_mean", "uncertain_fraction")


def write_review(output: str, report: dict | None = None, options: ReviewOptions | None = None,
                 progress: bool = True, **kwargs) -> dict:
    """Write ``output/review/index.html`` (+ assets) and ``output/suggestions.jsonl`` for a run.

    Parameters
    ----------
    output : the run's output root (fsspec URI).
    report : the run's report dict; default ``output/report.json`` when it exists.
        Its ``per_image`` scores are used where present, the rest is computed
        from the shards and the ground truth, so runs without it work too.
    options : :class:`ReviewOptions`; keyword arguments override single fields.

    Returns
    -------
    ``{"index", "suggestions", "images", "failed", "sort", "per_image" (worst
    first, the rows of :mod:`pointseg.review.table`), "correlation"}``. Store
    ``per_image`` as ``report.json["per_image"]``: the page's default order is
    this list's order.
    """
    opts = options or ReviewOptions()
    if kwargs:
        opts = ReviewOptions.model_validate({**opts.model_dump(), **kwargs})
    if report is None:
        report = _read_json_if_exists(join(output, "report.json")) or {}
    run = _Run.open(output, report)
    out_dir = join(output, "review")
    rows, details, suggestion_items = [], {}, []
    given = {int(r["image_id"]): r for r in report.get("per_image", []) or []}
    for index_row, shard_row in tqdm(run.pairs(), total=len(run.index), desc="review", unit="img",
                                     disable=not progress):
        row, detail, suggested = _review_image(run, index_row, shard_row, out_dir, opts)
        for k in SCORE_KEYS:
            if given.get(row["image_id"], {}).get(k) is not None:
                row[k] = given[row["image_id"]][k]
        for k in ("pq", "mean_best_iou", "uncertainty_mean", "uncertain_fraction"):
            row[k] = _round(row[k])  # the page sorts the values it shows: the same rounding on both sides
        rows.append(row)
        details[row["image_id"]] = detail
        if suggested is not None:
            suggestion_items.append((row["image_id"], suggested, index_row["file_name"].rsplit("/", 1)[-1]))
    sort = default_sort(rows)
    rows = worst_first(rows, sort)
    correlation = uncertainty_quality_correlation(rows)
    suggestions_uri = join(output, "suggestions.jsonl")
    write_points_jsonl(suggestions_uri, suggestion_items)
    meta = _meta(run, rows, sort, correlation, opts)
    _write_data(out_dir, rows, details, meta, run.categories, opts)
    index_uri = join(out_dir, "index.html")
    with open_out(index_uri, "w") as f:
        f.write(render_page(meta, run.categories, rows))
    failed = sum(1 for r in rows if r["error"])
    log.info("review page: %s (%d images, %d failed)", index_uri, len(rows), failed)
    return {"index": index_uri, "suggestions": suggestions_uri, "images": len(rows), "failed": failed,
            "sort": sort, "per_image": rows, "correlation": correlation}


# --------------------------------------------------------------------------- reading the run


def _read_json_if_exists(uri: str):
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


@dataclass
class _Run:
    output: str
    categories: dict[int, Category]
    index: list[dict]
    gt: dict[int, dict] | None
    chosen: dict[int, int]  # image_id -> ordinal of its shard row
    method: str | None

    @classmethod
    def open(cls, output: str, report: dict) -> "_Run":
        categories = load_categories(join(output, "categories.json"))
        index = read_index(join(output, "index", "index.parquet"))
        gt_json = join(output, "gt", "panoptic.json")
        fs, path = fsspec.core.url_to_fs(gt_json)
        gt = read_panoptic_annotations(gt_json)[2] if fs.exists(path) else None
        method = (report.get("config") or {}).get("generator", {}).get("method") or report.get("method")
        return cls(output, categories, index, gt, _choose_rows(output, _fingerprint(report)), method)

    def pairs(self):
        """``(index row, shard row or None)`` for every index row, in shard order then the missing ones."""
        by_id = {int(r["image_id"]): r for r in self.index}
        wanted = {o: i for i, o in self.chosen.items()}
        seen = set()
        rows = iter_verified_rows(join(self.output, "shards"), SHARD_FIELDS)
        for ordinal, r in enumerate(rows):
            image_id = wanted.get(ordinal)
            if image_id is None or image_id not in by_id:
                continue
            seen.add(image_id)
            yield by_id[image_id], r
        for image_id, r in by_id.items():
            if image_id not in seen:
                yield r, None


def _fingerprint(report: dict) -> str | None:
    """The generator fingerprint of the report's config, or None (then any shard row counts)."""
    gen = (report.get("config") or {}).get("generator")
    if not gen:
        return None
    try:
        return generator_fingerprint(gen["method"], gen.get("params"))
    except Exception as exc:  # noqa: BLE001 - a plug-in generator may not import here
        log.warning("generator fingerprint of the report's config unavailable (%s); using every shard row", exc)
        return None


def _choose_rows(output: str, fingerprint: str | None) -> dict[int, int]:
    """Per image, the ordinal of the shard row to show: the run's generator config first
    (rows of earlier configs are stale), a labelled row before a failed one, then the first."""
    best: dict[int, tuple] = {}
    for ordinal, r in enumerate(iter_verified_rows(join(output, "shards"), ["image_id", "error", "config_hash"])):
        image_id = int(r["image_id"])
        rank = (fingerprint is not None and r["config_hash"] != fingerprint, bool(r["error"]), ordinal)
        if image_id not in best or rank < best[image_id]:
            best[image_id] = rank
    return {i: rank[2] for i, rank in best.items()}


# --------------------------------------------------------------------------- one image


def _fit(shape: tuple[int, int], size: int) -> tuple[int, int]:
    """``(h, w)`` scaled so that the long side is at most ``size`` (never enlarged)."""
    h, w = shape
    f = min(1.0, size / max(h, w))
    return max(1, int(round(h * f))), max(1, int(round(w * f)))


def _resized(rgb: np.ndarray, size: int) -> np.ndarray:
    h, w = _fit(rgb.shape[:2], size)
    if (h, w) == rgb.shape[:2]:
        return rgb
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)


def _save(out_dir: str, kind: str, image_id: int, rgb: np.ndarray, size: int, quality: int) -> str:
    rel = f"a/{kind}/{image_id}.jpg"
    with open_out(join(out_dir, rel), "wb") as f:
        f.write(encode_jpeg(_resized(rgb, size), quality))
    return rel


def _review_image(run: _Run, index_row: dict, shard_row: dict | None, out_dir: str, opts: ReviewOptions):
    """The table row, the detail record and the suggested clicks (Points or None) of one image."""
    image_id = int(index_row["image_id"])
    h, w = int(index_row["height"]), int(index_row["width"])
    error = index_row.get("error") or ""
    if not error and shard_row is None:
        error = "missing: no pseudo label in OUTPUT/shards (not labelled yet, or its shard is unreadable)"
    if not error:
        error = shard_row.get("error") or ""
    try:
        clicks = Points.from_list(json.loads(index_row.get("points") or "[]"))
    except (ValueError, KeyError, TypeError):
        clicks = Points.empty()
    row = {"image_id": image_id, "file_name": index_row["file_name"], "height": h, "width": w,
           "method": (shard_row or {}).get("method") or run.method, "error": error, "stage": error_stage(error),
           "warnings": len(json.loads((shard_row or {}).get("warnings") or "[]")), "num_segments": 0,
           "categories": [], "uncertainty_mean": None, "uncertain_fraction": None,
           "pq": None, "mean_best_iou": None, "tp": None, "fp": None, "fn": None}
    detail = {"points": [[float(x), float(y), int(s), int(c)] for (x, y), s, c in
                         zip(clicks.xy.tolist(), clicks.segment.tolist(), clicks.category_id.tolist())],
              "suggestions": [], "segments": [], "warnings": json.loads((shard_row or {}).get("warnings") or "[]"),
              "panels": {}}
    suggested = None
    q = opts.jpeg_quality
    image = None
    try:
        image = read_image_as_annotated(index_row["file_name"], h, w)
        h, w = image.shape[:2]
        row["height"], row["width"] = h, w
        detail["panels"]["image"] = _save(out_dir, "img", image_id, image, opts.detail_size, q)
    except Exception as exc:  # noqa: BLE001 - the page shows why
        detail["image_error"] = f"{type(exc).__name__}: {exc}"
    try:
        pred = None
        if not error:
            pred = (decode_png(shard_row["label_png"]), json.loads(shard_row["segments_info"]))
            if pred[0].shape != (h, w):
                raise ValueError(f"pseudo label is {pred[0].shape[1]}x{pred[0].shape[0]} (WxH), image {w}x{h}")
            row["num_segments"] = len(pred[1])
            unc = decode_uncertainty(shard_row.get("uncertainty_png"))
            if unc is not None and unc.shape != (h, w):
                raise ValueError(f"uncertainty map is {unc.shape[1]}x{unc.shape[0]} (WxH), image {w}x{h}")
            seg_unc = {}
            if unc is not None:
                row.update(image_summary(unc, opts.threshold))
                seg_unc = segment_summary(unc, pred[0], opts.threshold)
                suggested, detail["suggestions"] = _suggestions(unc, pred, opts)
                detail["panels"]["uncertainty"] = _save(out_dir, "unc", image_id, _heat(unc, pred[0]),
                                                        opts.detail_size, q)
            detail["segments"] = [[int(s["id"]), int(s["category_id"]), int(s.get("area", 0)),
                                   _round(seg_unc.get(int(s["id"]), {}).get("uncertainty_mean")),
                                   _round(seg_unc.get(int(s["id"]), {}).get("uncertain_fraction"))]
                                  for s in pred[1]]
            if image is not None:
                overlay = blend(image, colorize(*pred, run.categories))
                detail["panels"]["label"] = _save(out_dir, "label", image_id, overlay, opts.detail_size, q)
                _save(out_dir, "thumb", image_id, overlay, opts.thumb_size, q)
        elif image is not None:
            _save(out_dir, "thumb", image_id, image, opts.thumb_size, q)
        ann = run.gt.get(image_id) if run.gt is not None else None
        cats = {int(s["category_id"]) for s in (pred[1] if pred else [])}
        if ann is not None:
            gt_map = read_id_map(join(run.output, "gt", "panoptic"), ann["file_name"])
            cats |= {int(s["category_id"]) for s in ann["segments_info"]}
            if image is not None and gt_map.shape == image.shape[:2]:
                detail["panels"]["gt"] = _save(out_dir, "gt", image_id,
                                               blend(image, colorize(gt_map, ann["segments_info"], run.categories)),
                                               opts.detail_size, q)
            empty = (np.zeros_like(gt_map), [])
            row.update(image_quality(gt_map, ann["segments_info"], *(pred or empty), run.categories, image_id))
        row["categories"] = sorted(cats)
    except Exception as exc:  # noqa: BLE001 - one bad image never sinks the page
        log.warning("review of image %s incomplete: %s: %s", image_id, type(exc).__name__, exc)
        detail["review_error"] = f"{type(exc).__name__}: {exc}"
    detail["has_thumb"] = "image" in detail["panels"]
    return row, detail, suggested


def _round(v, digits: int = 4):
    return None if v is None else round(float(v), digits)


def _heat(unc: np.ndarray, id_map: np.ndarray) -> np.ndarray:
    """The uncertainty as a viridis heat map (0..1) with the label's segment borders in white."""
    pic = heatmap(unc, 0.0, 1.0)
    edges = cv2.morphologyEx(id_map.astype(np.float32), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    pic[edges] = 255
    return pic


def _suggestions(unc: np.ndarray, pred: tuple[np.ndarray, list[dict]], opts: ReviewOptions):
    """Suggested clicks as Points (segment: the runner-up's clicked segment id) and detail rows."""
    picks = suggest_clicks(unc, opts.num_suggestions, opts.suggestion_radius, opts.suggestion_separation)
    if not picks:
        return Points.empty(), []
    id_map, info = pred
    by_id = {int(s["id"]): s for s in info}
    joins = runner_up_segments(id_map, [p["row"] for p in picks], [p["col"] for p in picks])
    xy, segs, cats, rows = [], [], [], []
    for p, sid in zip(picks, joins):
        seg = by_id.get(sid)
        if seg is None:  # VOID everywhere: nothing to join
            continue
        source = int(seg.get("source_segment", sid))
        xy.append([float(p["col"]), float(p["row"])])
        segs.append(source)
        cats.append(int(seg["category_id"]))
        rows.append([float(p["col"]), float(p["row"]), source, int(seg["category_id"]), sid,
                     round(p["score"], 4), round(p["uncertainty"], 4)])
    if not xy:
        return Points.empty(), []
    return Points(np.asarray(xy), segs, cats), rows


# --------------------------------------------------------------------------- page


def _meta(run: _Run, rows: list[dict], sort: str, correlation: dict | None, opts: ReviewOptions) -> dict:
    labelled = [r for r in rows if not r["error"]]

    def mean(key):
        vals = [r[key] for r in labelled if r.get(key) is not None]
        return round(float(np.mean(vals)), 4) if vals else None

    return {
        "title": opts.title or f"pointseg review: {run.method or 'pseudo labels'}",
        "output": run.output,
        "method": run.method,
        "images": len(rows),
        "labelled": len(labelled),
        "failed": len(rows) - len(labelled),
        "has_gt": run.gt is not None,
        "has_uncertainty": any(r["uncertainty_mean"] is not None for r in rows),
        "sort": sort,
        "sorts": [s for s in SORTS if run.gt is not None or s not in ("pq", "best_iou")],
        "page_size": opts.page_size,
        "thumb_size": opts.thumb_size,
        "threshold": opts.threshold,
        "num_suggestions": opts.num_suggestions,
        "mean_uncertainty": mean("uncertainty_mean"),
        "mean_uncertain_fraction": mean("uncertain_fraction"),
        "mean_pq": mean("pq"),
        "mean_best_iou": mean("mean_best_iou"),
        "correlation": correlation,
    }


#: Short keys of a row in data.js (the page's JavaScript reads these).
_SHORT = {"image_id": "id", "file_name": "f", "height": "h", "width": "w", "error": "err", "stage": "st",
          "warnings": "wn", "num_segments": "ns", "categories": "cl", "uncertainty_mean": "u",
          "uncertain_fraction": "uf", "pq": "pq", "mean_best_iou": "iou", "fp": "fp", "fn": "fn"}


def _write_data(out_dir: str, rows: list[dict], details: dict, meta: dict, categories: dict[int, Category],
                opts: ReviewOptions) -> None:
    """data.js (table, worst first), details/chunk-*.js (per-image detail), per_image.json."""
    compact = []
    chunks: list[dict] = []
    for i, r in enumerate(rows):
        c = {s: (_round(r[k]) if isinstance(r[k], float) else r[k]) for k, s in _SHORT.items()}
        c["f"] = str(r["file_name"]).rsplit("/", 1)[-1]
        c["c"] = i // opts.chunk_size
        c["t"] = int(details[r["image_id"]]["has_thumb"])
        compact.append(c)
        if c["c"] == len(chunks):
            chunks.append({})
        chunks[c["c"]][str(r["image_id"])] = details[r["image_id"]]
    used = sorted({c for r in rows for c in r["categories"]})
    cats = {str(i): [categories[i].name, int(categories[i].isthing)] for i in used if i in categories}
    with open_out(join(out_dir, "data.js"), "w") as f:
        f.write("window.REVIEW = " + _js({"meta": meta, "categories": cats, "rows": compact}) + ";\n")
    for n, chunk in enumerate(chunks):
        with open_out(join(out_dir, "details", f"chunk-{n:05d}.js"), "w") as f:
            f.write(f"window.reviewDetails({n}, " + _js(chunk) + ");\n")
    with open_out(join(out_dir, "per_image.json"), "w") as f:
        json.dump(_finite(rows), f)


def _finite(obj):
    """NaN / inf (e.g. a click with a NaN coordinate, kept to show why it was dropped) as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _js(obj) -> str:
    """JSON for a JavaScript file: ``</`` escaped so that no text closes a script element."""
    return json.dumps(_finite(obj), separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


def render_page(meta: dict, categories: dict[int, Category], rows: list[dict]) -> str:
    """The HTML of ``index.html`` (template ``templates/index.html.j2``)."""
    env = Environment(loader=PackageLoader("pointseg.review", "templates"), autoescape=select_autoescape(["html", "j2"]))
    used = sorted({c for r in rows for c in r["categories"]})
    cats = [(i, categories[i].name) for i in used if i in categories]
    sort_names = {"pq": "worst PQ", "uncertainty": "most uncertain", "best_iou": "lowest best IoU",
                  "image_id": "image id"}
    return env.get_template("index.html.j2").render(meta=meta, categories=cats, sort_names=sort_names)
