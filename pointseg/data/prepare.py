"""Turn a dataset config into the files the Ray pipeline streams from.

Under an output root (any fsspec URI) :func:`prepare_inputs` writes

* ``images/<id>.png``   the synthetic images (real datasets keep their own files);
* ``gt/panoptic.json`` + ``gt/panoptic/*.png``  ground truth in COCO panoptic format;
* ``points.jsonl``      the point labels (simulated, or copied from the user's file);
* ``index/index.parquet`` one row per image: ``image_id, file_name, height,
  width, points`` (JSON) and ``error`` — the ``read_parquet`` source of the
  pipeline;
* ``categories.json``.

Nothing is silently lost: points for unknown images, images without points and
reader problems are counted in the returned :class:`PrepareReport`.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from pointseg.config import DatasetConfig, PointsConfig
from pointseg.data.coco import (
    add_background_segment,
    background_category,
    instances_to_panoptic,
    read_coco_instances,
    read_coco_panoptic,
)
from pointseg.data.coco_panoptic_io import PanopticWriter
from pointseg.data.points import read_points_jsonl, sample_points, write_points_jsonl
from pointseg.data.record import Category, ImageRecord, Points
from pointseg.data.synthetic import SyntheticDataset, synthetic_categories

log = logging.getLogger("pointseg.data")

INDEX_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("points", pa.string()),
        ("error", pa.string()),
    ]
)


@dataclass
class PrepareReport:
    num_images: int = 0
    num_points: int = 0
    images_without_points: list[int] = field(default_factory=list)
    points_for_unknown_images: list[int] = field(default_factory=list)
    reader_counts: dict[str, int] = field(default_factory=dict)
    reader_problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def open_out(uri: str, mode: str = "wb"):
    """``fsspec.open`` for writing, creating the parent folder first (local paths need it)."""
    fs, path = fsspec.core.url_to_fs(uri)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    return fs.open(path, mode)


def open_dataset(cfg: DatasetConfig, strict: bool = False) -> tuple[dict[int, Category], Iterable[ImageRecord], object]:
    """Categories, a stream of records with ground truth, and the reader's report (or None)."""
    reader_report = None
    if cfg.background == "stuff" and cfg.kind != "coco_instances":
        raise ValueError(f"dataset.background=stuff applies to coco_instances datasets; {cfg.kind} already labels "
                         "its stuff (use background: void)")
    if cfg.kind == "synthetic":
        s = cfg.synthetic
        cats, records = synthetic_categories(), SyntheticDataset(s.num_images, s.height, s.width, s.seed)
    elif cfg.kind == "coco_instances":
        if not (cfg.annotations and cfg.images):
            raise ValueError("dataset.kind=coco_instances needs dataset.annotations and dataset.images")
        cats, raw = read_coco_instances(cfg.annotations, cfg.images, strict=strict)
        reader_report = raw.report
        records = (instances_to_panoptic(r)[0] for r in raw)
        if cfg.background == "stuff":  # VOC-panoptic protocol: one background stuff segment per image
            bg = background_category(cats)
            cats = {**cats, bg.id: bg}
            records = (add_background_segment(r, bg.id) for r in records)
    else:
        if not (cfg.annotations and cfg.panoptic_dir):
            raise ValueError("dataset.kind=coco_panoptic needs dataset.annotations and dataset.panoptic_dir")
        cats, raw = read_coco_panoptic(cfg.annotations, cfg.panoptic_dir, cfg.images, cfg.categories, strict=strict)
        reader_report, records = raw.report, raw
    if cfg.max_images:
        records = itertools.islice(records, cfg.max_images)
    return cats, records, reader_report


def prepare_inputs(
    dataset: DatasetConfig, points_cfg: PointsConfig, output: str, strict: bool = False
) -> tuple[dict[int, Category], PrepareReport]:
    cats, records, reader_report = open_dataset(dataset, strict)
    user_points = read_points_jsonl(points_cfg.file) if points_cfg.file else None
    report = PrepareReport()
    gt = PanopticWriter(join(output, "gt"), cats)
    rows: list[dict] = []
    seen: set[int] = set()
    point_items: list[tuple[int, Points]] = []
    for rec in tqdm(records, desc="prepare", unit="img", total=_length(records)):
        seen.add(rec.image_id)
        file_name = _materialise_image(rec, output)
        if rec.segments:
            id_map, info = rec.panoptic()
            gt.add(rec.image_id, file_name.rsplit("/", 1)[-1], id_map, info)
        if user_points is not None:
            pts = user_points.get(rec.image_id, Points.empty())
        else:
            pts = sample_points(rec, points_cfg.scheme, points_cfg.seed)
        if len(pts) == 0:
            report.images_without_points.append(rec.image_id)
            log.warning("image %s has no points", rec.image_id)
        point_items.append((rec.image_id, pts))
        report.num_points += len(pts)
        rows.append(
            {
                "image_id": rec.image_id,
                "file_name": file_name,
                "height": rec.height,
                "width": rec.width,
                "points": json.dumps(pts.to_list()),
                "error": "",
            }
        )
    gt.close()
    if user_points is not None:
        report.points_for_unknown_images = sorted(set(user_points) - seen)
        for image_id in report.points_for_unknown_images:
            msg = f"{points_cfg.file}: points for image {image_id}, which is not in the dataset"
            if strict:
                raise ValueError(msg)
            log.warning(msg)
    if reader_report is not None:
        report.reader_counts = dict(reader_report.counts)
        report.reader_problems = list(reader_report.messages)
    report.num_images = len(rows)
    if not rows:
        raise ValueError(f"dataset {dataset.kind} yielded no images")
    write_points_jsonl(join(output, "points.jsonl"), point_items)
    write_index(join(output, "index", "index.parquet"), rows)
    with open_out(join(output, "categories.json"), "w") as f:
        json.dump([asdict(c) for c in cats.values()], f)
    return cats, report


def _length(records) -> int | None:
    try:
        return len(records)
    except TypeError:
        return None


def _materialise_image(rec: ImageRecord, output: str) -> str:
    """Return a URI the workers can read the image from, writing it if it lives in memory."""
    if rec.image is None:
        return rec.file_name
    uri = join(output, "images", f"{rec.image_id:012d}.png")
    buf = io.BytesIO()
    Image.fromarray(rec.image).save(buf, format="PNG")
    with open_out(uri, "wb") as f:
        f.write(buf.getvalue())
    return uri


def clear_dir(uri: str) -> None:
    """Remove a folder (if any) so that it can be written afresh."""
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def write_index(uri: str, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    with open_out(uri, "wb") as f:
        pq.write_table(table, f)


def read_index(uri: str) -> list[dict]:
    with fsspec.open(uri, "rb") as f:
        return pq.read_table(f).to_pylist()


def load_categories(uri: str) -> dict[int, Category]:
    with fsspec.open(uri, "r") as f:
        return {c["id"]: Category(c["id"], c["name"], bool(c["isthing"]), tuple(c.get("color", (0, 0, 0)))) for c in json.load(f)}


def iter_shard_rows(shards_uri: str, columns: list[str] | None = None, batch_size: int = 64) -> Iterator[dict]:
    """Stream rows of the Parquet shards under ``shards_uri`` (skipping unreadable files with a warning).

    Files are read in sorted order. A requested column that a file lacks (a
    column added after an older run wrote it) reads as None.
    """
    fs, path = fsspec.core.url_to_fs(shards_uri)
    if not fs.exists(path):
        return
    for file in sorted(fs.find(path)):
        if not file.endswith(".parquet"):
            continue
        try:
            pf = pq.ParquetFile(fs.open(file, "rb"))
        except Exception as exc:  # noqa: BLE001 - a partial file from a killed run
            log.warning("shard %s unreadable (%s); its images will be relabelled", file, exc)
            continue
        have = None if columns is None else [c for c in columns if c in pf.schema_arrow.names]
        for b in pf.iter_batches(batch_size=batch_size, columns=have):
            rows = b.to_pylist()
            if have is not None and len(have) < len(columns):
                rows = [{c: r.get(c) for c in columns} for r in rows]
            yield from rows
