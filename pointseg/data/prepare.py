"""Turn a dataset config into the files the Ray pipeline streams from.

Under an output root (any fsspec URI) :func:`prepare_inputs` writes

* ``images/<image_id:012d>.png`` the synthetic images (real datasets keep their own files);
* ``gt/panoptic.json`` + ``gt/panoptic/<image_id:012d>.png`` ground truth in
  COCO panoptic format, for every image whose ground truth is known (also
  those without any segment); its ``images`` entries keep the dataset's
  ``file_name``;
* ``points.jsonl``      the point labels (simulated, or copied from the user's file);
* ``index/index.parquet`` one row per image: ``image_id, file_name, height,
  width, points`` (JSON) and ``error`` — the ``read_parquet`` source of the
  pipeline;
* ``categories.json``.

Every written name comes from an image id or is fixed: a dataset's
``file_name`` never decides where anything is written, and it is read only
from inside the dataset's image folder unless ``dataset.allow_outside_paths``
(:func:`pointseg.data.images.resolve_under`).

Nothing is silently lost. An image that cannot be labelled for a reason known
here is still an index row, with the reason in ``error`` (every consumer of
the index must skip such rows): a rejected ``file_name`` (the row's
``file_name`` is then ``""``), a point-file line that could not be read, or no
point at all. Everything else wrong with the input (reader problems, skipped
point-file lines, points for images not in the dataset) is listed in
:attr:`PrepareReport.problems` as ``{image_id, kind, reason}``. Image pixels are
not decoded here: a missing, broken or wrongly sized image file is found by the
stage that decodes it.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from pointseg.data.coco import (
    ReadReport,
    add_background_segment,
    background_category,
    instances_to_panoptic,
    read_coco_instances,
    read_coco_panoptic,
)
from pointseg.data.coco_panoptic_io import PanopticWriter
from pointseg.data.points import read_points_jsonl, sample_points, write_points_jsonl
from pointseg.data.record import Category, ImageRecord, InputProblem, Points
from pointseg.data.synthetic import SyntheticDataset, synthetic_categories

if TYPE_CHECKING:  # the config module imports the models; the data layer needs only the field names
    from pointseg.config import DatasetConfig, PointsConfig

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
    """What :func:`prepare_inputs` made and what it found wrong.

    ``image_errors`` maps image id -> the ``error`` of its index row (images
    that cannot be labelled); ``problems`` lists every problem as
    ``{image_id, kind, reason}`` (``image_id`` ``None`` when none is known):
    the reader's kinds (:mod:`pointseg.data.coco`), and ``points_line`` (a
    point-file line skipped), ``points_unknown_image`` (points for an image not
    in the dataset), ``no_points`` (an image without any point).
    ``reader_counts``/``reader_problems`` are the reader's counts and messages.
    """

    num_images: int = 0
    num_points: int = 0
    images_without_points: list[int] = field(default_factory=list)
    points_for_unknown_images: list[int] = field(default_factory=list)
    image_errors: dict[int, str] = field(default_factory=dict)
    problems: list[dict] = field(default_factory=list)
    reader_counts: dict[str, int] = field(default_factory=dict)
    reader_problems: list[str] = field(default_factory=list)

    def add(self, image_id: int | None, kind: str, reason: str) -> None:
        self.problems.append(InputProblem(image_id, kind, reason).to_dict())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_errors"] = {str(k): v for k, v in self.image_errors.items()}
        return d


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def open_out(uri: str, mode: str = "wb"):
    """``fsspec.open`` for writing, creating the parent folder first (local paths need it)."""
    fs, path = fsspec.core.url_to_fs(uri)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    return fs.open(path, mode)


def open_dataset(
    cfg: DatasetConfig, strict: bool = False
) -> tuple[dict[int, Category], Iterable[ImageRecord], ReadReport | None]:
    """Categories, a stream of records with ground truth, and the reader's report (``None`` for synthetic).

    COCO readers get ``cfg.max_images`` and ``cfg.allow_outside_paths``.
    Instance records are made panoptic (:func:`instances_to_panoptic`); an
    instance left without a visible pixel is a ``covered_instance`` note.
    """
    if cfg.background == "stuff" and cfg.kind != "coco_instances":
        raise ValueError(f"dataset.background=stuff applies to coco_instances datasets; {cfg.kind} already labels "
                         "its stuff (use background: void)")
    if cfg.kind == "synthetic":
        s = cfg.synthetic
        records = SyntheticDataset(s.num_images, s.height, s.width, s.seed)
        return synthetic_categories(), itertools.islice(records, cfg.max_images) if cfg.max_images else records, None
    if cfg.kind == "coco_instances":
        if not (cfg.annotations and cfg.images):
            raise ValueError("dataset.kind=coco_instances needs dataset.annotations and dataset.images")
        cats, raw = read_coco_instances(cfg.annotations, cfg.images, max_images=cfg.max_images, strict=strict,
                                        allow_outside_paths=cfg.allow_outside_paths)
        records = _panoptic_records(raw, raw.report)
        if cfg.background == "stuff":  # VOC-panoptic protocol: one background stuff segment per image
            bg = background_category(cats)
            cats = {**cats, bg.id: bg}
            records = (add_background_segment(r, bg.id) for r in records)
        return cats, records, raw.report
    if not (cfg.annotations and cfg.panoptic_dir):
        raise ValueError("dataset.kind=coco_panoptic needs dataset.annotations and dataset.panoptic_dir")
    cats, raw = read_coco_panoptic(cfg.annotations, cfg.panoptic_dir, cfg.images, cfg.categories,
                                   max_images=cfg.max_images, strict=strict,
                                   allow_outside_paths=cfg.allow_outside_paths)
    return cats, raw, raw.report


def _panoptic_records(raw: Iterable[ImageRecord], report: ReadReport) -> Iterator[ImageRecord]:
    for rec in raw:
        pan, dropped = instances_to_panoptic(rec)
        if dropped:
            report.note("covered_instance", f"image {rec.image_id}: instance(s) {dropped} (numbered 1.. in annotation "
                        "order) lie wholly under smaller instances; not in the panoptic ground truth",
                        image_id=rec.image_id)
        yield pan


def local_paths_absolute(dataset: DatasetConfig) -> DatasetConfig:
    """The dataset config with its local relative folders made absolute, so that the index's
    ``file_name`` s read the same from any worker's working directory (Ray actors, Train workers,
    Tune trials run elsewhere)."""
    update = {k: os.path.abspath(v) for k in ("annotations", "images", "panoptic_dir", "categories")
              if (v := getattr(dataset, k)) and "://" not in v and not os.path.isabs(v)}
    return dataset.model_copy(update=update) if update else dataset


def prepare_inputs(
    dataset: DatasetConfig, points_cfg: PointsConfig, output: str, strict: bool = False
) -> tuple[dict[int, Category], PrepareReport]:
    """Write the files listed in the module docstring under ``output``; returns categories and the report.

    ``strict`` makes the first problem of the input an error (reader
    problems, a malformed point-file line, points for an unknown image).
    """
    cats, records, reader_report = open_dataset(local_paths_absolute(dataset), strict)
    user_points = read_points_jsonl(points_cfg.file, strict=strict) if points_cfg.file else None
    report = PrepareReport()
    skipped_lines: dict[int, str] = {}
    for err in user_points.problems if user_points is not None else []:
        report.add(err.image_id, "points_line", str(err))
        log.warning("%s", err)
        if err.image_id is not None:
            skipped_lines.setdefault(err.image_id, str(err))
    gt = PanopticWriter(join(output, "gt"), cats)
    rows: list[dict] = []
    seen: set[int] = set()
    point_items: list[tuple[int, Points]] = []
    for rec in tqdm(records, desc="prepare", unit="img", total=_length(records)):
        seen.add(rec.image_id)
        file_name = _materialise_image(rec, output)
        error = reader_report.image_errors.get(rec.image_id, "") if reader_report is not None else ""
        try:
            if reader_report is None or rec.image_id not in reader_report.gt_missing:
                id_map, info = rec.panoptic()
                gt.add(rec.image_id, rec.original_file_name or file_name.rsplit("/", 1)[-1], id_map, info)
            if user_points is not None:
                pts = user_points.get(rec.image_id, Points.empty())
            else:
                pts = sample_points(rec, points_cfg.scheme, points_cfg.seed)
        except (ValueError, MemoryError) as exc:  # this image's ground truth or simulated points, not the run
            if strict:
                raise
            pts, why = None, f"prepare: {type(exc).__name__}: {exc}"
            report.add(rec.image_id, "prepare_error", why)
            log.warning("image %s: %s", rec.image_id, why)
            error = error or why
        if pts is None:
            pts = Points.empty()
        elif len(pts) == 0:
            no_line = user_points is not None and rec.image_id not in user_points
            skipped = skipped_lines.get(rec.image_id) if no_line else None
            why = _why_no_points(rec, user_points, points_cfg, skipped)
            report.images_without_points.append(rec.image_id)
            if skipped is None:  # else its points_line problem already lists it
                report.add(rec.image_id, "no_points", why)
            log.warning("image %s: %s", rec.image_id, why)
            error = error or why
        if error:
            report.image_errors[rec.image_id] = error
        point_items.append((rec.image_id, pts))
        report.num_points += len(pts)
        rows.append(
            {
                "image_id": rec.image_id,
                "file_name": file_name,
                "height": rec.height,
                "width": rec.width,
                "points": json.dumps(pts.to_list()),
                "error": error,
            }
        )
    gt.close()
    if user_points is not None:
        report.points_for_unknown_images = sorted(set(user_points) - seen)
        beyond = f" (or beyond dataset.max_images={dataset.max_images})" if dataset.max_images else ""
        for image_id in report.points_for_unknown_images:
            msg = f"{points_cfg.file}: points for image {image_id}, which is not in the dataset{beyond}; ignored"
            if strict:
                raise ValueError(msg)
            report.add(image_id, "points_unknown_image", msg)
            log.warning(msg)
    if reader_report is not None:
        report.reader_counts = dict(reader_report.counts)
        report.reader_problems = list(reader_report.messages)
        report.problems[:0] = [p.to_dict() for p in reader_report.items]
    report.num_images = len(rows)
    if not rows:
        raise ValueError(f"dataset {dataset.kind} yielded no images")
    write_points_jsonl(join(output, "points.jsonl"), point_items)
    write_index(join(output, "index", "index.parquet"), rows)
    with open_out(join(output, "categories.json"), "w") as f:
        json.dump([asdict(c) for c in cats.values()], f)
    return cats, report


def _why_no_points(rec: ImageRecord, user_points, points_cfg: PointsConfig, skipped_line: str | None) -> str:
    """The reason an image has no point, for its index row (``skipped_line``: why its only line was skipped)."""
    if user_points is None:
        return f"no points: no non-crowd segment to put a '{points_cfg.scheme}' point on"
    if rec.image_id in user_points:
        return f"no points: {points_cfg.file} gives an empty list for image {rec.image_id}"
    if skipped_line is not None:
        return f"no points: its line in the point file was skipped ({skipped_line})"
    return f"no points: {points_cfg.file} has no line for image {rec.image_id}"


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
    """Stream rows of the Parquet shards under ``shards_uri`` (skipping unreadable files with a warning)."""
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
        for b in pf.iter_batches(batch_size=batch_size, columns=columns):
            yield from b.to_pylist()
