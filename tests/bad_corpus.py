"""A COCO instances dataset and point file that mix good images with every kind of bad input.

``make_bad_corpus(root)`` writes, under ``root``::

    images/...        the image folder (good files, broken files, two same-named files in a/ and b/)
    outside/...       real, decodable images outside the image folder: the targets of the hostile
                      file_names, so a reader that followed them would succeed silently
    instances.json    COCO instances: images, annotations, categories 1 "red" and 2 "blue"
    points.jsonl      the user's clicks, one line per image (some lines broken)

and returns a :class:`Corpus` whose ``cases`` say, for every kind of input, which image ids it
concerns and what pointseg must do with it:

* ``LABELLED`` — labelled and exported exactly once, like the control image;
* ``IMAGE_ERROR`` — not labelled; the run lists the image as failed with ``reason`` in its message.
  ``stage`` says who finds it: ``prepare`` (the index row carries the error) or ``decode`` (the
  stage that decodes the pixels, with :func:`pointseg.data.images.read_image_as_annotated`);
* ``POINT_DROPPED`` — the image is labelled; the bad point is dropped with a warning holding
  ``reason`` (:func:`pointseg.data.points.validate_points`);
* ``READER_PROBLEM`` — listed in ``PrepareReport.problems`` with ``problem_kind`` and ``reason``;
  the image (if it is in the dataset) is labelled from what is left.

Every good image shows two objects: a red box (category 1) on the left half and a blue box
(category 2) on the right half, 48 x 64 pixels, with one click on each.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

LABELLED = "labelled"
IMAGE_ERROR = "image_error"
POINT_DROPPED = "point_dropped"
READER_PROBLEM = "reader_problem"

H, W = 48, 64
RED, BLUE = (200, 40, 40), (40, 40, 200)
LEFT_BOX, RIGHT_BOX = (2, 46, 2, 30), (2, 46, 34, 62)  # rows r0..r1-1, columns c0..c1-1
CLICKS = [{"x": 10.0, "y": 20.0, "segment": 1, "category_id": 1},
          {"x": 50.0, "y": 20.0, "segment": 2, "category_id": 2}]
CATEGORIES = [{"id": 1, "name": "red", "supercategory": "box"}, {"id": 2, "name": "blue", "supercategory": "box"}]


@dataclass(frozen=True)
class Case:
    """One kind of input and what pointseg must do with it."""

    kind: str
    image_ids: tuple[int, ...]
    outcome: str
    reason: str = ""  # substring of the message that lists it (error, warning or problem)
    problem_kind: str = ""  # kind in PrepareReport.problems ("" when prepare lists nothing)
    stage: str = ""  # IMAGE_ERROR: "prepare" or "decode"
    what: str = ""  # the input, in words (the README table)


@dataclass
class Corpus:
    root: Path
    annotations: Path
    images: Path
    points: Path
    cases: list[Case]
    dataset_ids: set[int] = field(default_factory=set)  # image ids that reach the index

    def config(self, **dataset) -> dict:
        """The ``dataset`` and ``points`` sections of a pipeline config (extra ``dataset`` keys allowed)."""
        return {
            "dataset": {"kind": "coco_instances", "annotations": str(self.annotations), "images": str(self.images),
                        **dataset},
            "points": {"file": str(self.points)},
        }

    @property
    def labelled_ids(self) -> set[int]:
        """Images that must be labelled and exported exactly once."""
        failed = set(self.failed)
        return {i for i in self.dataset_ids if i not in failed}

    @property
    def failed(self) -> dict[int, str]:
        """Image id -> substring of its failure reason."""
        return {i: c.reason for c in self.cases if c.outcome == IMAGE_ERROR for i in c.image_ids}

    @property
    def dropped_points(self) -> dict[int, str]:
        """Image id -> substring of the warning for its dropped point."""
        return {i: c.reason for c in self.cases if c.outcome == POINT_DROPPED for i in c.image_ids}

    @property
    def reader_problems(self) -> list[Case]:
        return [c for c in self.cases if c.outcome == READER_PROBLEM]

    def by_kind(self, kind: str) -> Case:
        return next(c for c in self.cases if c.kind == kind)

    def tree(self) -> dict[str, tuple[int, str]]:
        """Every file under ``root``: relative path -> (size, sha1), to prove nothing was written or changed."""
        return {
            str(p.relative_to(self.root)): (p.stat().st_size, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(self.root.rglob("*"))
            if p.is_file()
        }


def _two_boxes(left=RED, right=BLUE) -> np.ndarray:
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, :32] = left
    rgb[:, 32:] = right
    return rgb


def _polygon(r0, r1, c0, c1) -> list[list[float]]:
    """COCO polygon covering pixel rows r0..r1-1 and columns c0..c1-1 (pixel (r, c) is [c, c+1) x [r, r+1))."""
    return [[c0, r0, c1, r0, c1, r1, c0, r1]]


def _png(path: Path, im: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="PNG")


def _jpeg(rgb: np.ndarray, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95, **kwargs)
    return buf.getvalue()


def make_bad_corpus(root) -> Corpus:
    """Write the corpus under ``root`` (created) and return what each case must give."""
    root = Path(root)
    img = root / "images"
    out = root / "outside"
    img.mkdir(parents=True)
    out.mkdir()
    rgb = _two_boxes()

    images: list[dict] = []
    anns: list[dict] = []
    lines: list[str] = []
    cases: list[Case] = []

    def image(iid, name, h=H, w=W, boxes=True, clicks=True, extra_anns=(), extra_clicks=(), line=None):
        images.append({"id": iid, "file_name": name, "height": h, "width": w})
        if boxes:
            for cat, box in ((1, LEFT_BOX), (2, RIGHT_BOX)):
                add_ann(iid, cat, segmentation=_polygon(*box))
        for a in extra_anns:
            add_ann(iid, **a)
        if line is not None:
            lines.append(line)
        elif clicks:
            lines.append(json.dumps({"image_id": iid, "points": [*CLICKS, *extra_clicks]}))

    def add_ann(iid, category_id, **fields):
        anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": category_id, "iscrowd": 0,
                     "area": 1.0, **fields})

    def case(kind, ids, outcome, reason="", problem_kind="", stage="", what=""):
        cases.append(Case(kind, tuple(ids), outcome, reason, problem_kind, stage, what))

    # ---- decoded normally: different encodings of the same two boxes
    _png(img / "good.png", Image.fromarray(rgb))
    image(1, "good.png")
    case("good", [1], LABELLED, what="plain RGB PNG (the control)")
    _png(img / "gray.png", Image.fromarray(rgb).convert("L"))
    image(2, "gray.png")
    case("grayscale", [2], LABELLED, what="8-bit grayscale PNG (replicated to RGB)")
    _png(img / "palette.png", Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4))
    image(3, "palette.png")
    case("palette", [3], LABELLED, what="palette PNG (expanded through its palette)")
    rgba = np.dstack([rgb, np.full((H, W), 255, np.uint8)])
    rgba[:4, :4, 3] = 0  # a transparent corner: composited on black
    _png(img / "rgba.png", Image.fromarray(rgba))
    image(4, "rgba.png")
    case("rgba", [4], LABELLED, what="RGBA PNG (composited on black)")
    _png(img / "deep16.png", Image.fromarray(rgb[..., 0].astype(np.uint16) * 257))
    image(5, "deep16.png")
    case("png16", [5], LABELLED, what="16-bit grayscale PNG (rescaled to 8 bits)")
    (img / "exif_stored.jpg").write_bytes(_jpeg(rgb, orientation=6))  # shown as 64x48, annotated 48x64
    image(6, "exif_stored.jpg")
    case("exif_stored_grid", [6], LABELLED,
         what="EXIF-rotated JPEG annotated in its stored pixel grid (the COCO convention)")
    (img / "exif_shown.jpg").write_bytes(_jpeg(np.ascontiguousarray(np.rot90(rgb, 1)), orientation=6))
    image(7, "exif_shown.jpg")
    case("exif_shown_grid", [7], LABELLED, what="EXIF-rotated JPEG annotated as shown (after rotation)")
    _png(img / "a" / "same.png", Image.fromarray(rgb))
    _png(img / "b" / "same.png", Image.fromarray(_two_boxes(BLUE, RED)))
    image(8, "a/same.png")
    image(9, "b/same.png", boxes=False, clicks=False,
          extra_anns=[{"category_id": 2, "segmentation": _polygon(*LEFT_BOX)},
                      {"category_id": 1, "segmentation": _polygon(*RIGHT_BOX)}],
          line=json.dumps({"image_id": 9, "points": [dict(CLICKS[0], category_id=2), dict(CLICKS[1], category_id=1)]}))
    case("same_basename", [8, 9], LABELLED,
         what="two images named same.png in folders a/ and b/ (different content and labels)")
    _png(img / "inner.png", Image.fromarray(rgb))
    image(10, "sub/../inner.png")
    case("inner_dotdot", [10], LABELLED, what="file_name 'sub/../inner.png' (a '..' that stays inside the folder)")

    # ---- odd ground truth that is still usable
    one = rgb.copy()
    one[24, 31] = (40, 200, 40)
    _png(img / "one_pixel.png", Image.fromarray(one))
    image(11, "one_pixel.png", extra_anns=[{"category_id": 1, "segmentation": _polygon(24, 25, 31, 32)}],
          extra_clicks=[{"x": 31.0, "y": 24.0, "segment": 3, "category_id": 1}])
    case("one_pixel_object", [11], LABELLED, what="a 1-pixel object (with its click)")
    _png(img / "no_annotations.png", Image.fromarray(rgb))
    image(12, "no_annotations.png", boxes=False)
    case("no_annotations", [12], LABELLED,
         what="image without annotations, with clicks (ground truth: no segment)")
    _png(img / "covered.png", Image.fromarray(rgb))
    image(13, "covered.png", extra_anns=[
        {"category_id": 1, "segmentation": _polygon(10, 21, 5, 16)},  # 121 px, wholly under the next two
        {"category_id": 1, "segmentation": _polygon(10, 16, 5, 16)},
        {"category_id": 1, "segmentation": _polygon(16, 21, 5, 16)},
    ])
    case("covered_instance", [13], READER_PROBLEM, "wholly under smaller instances", "covered_instance",
         what="an instance wholly hidden by two smaller ones")

    # ---- annotations the reader skips (the image is labelled from the rest)
    for iid, name, kind, ann, reason, pkind, what in [
        (14, "unknown_cat.png", "unknown_category", {"category_id": 99, "segmentation": _polygon(0, 2, 0, 2)},
         "category_id 99 unknown", "unknown_category", "annotation with an unknown category id"),
        (15, "bbox_only.png", "bbox_only", {"category_id": 1, "bbox": [4, 4, 6, 6]},
         "only a 'bbox'", "bbox_only", "annotation with a bbox and no segmentation"),
        (16, "empty_seg.png", "empty_segmentation", {"category_id": 1, "segmentation": []},
         "'segmentation' is empty", "empty_segmentation", "annotation with segmentation: []"),
        (17, "degenerate.png", "degenerate_polygon", {"category_id": 1, "segmentation": [[3, 3, 6, 6, 9, 9]]},
         "covers no pixel", "empty_mask", "degenerate polygon (collinear points, no pixel)"),
        (18, "short_polygon.png", "short_polygon", {"category_id": 1, "segmentation": [[3, 3, 6, 6]]},
         "fewer than 3 points", "bad_annotation", "polygon with fewer than 3 points"),
        (19, "bad_rle.png", "rle_wrong_size", {"category_id": 1, "segmentation": {"size": [9, 9], "counts": [81]}},
         "differs from the image size", "bad_annotation", "RLE whose size is not the image's"),
    ]:
        _png(img / name, Image.fromarray(rgb))
        image(iid, name, extra_anns=[ann])
        case(kind, [iid], READER_PROBLEM, reason, pkind, what=what)
    add_ann(999, 1, segmentation=_polygon(0, 2, 0, 2))
    case("annotation_unknown_image", [999], READER_PROBLEM, "image_id 999 is not in 'images'", "unknown_image",
         what="annotation for an image id not in images")
    images.append({"id": 1, "file_name": "not_this_one.png", "height": H, "width": W})
    case("duplicate_image_id", [1], READER_PROBLEM, "image id 1 listed twice", "duplicate_image",
         what="a second images entry with an existing id (the first is kept)")
    images.append({"id": 20, "file_name": "good.png", "height": 0, "width": W})
    case("bad_image_entry", [20], READER_PROBLEM, "size 0x64", "bad_image_entry",
         what="images entry with height 0 (not in the dataset)")
    images.append({"id": 37, "file_name": "good.png", "height": 100_000, "width": 100_000})
    add_ann(37, 1, segmentation=_polygon(0, 2, 0, 2))
    case("absurd_size", [37], READER_PROBLEM, "size 100000x100000 exceeds", "bad_image_entry",
         what="images entry claiming 100000x100000 pixels (not in the dataset; no memory is spent on it)")

    # ---- points: one bad click among good ones (the image is labelled)
    for iid, name, kind, click, reason, what in [
        (21, "point_outside.png", "point_outside", {"x": 500.0, "y": 3.0, "segment": 3, "category_id": 1},
         "outside", "click outside the image"),
        (22, "point_nan.png", "point_nan", {"x": math.nan, "y": 3.0, "segment": 3, "category_id": 1},
         "not finite", "click with x = NaN"),
        (23, "point_unknown_cat.png", "point_unknown_category", {"x": 5.0, "y": 5.0, "segment": 3, "category_id": 42},
         "not a known category", "click with an unknown category id"),
    ]:
        _png(img / name, Image.fromarray(rgb))
        image(iid, name, extra_clicks=[click])
        case(kind, [iid], POINT_DROPPED, reason, what=what)
    lines.append(json.dumps({"image_id": 2, "points": []}))  # image 2's second line: ignored
    case("duplicate_points_line", [2], READER_PROBLEM, "already given on line", "points_line",
         what="a second point-file line for an image (the first is kept)")
    lines.append(json.dumps({"image_id": 1234, "points": CLICKS}))
    case("points_unknown_image", [1234], READER_PROBLEM, "points for image 1234, which is not in the dataset",
         "points_unknown_image", what="point-file line for an image not in the dataset")

    # ---- images that cannot be labelled, found while preparing
    for iid, name, kind, reason, what in [
        (24, "../outside/escape.png", "dotdot_path", "climbs above the folder", "file_name '../outside/escape.png'"),
        (25, str(out / "absolute.png"), "absolute_path", "is an absolute path", "absolute file_name"),
        (26, f"file://{out / 'scheme.png'}", "scheme_path", "is a URI with a scheme", "file_name 'file://...'"),
    ]:
        _png(out / Path(name).name, Image.fromarray(rgb))
        image(iid, name)
        case(kind, [iid], IMAGE_ERROR, reason, "image_path", "prepare",
             what=what + " (a real image outside the folder)")
    _png(img / "crowd_only.png", Image.fromarray(rgb))
    image(27, "crowd_only.png", boxes=False, clicks=False,
          extra_anns=[{"category_id": 1, "iscrowd": 1, "segmentation": _polygon(*LEFT_BOX)}])
    case("crowd_only", [27], IMAGE_ERROR, "has no line for image 27", "no_points", "prepare",
         what="image whose only annotation is a crowd region (no click)")
    _png(img / "no_points.png", Image.fromarray(rgb))
    image(28, "no_points.png", line=json.dumps({"image_id": 28, "points": []}))
    case("no_points", [28], IMAGE_ERROR, "gives an empty list for image 28", "no_points", "prepare",
         what="image whose point-file line has no click")
    _png(img / "bad_json.png", Image.fromarray(rgb))
    image(29, "bad_json.png", line='{"image_id": 29, "points": [{"x": 10.0, "y": 20.0, "segm')
    case("malformed_points_line", [29], IMAGE_ERROR, "invalid JSON: Unterminated string starting at column 52",
         "points_line", "prepare",
         what="truncated JSON line in the point file")
    _png(img / "bad_field.png", Image.fromarray(rgb))
    image(30, "bad_field.png",
          line=json.dumps({"image_id": 30, "points": [dict(CLICKS[0], x="10"), CLICKS[1]]}))
    case("points_wrong_type", [30], IMAGE_ERROR, "field 'points[0].x': expected a number", "points_line", "prepare",
         what="point-file line with a string coordinate")

    # ---- images that cannot be labelled, found when the pixels are decoded
    image(31, "missing.jpg")
    case("missing_file", [31], IMAGE_ERROR, "file not found", stage="decode", what="image file does not exist")
    full = _jpeg(rgb)
    (img / "truncated.jpg").write_bytes(full[: len(full) // 2])
    image(32, "truncated.jpg")
    case("truncated_jpeg", [32], IMAGE_ERROR, "truncated or corrupt JPEG", stage="decode",
         what="JPEG cut in half")
    (img / "empty.png").write_bytes(b"")
    image(33, "empty.png")
    case("zero_bytes", [33], IMAGE_ERROR, "empty file (0 bytes)", stage="decode", what="zero-byte file")
    (img / "text.jpg").write_text("this is not an image\n")
    image(34, "text.jpg")
    case("not_an_image", [34], IMAGE_ERROR, "not a recognised image format", stage="decode",
         what="text file named .jpg")
    _png(img / "wrong_size.png", Image.fromarray(rgb))
    image(35, "wrong_size.png", h=40, w=60)
    case("size_mismatch", [35], IMAGE_ERROR, "annotated as 60x40", stage="decode",
         what="JSON width/height 60x40, file 64x48")
    image(36, "a")
    case("directory", [36], IMAGE_ERROR, "is a directory", stage="decode", what="file_name names a folder")

    ann_path = root / "instances.json"
    ann_path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    points_path = root / "points.jsonl"
    points_path.write_text("\n".join(lines) + "\n")
    dataset_ids = {im["id"] for im in images if 0 < im["height"] < 100_000}
    return Corpus(root, ann_path, img, points_path, cases, dataset_ids)
