"""Pseudo-label shards: the Parquet files the labelling stage writes, one file per batch.

Every batch of images is written as it is labelled, to one file
``shards/part-<fingerprint>-<batch key>.parquet`` whose name is a function of
the generator fingerprint and the batch's image ids: a retried batch (a killed
actor, a rerun) overwrites its own file instead of adding a duplicate, and an
interrupted run keeps every finished batch. Local files are written under a
temporary name and renamed, so a kill never leaves half a file.

Each row carries ``checksum``, the CRC-32 of its ``label_png``,
``segments_info`` and ``uncertainty_png`` (:func:`row_checksum`). Resume and
export verify it: a row whose label bytes changed on disk is relabelled and
reported; a file that cannot be read at all is quarantined (moved to
``shards_quarantine/``, named in the report) rather than warned about forever.

Schema (one row per image): README "Output layout".
"""

from __future__ import annotations

import hashlib
import io
import logging
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pointseg.storage import write_atomic

log = logging.getLogger("pointseg.data.shards")

SHARD_SCHEMA = pa.schema([
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
    ("uncertainty_png", pa.binary()),
    ("seconds", pa.float64()),
    ("error", pa.string()),
    ("checksum", pa.int64()),
])
#: Columns whose bytes the row checksum covers.
CHECKED = ("label_png", "segments_info", "uncertainty_png")
QUARANTINE = "shards_quarantine"


def encode_uncertainty(u: np.ndarray | None) -> bytes:
    """An ``(H, W)`` uncertainty map in [0, 1] as an 8-bit grayscale PNG (``round(255 u)``); ``b""`` for None."""
    if u is None:
        return b""
    u = np.asarray(u, np.float64)
    if u.ndim != 2:
        raise ValueError(f"uncertainty must be (H, W), got shape {u.shape}")
    q = np.rint(np.clip(np.nan_to_num(u, nan=1.0), 0.0, 1.0) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(q, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def decode_uncertainty(data: bytes | None) -> np.ndarray | None:
    """:func:`encode_uncertainty`'s inverse: ``(H, W) float32`` in [0, 1] (quantised to 1/255), or None."""
    if not data:
        return None
    with Image.open(io.BytesIO(bytes(data))) as im:
        return np.asarray(im.convert("L"), np.float32) / 255.0


def row_checksum(row: dict) -> int:
    """CRC-32 of a row's ``label_png``, ``segments_info`` and ``uncertainty_png`` (in that order)."""
    crc = 0
    for key in CHECKED:
        v = row.get(key) or b""
        crc = zlib.crc32(v.encode() if isinstance(v, str) else bytes(v), crc)
    return int(crc)


def batch_file_name(fingerprint: str, image_ids: list[int]) -> str:
    """``part-<fingerprint>-<sha1 of the sorted ids>.parquet``: the same batch always gets the same file."""
    key = hashlib.sha1(",".join(str(int(i)) for i in sorted(image_ids)).encode()).hexdigest()[:16]
    return f"part-{fingerprint}-{key}.parquet"


def write_shard(shards_uri: str, rows: list[dict], fingerprint: str) -> str:
    """Write one batch's rows (checksums filled in) as one Parquet file; returns its URI."""
    for r in rows:
        r["checksum"] = row_checksum(r)
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    buf = io.BytesIO()
    # Statistics only for the ids: min/max of PNG blobs would store label bytes twice, for nothing.
    # The PNG columns are already deflate-compressed: no second compression over them.
    pq.write_table(table, buf, write_statistics=["image_id"],
                   compression={c: ("NONE" if c in ("label_png", "uncertainty_png") else "SNAPPY")
                                for c in SHARD_SCHEMA.names})
    uri = shards_uri.rstrip("/") + "/" + batch_file_name(fingerprint, [r["image_id"] for r in rows])
    write_atomic(uri, buf.getvalue())
    return uri


@dataclass
class ShardScan:
    """What :func:`scan_shards` found.

    done : image ids with a verified, error-free row of the fingerprint.
    failed : image id -> error of its last failed row (and no good row).
    corrupt_rows : image id -> file of a row whose checksum did not match.
    quarantined : file -> reason, for files that could not be read (moved aside).
    rows : number of rows read.
    """

    done: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)
    corrupt_rows: dict[int, str] = field(default_factory=dict)
    quarantined: dict[str, str] = field(default_factory=dict)
    rows: int = 0


def shard_files(shards_uri: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(shards_uri)
    if not fs.exists(path):
        return []
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    for stale in (p for p in fs.find(path) if ".parquet.tmp" in p):  # a killed writer's leftovers
        fs.rm(stale)
    return files


def _quarantine(fs, file: str, shards_path: str, reason: str, scan: ShardScan) -> None:
    root = shards_path.rstrip("/").rsplit("/", 1)[0]
    target = f"{root}/{QUARANTINE}/{file.rsplit('/', 1)[-1]}"
    fs.makedirs(f"{root}/{QUARANTINE}", exist_ok=True)
    fs.mv(file, target)
    scan.quarantined[target] = reason
    log.warning("shard %s is unreadable (%s): moved to %s; its images will be relabelled", file, reason, target)


def iter_verified_rows(shards_uri: str, columns: list[str] | None = None, scan: ShardScan | None = None,
                       batch_size: int = 64) -> Iterator[dict]:
    """Rows of every shard file whose checksum verifies; unreadable files are quarantined and
    rows with a wrong checksum are skipped, both recorded in ``scan``."""
    scan = scan if scan is not None else ShardScan()
    fs, shards_path = fsspec.core.url_to_fs(shards_uri)
    read_cols = None if columns is None else sorted(set(columns) | set(CHECKED) | {"image_id", "checksum"})
    for file in shard_files(shards_uri):
        try:
            with fs.open(file, "rb") as f:
                table = pq.read_table(f, columns=read_cols)
        except Exception as exc:  # noqa: BLE001 - a partial or damaged file
            _quarantine(fs, file, shards_path, f"{type(exc).__name__}: {str(exc)[:160]}", scan)
            continue
        for b in table.to_batches(max_chunksize=batch_size):
            for r in b.to_pylist():
                scan.rows += 1
                if r.get("checksum") is not None and row_checksum(r) != r["checksum"]:
                    scan.corrupt_rows[int(r["image_id"])] = file.rsplit("/", 1)[-1]
                    log.warning("image %s: its shard row in %s fails its checksum; it will be relabelled",
                                r["image_id"], file)
                    continue
                yield r if columns is None else {k: r.get(k) for k in columns}


def scan_shards(shards_uri: str, fingerprint: str | None = None) -> ShardScan:
    """Which images are already labelled (resume): verified error-free rows of ``fingerprint``."""
    scan = ShardScan()
    for r in iter_verified_rows(shards_uri, ["image_id", "error", "config_hash"], scan):
        if fingerprint is not None and r["config_hash"] != fingerprint:
            continue
        image_id = int(r["image_id"])
        if r["error"]:
            scan.failed.setdefault(image_id, r["error"])
        else:
            scan.done.add(image_id)
    for image_id in scan.done:
        scan.failed.pop(image_id, None)
        scan.corrupt_rows.pop(image_id, None)
    return scan
