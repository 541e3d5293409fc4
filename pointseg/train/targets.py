"""Training targets from pseudo-label shard rows (schema: README "Output layout").

A row holds ``label_png`` (COCO panoptic PNG, ``id = R + 256 G + 256^2 B``,
0 = unlabeled) and ``segments_info`` (JSON). :func:`decode_label` checks the
two agree and raises :class:`BadShardRow` otherwise; the collates catch it,
log it and count it, so one bad image never sinks a run.

Targets are built from an id map (after augmentation) and a table
``segment id -> category id``:

* Mask2Former: one binary mask per non-crowd segment, ``mask_labels (N, H, W)
  float32`` and ``class_labels (N,) int64`` with the contiguous class index.
* Mask R-CNN: one target per non-crowd thing segment, ``boxes (N, 4) float32``
  xyxy (pixel edges: a one-pixel mask at column c spans ``[c, c + 1)``),
  ``labels (N,) int64`` in ``1..T``, ``masks (N, H, W) uint8``.

Pixels with id ``<= 0`` (VOID, or the augmentation's padding ``-1``) belong to
no segment.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from pointseg.data.panoptic_format import decode_png


class BadShardRow(ValueError):
    """A pseudo-label row that cannot be trained on; ``reason`` says why."""

    def __init__(self, reason: str, image_id: Any = None):
        self.reason = reason
        self.image_id = image_id
        super().__init__(f"image_id {image_id}: {reason}" if image_id is not None else reason)


def _scalar(value):
    if isinstance(value, np.ndarray) and value.shape == ():
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def decode_label(row: dict) -> tuple[np.ndarray, list[dict]]:
    """Decode and validate one row's ``label_png`` and ``segments_info``.

    Checks: ``error`` is empty; the PNG decodes to ``(height, width)``; the
    JSON is a list of segments with unique ids; the non-zero ids of the PNG
    are exactly the ids of ``segments_info``; each ``area`` equals the pixel
    count of its id.

    Returns ``id_map (H, W) int32`` and the parsed ``segments_info``.
    Raises :class:`BadShardRow` naming the field that is wrong.
    """
    image_id = _scalar(row.get("image_id"))
    error = _scalar(row.get("error", "")) or ""
    if error:
        raise BadShardRow(f"error: generator failed on this image ({error})", image_id)
    png = _scalar(row.get("label_png"))
    if png is None or len(png) == 0:
        raise BadShardRow("label_png: empty", image_id)
    try:
        id_map = decode_png(bytes(png))
    except Exception as e:  # PIL raises several types for broken files
        raise BadShardRow(f"label_png: corrupt PNG ({type(e).__name__}: {e})", image_id) from None
    h, w = _scalar(row.get("height")), _scalar(row.get("width"))
    if h is not None and w is not None and id_map.shape != (int(h), int(w)):
        raise BadShardRow(f"label_png: shape {id_map.shape} != (height, width) ({h}, {w})", image_id)
    raw = _scalar(row.get("segments_info"))
    try:
        info = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
        if not isinstance(info, list):
            raise TypeError(f"expected a list, got {type(info).__name__}")
        ids = [int(s["id"]) for s in info]
        for s in info:
            int(s["category_id"]), int(s["area"])
    except Exception as e:
        raise BadShardRow(f"segments_info: unreadable ({type(e).__name__}: {e})", image_id) from None
    if len(set(ids)) != len(ids):
        raise BadShardRow(f"segments_info: duplicate ids {sorted(ids)}", image_id)
    present, counts = np.unique(id_map[id_map != 0], return_counts=True)
    png_area = dict(zip(present.tolist(), counts.tolist()))
    only_info = sorted(set(ids) - set(png_area))
    only_png = sorted(set(png_area) - set(ids))
    if only_info or only_png:
        raise BadShardRow(
            f"segments_info disagrees with label_png: ids only in segments_info {only_info}, only in PNG {only_png}",
            image_id,
        )
    for s in info:
        if int(s["area"]) != png_area[int(s["id"])]:
            raise BadShardRow(
                f"segments_info: segment {s['id']} has area {s['area']} but {png_area[int(s['id'])]} pixels in label_png",
                image_id,
            )
    return id_map, info


def panoptic_targets(
    id_map: np.ndarray, segments_info: list[dict], class_index: dict[int, int]
) -> dict[str, torch.Tensor]:
    """Mask2Former targets: one mask per non-crowd segment present in ``id_map``.

    Parameters
    ----------
    id_map : (H, W) int, segment ids; ``<= 0`` is no segment.
    segments_info : dicts with ``id, category_id`` (``iscrowd`` optional).
    class_index : category id -> contiguous class index ``0..C-1``.

    Returns
    -------
    ``mask_labels (N, H, W) float32`` (1 inside segment n) and ``class_labels
    (N,) int64``, in ``segments_info`` order, segments absent from ``id_map``
    (e.g. cropped away) dropped.
    """
    id_map = np.asarray(id_map)
    masks, labels = [], []
    for s in segments_info:
        if s.get("iscrowd", 0):
            continue
        cat = int(s["category_id"])
        if cat not in class_index:
            raise BadShardRow(f"segments_info: category_id {cat} of segment {s['id']} is not in the category table")
        m = id_map == int(s["id"])
        if m.any():
            masks.append(m)
            labels.append(class_index[cat])
    h, w = id_map.shape
    mask_labels = torch.from_numpy(np.stack(masks).astype(np.float32)) if masks else torch.zeros((0, h, w))
    return {"mask_labels": mask_labels, "class_labels": torch.as_tensor(labels, dtype=torch.int64)}


def instance_targets(
    id_map: np.ndarray, segments_info: list[dict], thing_label: dict[int, int]
) -> dict[str, torch.Tensor]:
    """Mask R-CNN targets for the non-crowd thing segments present in ``id_map``.

    ``thing_label``: thing category id -> label ``1..T``; segments whose
    category is not in it (stuff) are skipped.

    Returns ``boxes (N, 4) float32`` xyxy with ``x1 = min col``, ``x2 = max col
    + 1`` (likewise rows), ``labels (N,) int64``, ``masks (N, H, W) uint8``.
    """
    id_map = np.asarray(id_map)
    h, w = id_map.shape
    boxes, labels, masks = [], [], []
    for s in segments_info:
        cat = int(s["category_id"])
        if s.get("iscrowd", 0) or cat not in thing_label:
            continue
        m = id_map == int(s["id"])
        if not m.any():
            continue
        rows = np.flatnonzero(m.any(1))
        cols = np.flatnonzero(m.any(0))
        boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
        labels.append(thing_label[cat])
        masks.append(m)
    return {
        "boxes": torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4)),
        "labels": torch.as_tensor(labels, dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks).astype(np.uint8)) if masks else torch.zeros((0, h, w), dtype=torch.uint8),
    }
