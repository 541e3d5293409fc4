"""The ExtremeNet band rule for extreme points, on a hand-drawn polygon."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pointseg.data.coco import instances_to_panoptic, read_coco_instances
from pointseg.data.points import extreme_points, extreme_points_band, sample_points
from pointseg.data.record import ImageRecord, Segment

# A hand-drawn outline (x, y), in order. Height t=0.3..b=40 -> h = 40.7, band 0.814 px;
# width l=4.8..r=30.2 -> w = 26.4, band 0.528 px.
POLY = np.array([(10, 0.5), (14, 0.3), (18, 0.6), (30, 10), (29.5, 20), (30.2, 22), (20, 40),
                 (5, 25), (4.8, 15), (5.0, 12), (6, 5), (8, 1.0)])


def test_band_rule_hand_computed():
    xy = extreme_points_band(POLY)
    # top: walk from (14, .3): forward (18, .6); backward (10, .5) then the padded last vertex (8, 1.0)
    # -> x in [8, 18], midpoint 13
    # left: (4.8, 15) with contiguous (5, 25), (5, 12) -> y in [12, 25], midpoint 18.5
    # bottom: (20, 40) alone (its neighbours are far above)
    # right: (30.2, 22) alone: (30, 10) is within the band but not contiguous, (29.5, 20) breaks the walk
    np.testing.assert_allclose(xy, [[13, 0.3], [4.8, 18.5], [20, 40], [30.2, 22]])
    # every vertex within the band, not the contiguous run: the right point moves to y = (10 + 22) / 2
    loose = extreme_points_band(POLY, contiguous=False)
    np.testing.assert_allclose(loose[3], [30.2, 16])
    # a 30 % band (12.2 px) walks on to (30, 10) and stops at (29.5, 20): x in [8, 30]
    np.testing.assert_allclose(extreme_points_band(POLY, band=0.3)[0], [(8 + 30) / 2, 0.3])


def _record(poly, h=48, w=40, mask=None):
    m = np.zeros((h, w), bool) if mask is None else mask
    return ImageRecord(3, h, w, segments=[Segment(1, 7, True, m, False, (poly,))])


def test_extreme_scheme_floors_and_clips_like_extremenet():
    pts = sample_points(_record(POLY), "extreme", seed=0)
    np.testing.assert_array_equal(pts.xy, [[13, 0], [4, 18], [20, 40], [30, 22]])
    assert pts.segment.tolist() == [1] * 4 and pts.category_id.tolist() == [7] * 4
    # a vertex on the far image edge (y = H) floors to row H, clipped into the image
    pts = extreme_points(_record(POLY, h=40))
    assert pts.xy[2].tolist() == [20, 39]


def test_mask_pixel_rule_is_kept_as_an_option():
    m = np.zeros((10, 12), bool)
    m[2, 2:9] = True
    m[3, 0:3] = True  # row 3 is within no 2 % band of row 2 (h = 8): the band is row 2 alone
    m[3:10, 3:6] = True
    rec = ImageRecord(1, 10, 12, segments=[Segment(1, 1, True, m)])
    band = extreme_points(rec, "band")
    pixel = extreme_points(rec, "mask_pixel")
    np.testing.assert_array_equal(band.xy, [[5, 2], [0, 3], [4, 9], [8, 2]])
    np.testing.assert_array_equal(pixel.xy, [[5, 2], [0, 3], [4, 9], [8, 2]])
    with pytest.raises(ValueError, match="rule"):
        extreme_points(rec, "median")


def test_band_differs_from_mask_pixel_on_a_sloped_top():
    # a top edge that slopes down by 0.5 px per 10 px: the band (2 % of h = 100 -> 2 px) takes the
    # whole run, the mask-pixel rule only the single highest row
    poly = np.array([(0, 1.0), (10, 0.5), (40, 0.0), (60, 1.5), (60, 100), (0, 100)])
    m = np.zeros((102, 62), bool)
    m[0, 35:45] = True
    m[1:101, 0:61] = True
    rec = ImageRecord(1, 102, 62, segments=[Segment(1, 1, True, m, False, (poly,))])
    assert extreme_points(rec, "band").xy[0].tolist() == [30, 0]  # (0 + 60) / 2
    assert extreme_points(rec, "mask_pixel").xy[0].tolist() == [39, 0]


def test_polygons_read_from_coco_and_kept_through_panoptic(tmp_path):
    ann = {"images": [{"id": 3, "file_name": "x.jpg", "height": 48, "width": 40}],
           "categories": [{"id": 7, "name": "thing"}],
           "annotations": [{"id": 1, "image_id": 3, "category_id": 7, "iscrowd": 0,
                            "segmentation": [POLY.ravel().tolist()], "area": 1.0, "bbox": [0, 0, 1, 1]},
                           {"id": 2, "image_id": 3, "category_id": 7, "iscrowd": 0,
                            "segmentation": {"size": [48, 40], "counts": [10, 5, 48 * 40 - 15]},
                            "area": 5.0, "bbox": [0, 10, 1, 5]}]}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(ann))
    _, records = read_coco_instances(str(path), str(tmp_path))
    rec = next(iter(records))
    np.testing.assert_allclose(rec.segments[0].polygons[0], POLY)
    assert rec.segments[1].polygons is None  # RLE: the band rule runs on its mask pixels
    pan, _ = instances_to_panoptic(rec)
    pts = sample_points(pan, "extreme", seed=0)
    np.testing.assert_array_equal(pts.xy[pts.segment == 1], [[13, 0], [4, 18], [20, 40], [30, 22]])
    np.testing.assert_array_equal(pts.xy[pts.segment == 2], [[0, 10], [0, 12], [0, 14], [0, 12]])
