"""COCO panoptic files (``panoptic.json`` + one PNG per image), read and written
one image at a time through fsspec, so any URI works (local paths, ``s3://``,
``memory://``, ...).

Layout written by :class:`PanopticWriter` under ``root``::

    root/panoptic.json                 images, annotations, categories
    root/panoptic/<image_id:012d>.png  id = R + 256*G + 256**2*B, 0 = VOID

PNG names come from the image id only, so they are unique by construction
(two images called ``a/x.jpg`` and ``b/x.jpg`` cannot overwrite each other)
and a dataset's ``file_name`` never decides where anything is written; the
``images`` entries keep that ``file_name`` as given. Reading follows the
dataset path rule: a PNG name that leaves its folder is an error
(:func:`pointseg.data.images.resolve_under`).

Each annotation is ``{image_id, file_name: "<image_id:012d>.png", segments_info}``
and each segment ``{id, category_id, iscrowd, area, bbox, ...}``, the format of
``panopticapi`` and detectron2, so ``panopticapi.evaluation.pq_compute(
gt_json, "root/panoptic.json", gt_folder, "root/panoptic")`` reads it directly.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import fsspec
import numpy as np

from pointseg.data.images import resolve_under
from pointseg.data.panoptic_format import decode_png, encode_png
from pointseg.data.record import VOID, Category


def join_uri(root: str, *parts: str) -> str:
    """``root/part/...`` for paths and URIs alike (no OS separators)."""
    return posixpath.join(str(root).rstrip("/"), *parts)


def category_from_dict(d: Mapping, where: str = "categories") -> Category:
    """A COCO panoptic category dict (``id, name, isthing, color``) -> :class:`Category`."""
    for key in ("id", "isthing"):
        if key not in d:
            raise ValueError(f"{where}: category {dict(d)} has no field {key!r}")
    color = tuple(int(c) for c in d.get("color", (0, 0, 0)))
    return Category(int(d["id"]), str(d.get("name", d["id"])), bool(int(d["isthing"])), color)


def category_to_dict(c: Category) -> dict:
    """:class:`Category` -> COCO panoptic category dict."""
    return {"id": int(c.id), "name": c.name, "isthing": int(bool(c.isthing)), "color": [int(v) for v in c.color]}


def as_categories(categories: Mapping | list, where: str = "categories") -> dict[int, Category]:
    """Normalise a category table to ``{id: Category}``.

    Accepts ``{id: Category}``, ``{id: dict}`` (panopticapi's form) or a list of
    COCO category dicts.
    """
    items = categories.values() if isinstance(categories, Mapping) else categories
    out: dict[int, Category] = {}
    for c in items:
        cat = c if isinstance(c, Category) else category_from_dict(c, where)
        out[int(cat.id)] = cat
    return out


def read_json(uri: str) -> object:
    with fsspec.open(uri, "r") as f:
        return json.load(f)


def read_categories(uri: str) -> dict[int, Category]:
    """Categories from a JSON file: either a list of categories
    (``panoptic_coco_categories.json``) or any COCO file with a ``categories`` key."""
    data = read_json(uri)
    if isinstance(data, dict):
        if "categories" not in data:
            raise ValueError(f"{uri}: no field 'categories'")
        data = data["categories"]
    return as_categories(data, where=uri)


def read_panoptic_annotations(json_uri: str) -> tuple[dict[int, Category], list[dict], dict[int, dict]]:
    """Read a COCO panoptic JSON.

    Returns
    -------
    categories : {category_id: Category}
    images : list of image dicts (``id, file_name, height, width``), file order
    annotations : {image_id: annotation dict} with ``file_name`` (the PNG) and
        ``segments_info``. A duplicated ``image_id`` is an error.
    """
    data = read_json(json_uri)
    for key in ("annotations", "categories"):
        if key not in data:
            raise ValueError(f"{json_uri}: no field {key!r}")
    categories = as_categories(data["categories"], where=json_uri)
    annotations: dict[int, dict] = {}
    for ann in data["annotations"]:
        for key in ("image_id", "file_name", "segments_info"):
            if key not in ann:
                raise ValueError(f"{json_uri}: annotation {ann.get('image_id', '?')} has no field {key!r}")
        image_id = int(ann["image_id"])
        if image_id in annotations:
            raise ValueError(f"{json_uri}: image_id {image_id} has two annotations")
        annotations[image_id] = ann
    return categories, list(data.get("images", [])), annotations


def read_id_map(folder_uri: str, file_name: str) -> np.ndarray:
    """``(H, W) int32`` id map from ``folder_uri/file_name`` (a COCO panoptic PNG).

    ``file_name`` comes from a JSON file, so it must stay inside ``folder_uri``
    (:func:`pointseg.data.images.resolve_under`; otherwise ``OutsidePathError``).
    """
    with fsspec.open(resolve_under(folder_uri, file_name), "rb") as f:
        return decode_png(f.read())


@dataclass
class PanopticPair:
    """Ground truth and prediction of one image; ``pred_*`` is ``None`` when the
    prediction file has no annotation for this image."""

    image_id: int
    gt_id_map: np.ndarray
    gt_segments_info: list[dict]
    pred_id_map: np.ndarray | None
    pred_segments_info: list[dict] | None


def iter_panoptic_pairs(
    gt_json: str, gt_folder: str, pred_json: str, pred_folder: str
) -> tuple[dict[int, Category], int, Iterator[PanopticPair]]:
    """Stream (gt, pred) pairs in ground-truth annotation order.

    Only one image's maps are in memory at a time. Predictions for images that
    are not in the ground truth are ignored (as in panopticapi).

    Returns ``(gt categories, number of gt images, iterator of PanopticPair)``.
    """
    categories, _, gt_anns = read_panoptic_annotations(gt_json)
    _, _, pred_anns = read_panoptic_annotations(pred_json)

    def pairs() -> Iterator[PanopticPair]:
        for image_id, gt_ann in gt_anns.items():
            gt_map = read_id_map(gt_folder, gt_ann["file_name"])
            pred_ann = pred_anns.get(image_id)
            if pred_ann is None:
                yield PanopticPair(image_id, gt_map, gt_ann["segments_info"], None, None)
                continue
            pred_map = read_id_map(pred_folder, pred_ann["file_name"])
            if pred_map.shape != gt_map.shape:
                raise ValueError(
                    f"image {image_id}: prediction {join_uri(pred_folder, pred_ann['file_name'])} has shape "
                    f"{pred_map.shape}, ground truth {gt_map.shape}"
                )
            yield PanopticPair(image_id, gt_map, gt_ann["segments_info"], pred_map, pred_ann["segments_info"])

    return categories, len(gt_anns), pairs()


def _bbox(mask_rows: np.ndarray, mask_cols: np.ndarray) -> list[int]:
    if len(mask_rows) == 0:
        return [0, 0, 0, 0]
    y0, y1, x0, x1 = mask_rows.min(), mask_rows.max(), mask_cols.min(), mask_cols.max()
    return [int(x0), int(y0), int(x1 - x0 + 1), int(y1 - y0 + 1)]


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


class PanopticWriter:
    """Write a COCO panoptic dataset one image at a time.

    ``add`` writes the PNG at once and keeps only the (small) JSON record, so a
    whole dataset's masks are never in memory. ``close`` (or leaving a ``with``
    block without error) writes ``root/panoptic.json``.

    ``area`` and ``bbox`` of every segment are recomputed from ``id_map``;
    segments absent from the map are dropped (COCO panoptic has no empty
    segments); other JSON-able keys of ``segments_info`` are kept.
    """

    def __init__(self, root_uri: str, categories: Mapping | list):
        self.root_uri = str(root_uri).rstrip("/")
        self.categories = as_categories(categories)
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self._seen: set[int] = set()
        self._closed = False
        fs, path = fsspec.core.url_to_fs(join_uri(self.root_uri, "panoptic"))
        fs.makedirs(path, exist_ok=True)

    @property
    def json_uri(self) -> str:
        return join_uri(self.root_uri, "panoptic.json")

    @property
    def png_folder(self) -> str:
        return join_uri(self.root_uri, "panoptic")

    def add(self, image_id: int, file_name: str, id_map: np.ndarray, segments_info: list[dict]) -> None:
        """Write one image.

        image_id : int, unique within the dataset; the PNG is
            ``panoptic/<image_id:012d>.png`` (``panoptic/-<11 digits>.png`` for a
            negative id).
        file_name : the image's file name as the dataset gives it (e.g.
            ``val2017/000000142238.jpg``), kept in the ``images`` entry; it
            never names a written file.
        id_map : (H, W) int, 0 = VOID, other values are ``segments_info`` ids.
        segments_info : list of dict with at least ``id, category_id``.
        """
        if self._closed:
            raise RuntimeError(f"{self.json_uri}: add() after close()")
        image_id = int(image_id)
        if image_id in self._seen:
            raise ValueError(f"{self.json_uri}: image_id {image_id} added twice")
        id_map = np.asarray(id_map)
        if id_map.ndim != 2:
            raise ValueError(f"image {image_id}: id_map must be (H, W), got shape {id_map.shape}")
        ids, inverse = np.unique(id_map, return_inverse=True)
        inverse = inverse.reshape(id_map.shape)
        by_id = {}
        for seg in segments_info:
            for key in ("id", "category_id"):
                if key not in seg:
                    raise ValueError(f"image {image_id}: segment {seg} has no field {key!r}")
            sid = int(seg["id"])
            if sid == VOID:
                raise ValueError(f"image {image_id}: segment id 0 is reserved for VOID")
            if sid in by_id:
                raise ValueError(f"image {image_id}: segment id {sid} appears twice in segments_info")
            if int(seg["category_id"]) not in self.categories:
                raise ValueError(f"image {image_id}: segment {sid} has unknown category_id {seg['category_id']}")
            by_id[sid] = seg
        unknown = [int(i) for i in ids if i != VOID and int(i) not in by_id]
        if unknown:
            raise ValueError(f"image {image_id}: id_map holds segment ids {unknown} missing from segments_info")

        png_name = f"{image_id:012d}.png"
        with fsspec.open(join_uri(self.png_folder, png_name), "wb") as f:
            f.write(encode_png(id_map))

        out_segments = []
        index_of = {int(v): k for k, v in enumerate(ids.tolist())}
        for sid, seg in by_id.items():
            k = index_of.get(sid)
            if k is None:
                continue
            rows, cols = np.nonzero(inverse == k)
            rec = {key: _jsonable(v) for key, v in seg.items()}
            rec.update(
                id=sid,
                category_id=int(seg["category_id"]),
                iscrowd=int(seg.get("iscrowd", 0)),
                area=int(len(rows)),
                bbox=_bbox(rows, cols),
            )
            out_segments.append(rec)
        height, width = id_map.shape
        self.images.append({"id": image_id, "file_name": str(file_name), "height": int(height), "width": int(width)})
        self.annotations.append({"image_id": image_id, "file_name": png_name, "segments_info": out_segments})
        self._seen.add(image_id)

    def close(self) -> str:
        """Write ``panoptic.json``; returns its URI."""
        if not self._closed:
            data = {
                "images": self.images,
                "annotations": self.annotations,
                "categories": [category_to_dict(c) for c in self.categories.values()],
            }
            with fsspec.open(self.json_uri, "w") as f:
                json.dump(data, f)
            self._closed = True
        return self.json_uri

    def __enter__(self) -> "PanopticWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
