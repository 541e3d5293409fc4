"""Pseudo-label shards: one Parquet row per labelled image, under ``OUTPUT/shards/``.

The Ray pipeline writes them (``operators/pseudo_label.py``); :func:`label_in_process`
writes the same rows in one process, for tests, benchmarks and small runs.

Columns (:data:`SHARD_COLUMNS`): ``image_id``, ``file_name``, ``height``,
``width``, ``method``, ``config_hash`` (generator fingerprint),
``label_png`` (COCO panoptic PNG, empty on error), ``segments_info``,
``diagnostics``, ``warnings`` (JSON strings), ``error`` (``"stage: Type:
message"``, empty when labelled), ``seconds`` and ``uncertainty_png``
(:func:`pointseg.uncertainty.encode_uncertainty`; empty when the generator
gives no map; older shards lack the column).
"""

from __future__ import annotations

import json
import time
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pointseg.data.images import read_image_as_annotated
from pointseg.data.panoptic_format import encode_png
from pointseg.data.points import validate_points
from pointseg.data.prepare import join, open_out, read_index
from pointseg.data.record import Category, Points
from pointseg.generators import build_generator, generator_fingerprint
from pointseg.uncertainty import encode_uncertainty

SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("method", pa.string()),
        ("config_hash", pa.string()),
        ("label_png", pa.binary()),
        ("segments_info", pa.string()),
        ("diagnostics", pa.string()),
        ("warnings", pa.string()),
        ("error", pa.string()),
        ("seconds", pa.float64()),
        ("uncertainty_png", pa.binary()),
    ]
)
SHARD_COLUMNS = tuple(SHARD_SCHEMA.names)


def label_row(row: dict, generator, method: str, fingerprint: str, categories: dict[int, Category]) -> dict:
    """Label one index row (``image_id, file_name, height, width, points``) -> a shard row.

    A failure becomes the row's ``error``, prefixed with its stage (``decode``,
    ``points``, ``generate[method]``) as in the pipeline.
    """
    out = {"image_id": int(row["image_id"]), "file_name": row["file_name"], "height": int(row["height"]),
           "width": int(row["width"]), "method": method, "config_hash": fingerprint, "label_png": b"",
           "segments_info": "[]", "diagnostics": "{}", "warnings": "[]", "error": row.get("error") or "",
           "seconds": 0.0, "uncertainty_png": b""}
    if out["error"]:
        return out
    stage = "decode"
    try:
        image = read_image_as_annotated(row["file_name"], out["height"], out["width"])
        stage = "points"
        points, problems = validate_points(Points.from_list(json.loads(row["points"])), *image.shape[:2], categories)
        out["warnings"] = json.dumps(problems)
        if len(points) == 0:
            raise ValueError("image has no valid points")
        stage = f"generate[{method}]"
        t0 = time.perf_counter()
        label = generator([image], [points])[0]
        out["seconds"] = time.perf_counter() - t0
        out.update(label_png=encode_png(label.id_map), segments_info=json.dumps(label.segments_info),
                   diagnostics=json.dumps(label.diagnostics, default=float),
                   uncertainty_png=encode_uncertainty(label.uncertainty))
    except Exception as exc:  # noqa: BLE001 - recorded per image, the run goes on
        out["error"] = f"{stage}: {type(exc).__name__}: {exc}"
    return out


def write_shard(uri: str, rows: list[dict]) -> None:
    """Write shard rows (all :data:`SHARD_COLUMNS`) as one Parquet file."""
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    with open_out(uri, "wb") as f:
        pq.write_table(table, f)


def label_in_process(output: str, method: str, params: dict | None, categories: dict[int, Category],
                     rows_per_file: int = 1000, progress: bool = True) -> dict:
    """Label every row of ``output/index/index.parquet`` with one generator, in this process.

    Writes ``output/shards/part-XXXXX.parquet`` (rows as the pipeline's) and
    returns ``{"labelled": n, "failed": {image_id: error}}``.
    """
    gen = build_generator(method, params or {}, categories)
    fingerprint = generator_fingerprint(method, params or {})
    rows = read_index(join(output, "index", "index.parquet"))
    failed: dict[int, str] = {}
    batch: list[dict] = []
    part = 0
    for r in tqdm(rows, desc=f"label {method}", unit="img", disable=not progress):
        batch.append(label_row(r, gen, method, fingerprint, categories))
        if batch[-1]["error"]:
            failed[batch[-1]["image_id"]] = batch[-1]["error"]
        if len(batch) == rows_per_file:
            write_shard(join(output, "shards", f"part-{part:05d}.parquet"), batch)
            batch, part = [], part + 1
    if batch:
        write_shard(join(output, "shards", f"part-{part:05d}.parquet"), batch)
    return {"labelled": len(rows) - len(failed), "failed": failed}
