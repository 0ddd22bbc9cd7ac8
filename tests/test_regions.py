"""Defect regions (mnemo.regions): connected areas above the pixel level, boxed in the input's pixels."""

from __future__ import annotations

import numpy as np

from mnemo.imaging import Preprocessing, model_box_to_image
from mnemo.regions import find_regions

PREP = Preprocessing(channels=1, size=8)


def two_blobs() -> np.ndarray:
    heat = np.zeros((8, 8))
    heat[1:3, 1:4] = 2.0  # 2×3 model pixels
    heat[2, 2] = 5.0
    heat[6, 6] = 3.0  # one pixel, diagonal neighbour of the next: 8-connected, one region
    heat[7, 7] = 3.0
    return heat


def test_regions_are_8_connected_strongest_first_and_strictly_above_the_level():
    regions = find_regions(two_blobs(), 1.0, (8, 8), PREP)
    assert [(r.x, r.y, r.width, r.height, r.area) for r in regions] == [(1, 1, 3, 2, 6), (6, 6, 2, 2, 2)]
    assert (regions[0].peak, regions[0].mean) == (5.0, (5 * 2 + 5.0) / 6)
    assert [r.area for r in find_regions(two_blobs(), 2.0, (8, 8), PREP)] == [1, 2]  # 2.0 is not above 2.0
    assert find_regions(np.zeros((8, 8)), 0.0, (8, 8), PREP) == []


def test_boxes_undo_the_stretch_of_the_resize_policy():
    # a 32×16 input stretched to 8×8: x by 4, y by 2
    first = find_regions(two_blobs(), 1.0, (32, 16), PREP)[0]
    assert (first.x, first.y, first.width, first.height, first.area) == (4, 2, 12, 4, 48)


def test_boxes_undo_the_centred_cut():
    prep = Preprocessing(channels=1, size=8, resize="center_crop")
    # 32×16: the shorter side 16 → 8 (scale ½), so 16×8, of which columns 4…11 are kept
    assert model_box_to_image((0, 0, 8, 8), 32, 16, prep) == (8.0, 0.0, 24.0, 16.0)
    first = find_regions(two_blobs(), 1.0, (32, 16), prep)[0]
    assert (first.x, first.y, first.width, first.height, first.area) == (10, 2, 6, 4, 24)
