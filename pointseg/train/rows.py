"""Row decoding shared by every trainable: index rows -> image records.

Stage 1 of a trainable generator reads the index (``image_id, file_name,
height, width, points``): :class:`IndexCollate` decodes each row's image with
the one decoder and the one EXIF rule of the pipeline
(:func:`pointseg.data.images.read_image_as_annotated`), drops invalid points
with the same rule as the labelling stage
(:func:`pointseg.data.points.validate_points`), and hands the good
:class:`~pointseg.data.record.ImageRecord` objects to the method's
``make_batch``. A row that fails is skipped and counted, never fatal.
"""

from __future__ import annotations

import json
from typing import Callable

from pointseg.data.images import read_image_as_annotated
from pointseg.data.points import validate_points
from pointseg.data.record import Category, ImageRecord, Points
from pointseg.train.engine import RowCollate, iter_rows

#: Columns of an index row (``OUTPUT/index/index.parquet``) a stage-1 trainable reads.
INDEX_COLUMNS = ["image_id", "file_name", "height", "width", "points", "error"]


def index_record(row: dict, categories: dict[int, Category]) -> ImageRecord:
    """One index row -> a record with its decoded image and valid points; raises on a bad row."""
    image_id = int(row["image_id"])
    if row.get("error"):  # prepare already knows this image cannot be used (e.g. a path outside the root)
        raise ValueError(str(row["error"]))
    image = read_image_as_annotated(str(row["file_name"]), int(row.get("height", 0) or 0), int(row.get("width", 0) or 0))
    h, w = image.shape[:2]
    points, _ = validate_points(Points.from_list(json.loads(row["points"])), h, w, categories)
    if len(points) == 0:
        raise ValueError("no valid points")
    return ImageRecord(image_id, h, w, str(row["file_name"]), image, points=points)


class IndexCollate(RowCollate):
    """Index rows -> ``make_batch(records)`` plus ``image_ids``; bad rows are skipped and counted.

    ``make_batch`` receives the records of one batch in order (at least one)
    and returns the method's batch dict; it may read ``self.epoch`` through the
    collate it was given to (augmentation).
    """

    def __init__(self, categories: dict[int, Category], make_batch: Callable[[list[ImageRecord]], dict]):
        super().__init__()
        self.categories = categories
        self.make_batch = make_batch

    def __call__(self, rows) -> dict:
        records = []
        for row in iter_rows(rows):
            try:
                records.append(index_record(row, self.categories))
            except Exception as exc:  # noqa: BLE001 - one bad image never sinks the run
                self.skip(row.get("image_id"), f"{type(exc).__name__}: {exc}")
        if not records:
            return {"image_ids": []}
        batch = self.make_batch(records)
        batch["image_ids"] = [r.image_id for r in records]
        return batch
