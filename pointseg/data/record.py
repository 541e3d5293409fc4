"""The one in-memory record per image that every part of pointseg passes around.

An :class:`ImageRecord` holds the image, its ground-truth segments (when known)
and its point labels. Segments carry full-resolution boolean masks, so a record
is the unit of streaming: readers yield records one at a time and nothing holds
a whole dataset's masks.

Coordinates: ``x`` is the column, ``y`` the row, both in pixels of the
original image, with the centre of pixel ``(row r, col c)`` at ``(x=c, y=r)``.
A point at ``(x, y)`` lies in pixel ``(round(y), round(x))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Label value meaning "no segment" (COCO panoptic VOID) in id maps.
VOID = 0


@dataclass(frozen=True)
class InputProblem:
    """One thing wrong with the input, as a run report lists it.

    ``image_id`` is the image concerned (``None`` when the problem names none,
    e.g. a bad category entry or a point-file line whose id cannot be read),
    ``kind`` a short fixed word (``unknown_category``, ``image_path``,
    ``points_line``, ...; each reader's docstring lists its kinds) and
    ``reason`` the full message, naming the file, the ids and the field.
    """

    image_id: int | None
    kind: str
    reason: str

    def to_dict(self) -> dict:
        return {"image_id": self.image_id, "kind": self.kind, "reason": self.reason}


@dataclass(frozen=True)
class Category:
    """A class of the label space (COCO panoptic categories have the same fields)."""

    id: int
    name: str
    isthing: bool
    color: tuple[int, int, int] = (0, 0, 0)


@dataclass
class Segment:
    """One panoptic segment: a thing instance or a stuff region.

    ``mask`` is ``(H, W) bool``. ``iscrowd`` segments are VOID for PQ and never
    get points.
    """

    id: int
    category_id: int
    isthing: bool
    mask: np.ndarray
    iscrowd: bool = False

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def bbox(self) -> list[int]:
        """COCO ``[x, y, w, h]`` of the mask (zeros for an empty mask)."""
        ys, xs = np.nonzero(self.mask)
        if len(xs) == 0:
            return [0, 0, 0, 0]
        return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


@dataclass
class Points:
    """Point labels of one image, as parallel arrays.

    Attributes
    ----------
    xy : (P, 2) float64
        ``(x, y)`` pixel coordinates.
    segment : (P,) int64
        Which annotated object a click belongs to. P10 and extreme points give
        several points the same ``segment``; the generator produces one output
        segment per distinct thing ``segment`` and one per stuff category.
    category_id : (P,) int64
    """

    xy: np.ndarray
    segment: np.ndarray
    category_id: np.ndarray

    def __post_init__(self) -> None:
        self.xy = np.asarray(self.xy, dtype=np.float64).reshape(-1, 2)
        self.segment = np.asarray(self.segment, dtype=np.int64).reshape(-1)
        self.category_id = np.asarray(self.category_id, dtype=np.int64).reshape(-1)
        if not (len(self.xy) == len(self.segment) == len(self.category_id)):
            raise ValueError(
                f"Points arrays disagree in length: xy {len(self.xy)}, segment {len(self.segment)}, "
                f"category_id {len(self.category_id)}"
            )

    def __len__(self) -> int:
        return len(self.xy)

    @classmethod
    def empty(cls) -> "Points":
        return cls(np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros(0, np.int64))

    def pixels(self, height: int, width: int) -> np.ndarray:
        """``(P, 2) int64`` ``(row, col)`` of each point, clipped into the image."""
        rc = np.rint(self.xy[:, ::-1]).astype(np.int64)
        rc[:, 0] = np.clip(rc[:, 0], 0, height - 1)
        rc[:, 1] = np.clip(rc[:, 1], 0, width - 1)
        return rc

    def to_list(self) -> list[dict]:
        """Rows of the JSON Lines point format: ``{x, y, segment, category_id}``."""
        return [
            {"x": float(x), "y": float(y), "segment": int(s), "category_id": int(c)}
            for (x, y), s, c in zip(self.xy, self.segment, self.category_id)
        ]

    @classmethod
    def from_list(cls, rows: list[dict]) -> "Points":
        if not rows:
            return cls.empty()
        return cls(
            [[r["x"], r["y"]] for r in rows],
            [r["segment"] for r in rows],
            [r["category_id"] for r in rows],
        )


@dataclass
class ImageRecord:
    """Everything pointseg knows about one image.

    ``image`` is ``(H, W, 3) uint8`` RGB, or ``None`` when not yet decoded
    (then ``file_name`` says where it is). ``segments`` is empty when there is
    no ground truth.

    ``file_name`` is the URI pointseg reads (``""`` when the dataset's name for
    the file was rejected, see :func:`pointseg.data.images.resolve_under`);
    ``original_file_name`` is the dataset's own name for it (COCO's
    ``file_name``), kept for output JSON and messages only: it never decides
    where pointseg reads or writes. ``ignore_mask`` ``(H, W) bool`` (or
    ``None``) marks pixels of annotations the reader had to skip (unknown
    category, no usable mask): what they show is unknown, so they are never
    made background (:func:`pointseg.data.coco.add_background_segment`).
    """

    image_id: int
    height: int
    width: int
    file_name: str = ""
    image: np.ndarray | None = None
    segments: list[Segment] = field(default_factory=list)
    points: Points = field(default_factory=Points.empty)
    original_file_name: str = ""
    ignore_mask: np.ndarray | None = None

    def panoptic(self) -> tuple[np.ndarray, list[dict]]:
        """Ground truth as a COCO panoptic pair.

        Returns ``id_map`` ``(H, W) int32`` (0 = VOID) and ``segments_info``
        (``id, category_id, iscrowd, isthing, area, bbox``). Where masks overlap,
        the later segment in ``segments`` wins; readers order segments so that
        this is the documented rule (see :func:`pointseg.data.coco.instances_to_panoptic`).
        """
        id_map = np.zeros((self.height, self.width), np.int32)
        for seg in self.segments:
            id_map[seg.mask] = seg.id
        info = []
        for seg in self.segments:
            area = int((id_map == seg.id).sum())
            if area == 0:
                continue
            m = id_map == seg.id
            info.append(
                {
                    "id": int(seg.id),
                    "category_id": int(seg.category_id),
                    "iscrowd": int(seg.iscrowd),
                    "isthing": int(seg.isthing),
                    "area": area,
                    "bbox": Segment(seg.id, seg.category_id, seg.isthing, m).bbox,
                }
            )
        return id_map, info
