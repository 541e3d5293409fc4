"""Ray Data operators of the pseudo-label stage: thin wrappers around ``pointseg``.

Batches are Ray Data ``numpy`` batches (dict of column -> array). Every row
carries an ``error`` string: an operator that fails on one image records the
reason there and passes the row on, so one bad image never sinks a run; with
``strict=True`` the first error is raised instead. Rows that already carry an
error pass through untouched.

    read_parquet(index) -> decode_images -> attach_points
        -> map_batches(GenerateLabels, ActorPoolStrategy) -> encode_labels -> write_parquet
"""

from __future__ import annotations

import json
import logging
import time
import traceback

import numpy as np

from pointseg.data.images import read_image
from pointseg.data.panoptic_format import encode_png
from pointseg.data.points import validate_points
from pointseg.data.record import Category, Points
from pointseg.generators import build_generator, generator_fingerprint

log = logging.getLogger("pointseg.operators")


def _rows(batch: dict) -> int:
    return len(batch["image_id"])


def _fail(batch: dict, i: int, stage: str, exc: BaseException, strict: bool) -> None:
    image_id = int(batch["image_id"][i])
    reason = f"{stage}: {type(exc).__name__}: {exc}"
    if strict:
        raise RuntimeError(f"image {image_id}: {reason}") from exc
    log.warning("image %s skipped: %s", image_id, reason)
    batch["error"][i] = reason


def decode_images(batch: dict, strict: bool = False) -> dict:
    """Read each row's ``file_name`` into an ``image`` column ``(H, W, 3) uint8``.

    Grayscale, RGBA, 16-bit and EXIF-rotated images are converted; a missing or
    broken file becomes the row's error. ``height``/``width`` are set from the
    decoded image.
    """
    n = _rows(batch)
    batch["error"] = np.array([str(e) for e in batch.get("error", [""] * n)], dtype=object)
    images = np.empty(n, dtype=object)
    heights = np.asarray(batch["height"], np.int64).copy()
    widths = np.asarray(batch["width"], np.int64).copy()
    for i in range(n):
        images[i] = np.zeros((1, 1, 3), np.uint8)
        if batch["error"][i]:
            continue
        try:
            uri = str(batch["file_name"][i])
            img = read_image(uri)
            expected = (int(heights[i]), int(widths[i]))
            if expected[0] > 0 and img.shape[:2] != expected:
                # EXIF rotation: the annotation's pixel grid wins. If the stored
                # (unrotated) grid matches the annotation, the labels were drawn on it.
                raw = read_image(uri, exif_transpose=False)
                if raw.shape[:2] != expected:
                    raise ValueError(f"image is {img.shape[1]}x{img.shape[0]} (WxH) but annotated as {expected[1]}x{expected[0]}")
                img = raw
            images[i] = img
            heights[i], widths[i] = img.shape[:2]
        except Exception as exc:  # noqa: BLE001 - recorded per image
            _fail(batch, i, "decode", exc, strict)
    batch["image"] = images
    batch["height"], batch["width"] = heights, widths
    return batch


def attach_points(batch: dict, categories: dict[int, Category], strict: bool = False) -> dict:
    """Parse the ``points`` JSON column, drop invalid points with a warning.

    Points outside the image, with NaN coordinates or an unknown category are
    dropped and listed in the row's ``warnings``; an image left with no points
    gets an error.
    """
    n = _rows(batch)
    warnings = np.empty(n, dtype=object)
    for i in range(n):
        warnings[i] = "[]"
        if batch["error"][i]:
            continue
        try:
            pts = Points.from_list(json.loads(batch["points"][i]))
            clean, problems = validate_points(pts, int(batch["height"][i]), int(batch["width"][i]), categories)
            if problems:
                if strict:
                    raise ValueError("; ".join(problems))
                for p in problems:
                    log.warning("image %s: %s", batch["image_id"][i], p)
            warnings[i] = json.dumps(problems)
            if len(clean) == 0:
                raise ValueError("image has no valid points")
            batch["points"][i] = json.dumps(clean.to_list())
        except Exception as exc:  # noqa: BLE001
            _fail(batch, i, "points", exc, strict)
    batch["warnings"] = warnings
    return batch


class GenerateLabels:
    """Actor-pool callable: builds the generator once per actor, labels each batch.

    Output columns: ``id_map`` (H, W) int32, ``segments_info``, ``diagnostics``
    (JSON strings), ``seconds``, ``method``, ``config_hash``. The ``image``
    column is dropped.
    """

    def __init__(self, method: str, params: dict, categories: dict[int, Category], strict: bool = False):
        self.generator = build_generator(method, params, categories)
        self.method = method
        self.hash = generator_fingerprint(method, params)
        self.strict = strict

    def __call__(self, batch: dict) -> dict:
        n = _rows(batch)
        id_maps = np.empty(n, dtype=object)
        infos, diags = np.empty(n, dtype=object), np.empty(n, dtype=object)
        seconds = np.zeros(n, np.float64)
        for i in range(n):
            id_maps[i], infos[i], diags[i] = np.zeros((1, 1), np.int32), "[]", "{}"
            if batch["error"][i]:
                continue
            t0 = time.perf_counter()
            try:
                points = Points.from_list(json.loads(batch["points"][i]))
                label = self.generator([batch["image"][i]], [points])[0]
                id_maps[i] = label.id_map.astype(np.int32)
                infos[i] = json.dumps(label.segments_info)
                diags[i] = json.dumps(label.diagnostics, default=float)
            except Exception as exc:  # noqa: BLE001
                log.debug("%s", traceback.format_exc())
                _fail(batch, i, f"generate[{self.method}]", exc, self.strict)
            seconds[i] = time.perf_counter() - t0
        del batch["image"]
        batch.update(
            id_map=id_maps,
            segments_info=infos,
            diagnostics=diags,
            seconds=seconds,
            method=np.array([self.method] * n, dtype=object),
            config_hash=np.array([self.hash] * n, dtype=object),
        )
        return batch


def encode_labels(batch: dict) -> dict:
    """``id_map`` -> ``label_png`` (COCO panoptic PNG bytes); empty bytes on error rows."""
    n = _rows(batch)
    pngs = np.empty(n, dtype=object)
    for i in range(n):
        pngs[i] = b"" if batch["error"][i] else encode_png(batch["id_map"][i])
    del batch["id_map"]
    batch["label_png"] = pngs
    return batch
