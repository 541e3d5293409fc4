"""Stage-2 model plumbing without Ray: build from config, checkpoint files, point-only labels.

A stage-2 checkpoint is a folder holding ``state.pt``::

    {"model": state_dict, "optimizer": state_dict, "step": int,
     "task": "panoptic" | "instance", "model_config": dict,
     "categories": [{id, name, isthing, color}, ...]}

so a model can be rebuilt anywhere (an evaluation actor, a notebook) from the
folder alone, with random init (the weights come from the file).

The "point label" baseline of EPLD Table 6 trains the same network on the
clicks only. :func:`point_disk_label` turns the points of an image into such a
label: a disk of radius ``r`` around every click, one segment per thing
``segment`` and one per stuff category, everything else VOID.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
import numpy as np
import torch

from pointseg.data.record import Category, Points

STATE_FILE = "state.pt"


def build_stage2_model(task: str, model_config: dict, categories: dict[int, Category], pretrained: bool | str | None = None):
    """``(model, processor)`` for ``task``; ``processor`` is None for the instance model.

    ``pretrained`` overrides the config's field (checkpoint loading passes False).
    """
    cfg = dict(model_config)
    if pretrained is not None:
        cfg["pretrained"] = pretrained
    if task == "panoptic":
        from pointseg.models.panoptic import build_panoptic_model

        return build_panoptic_model(cfg, categories)
    if task == "instance":
        from pointseg.models.instance import build_instance_model

        return build_instance_model(cfg, categories), None
    raise ValueError(f"task: expected 'panoptic' or 'instance', got {task!r}")


def save_checkpoint(folder: str | Path, model, optimizer, step: int, task: str, model_config: dict,
                    categories: dict[int, Category], extra: dict | None = None) -> Path:
    """Write ``folder/state.pt`` (see the module docstring); ``model`` may be DDP-wrapped."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module = getattr(model, "module", model)
    state = {
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": int(step),
        "task": task,
        "model_config": dict(model_config),
        "categories": [asdict(c) for c in categories.values()],
        **(extra or {}),
    }
    tmp = folder / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(folder / STATE_FILE)
    return folder / STATE_FILE


def read_checkpoint(folder: str | Path) -> dict:
    """The dict of ``folder/state.pt``; errors name the folder and the missing key."""
    path = Path(folder) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"stage-2 checkpoint: {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("model", "step", "task", "model_config", "categories"):
        if key not in state:
            raise ValueError(f"stage-2 checkpoint {path}: missing key {key!r}")
    return state


def checkpoint_categories(state: dict) -> dict[int, Category]:
    return {
        int(c["id"]): Category(int(c["id"]), c["name"], bool(c["isthing"]), tuple(c.get("color", (0, 0, 0))))
        for c in state["categories"]
    }


def load_model(folder: str | Path):
    """``(model in eval mode, processor or None, state without tensors)`` from a checkpoint folder."""
    state = read_checkpoint(folder)
    categories = checkpoint_categories(state)
    model, processor = build_stage2_model(state["task"], state["model_config"], categories, pretrained=False)
    model.load_state_dict(state["model"])
    model.eval()
    meta = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
    return model, processor, meta


def point_disk_label(points: Points, height: int, width: int, radius: int,
                     categories: dict[int, Category]) -> tuple[np.ndarray, list[dict]]:
    """A label holding only disks around the clicks (the "point label" supervision).

    Parameters
    ----------
    points : clicks of one image; ``segment`` groups the clicks of one thing.
    height, width : image size.
    radius : disk radius in pixels (0: the click pixel only).
    categories : the label space (``isthing`` decides thing vs stuff).

    Returns
    -------
    ``id_map (H, W) int32`` (0 = VOID) and COCO ``segments_info`` (``id,
    category_id, isthing, iscrowd, area, bbox``). Thing segment ``k`` (in order
    of first click) gets id ``k + 1``; stuff category ``c`` gets one segment.
    Where disks overlap, the later click wins.
    """
    id_map = np.zeros((height, width), np.int32)
    if len(points) == 0:
        return id_map, []
    rc = points.pixels(height, width)
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = (yy**2 + xx**2) <= radius * radius
    dy, dx = yy[disk], xx[disk]
    seg_of: dict[tuple, int] = {}
    cat_of: dict[int, int] = {}
    for (r, c), seg, cat in zip(rc, points.segment, points.category_id):
        cat = int(cat)
        if cat not in categories:
            raise ValueError(f"points: category_id {cat} is not in the category table")
        key = ("thing", int(seg)) if categories[cat].isthing else ("stuff", cat)
        sid = seg_of.setdefault(key, len(seg_of) + 1)
        cat_of[sid] = cat
        rr, cc = r + dy, c + dx
        ok = (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width)
        id_map[rr[ok], cc[ok]] = sid
    info = []
    for sid, cat in cat_of.items():
        ys, xs = np.nonzero(id_map == sid)
        if len(ys) == 0:
            continue
        info.append({
            "id": sid, "category_id": cat, "isthing": int(categories[cat].isthing), "iscrowd": 0,
            "area": int(len(ys)),
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
        })
    return id_map, info


def point_label_rows(index_rows: list[dict], categories: dict[int, Category], radius: int) -> list[dict]:
    """Shard rows (notes/shard_schema.md) with :func:`point_disk_label` labels, one per index row."""
    from pointseg.data.panoptic_format import encode_png

    out = []
    for r in index_rows:
        base = {"image_id": int(r["image_id"]), "file_name": r["file_name"], "height": int(r["height"]),
                "width": int(r["width"]), "method": "points", "config_hash": f"disk{radius}",
                "diagnostics": "{}", "seconds": 0.0, "warnings": "[]"}
        try:
            pts = Points.from_list(json.loads(r["points"]))
            id_map, info = point_disk_label(pts, int(r["height"]), int(r["width"]), radius, categories)
            out.append({**base, "label_png": encode_png(id_map), "segments_info": json.dumps(info), "error": ""})
        except Exception as e:  # noqa: BLE001 - one bad image never sinks the run
            out.append({**base, "label_png": b"", "segments_info": "[]", "error": f"{type(e).__name__}: {e}"})
    return out



def validation_ids(image_ids, val_every: int) -> set[int]:
    """Every ``val_every``-th id in sorted order (starting with the first): the held-out images."""
    if val_every < 2:
        raise ValueError(f"val_every must be >= 2 (got {val_every}): otherwise nothing is left to train on")
    return set(sorted(int(i) for i in image_ids)[::val_every])
