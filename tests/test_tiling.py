"""Tiling (``mnemo.tiling``): the grid, cutting and stitching, the merged score, and coordinates."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mnemo.imaging import Preprocessing
from mnemo.regions import find_regions
from mnemo.roi import mask_from_rectangle
from mnemo.tiling import Tiling, TilingError, heat_box_to_image, heat_shape


@pytest.mark.parametrize("length", [32, 33, 50, 57, 100, 333])
@pytest.mark.parametrize("overlap", [0, 4, 31])
def test_tiles_cover_every_pixel_and_end_at_the_edge(length, overlap):
    tiling = Tiling(32, overlap)
    starts = tiling.starts(length)
    covered = np.zeros(length, bool)
    for start in starts:
        covered[start : start + 32] = True
    assert covered.all() and starts[0] == 0 and starts[-1] == length - 32
    assert all(b - a <= 32 - overlap for a, b in itertools.pairwise(starts))  # neighbours share ≥ overlap
    assert len(set(starts)) == len(starts)


def test_count_follows_the_working_resolution():
    tiling = Tiling(64, 16, 0.25)
    assert tiling.working_size(2048, 1024) == (512, 256)
    assert tiling.count(2048, 1024) == len(tiling.starts(512)) * len(tiling.starts(256)) == 11 * 5


@pytest.mark.parametrize("overlap", [0, 5, 12])
def test_cut_then_stitch_gives_the_image_back(overlap):
    image = np.random.default_rng(0).random((3, 45, 70)).astype(np.float32)
    tiling = Tiling(16, overlap)
    tiles = tiling.cut(image)
    assert tiles.shape == (len(tiling.origins(70, 45)), 3, 16, 16)
    np.testing.assert_allclose(tiling.stitch(tiles, 70, 45), image, rtol=1e-6, atol=1e-6)


def test_overlaps_blend_without_a_seam():
    tiling = Tiling(16, 8)  # two tiles along a 24 px row: 0-15 and 8-23
    tiles = np.stack([np.zeros((16, 16), np.float32), np.ones((16, 16), np.float32)])
    row = tiling.stitch(tiles, 24, 16)[8]
    assert (row[:8] == 0).all() and (row[16:] == 1).all()  # one tile only: its own value
    assert (np.diff(row[8:16]) > 0).all()  # the overlap ramps from one to the other
    assert 0 < row[8] < 0.5 < row[15] < 1


def test_the_image_score_is_the_worst_tile():
    tiling = Tiling(8)
    score, heat = tiling.merge(np.array([0.1, 3.0, 0.2, 0.3]), np.zeros((4, 8, 8)), 16, 16)
    assert score == 3.0 and heat.shape == (16, 16)


def test_an_image_smaller_than_a_tile_is_refused_with_the_size_it_needs():
    with pytest.raises(TilingError, match="at least 256×256"):
        Tiling(64, 0, 0.25).check(200, 1000)
    Tiling(64, 0, 0.25).check(256, 256)


@pytest.mark.parametrize(
    "raw, error",
    [({"tile": 0}, "positive"), ({"tile": 8, "overlap": 8}, "overlap"), ({"tile": 8, "scale": 1.5}, "scale"),
     ({"overlap": 2}, "needs 'tile'"), ({"tile": 8, "stride": 2}, "needs 'tile'")],
)  # fmt: skip
def test_bad_tilings_say_what_is_wrong(raw, error):
    with pytest.raises(ValueError, match=error):
        Tiling.from_dict(raw)


def test_round_trip_through_the_manifest_form():
    tiling = Tiling(64, 16, 0.5)
    assert Tiling.from_dict(tiling.to_dict()) == tiling


def test_heatmap_coordinates_undo_the_scale():
    prep, tiling = Preprocessing(size=64), Tiling(64, 0, 0.25)
    assert heat_shape(2048, 1000, prep, tiling) == (250, 512)
    assert heat_box_to_image((10, 20, 30, 40), 2048, 1000, prep, tiling) == (40, 80, 120, 160)
    assert heat_shape(2048, 1000, prep, None) == (64, 64)  # untiled: the model's grid


def test_regions_and_rectangles_are_in_the_uploads_pixels():
    prep, tiling = Preprocessing(size=64), Tiling(64, 0, 0.25)
    heat = np.zeros((128, 128), np.float32)
    heat[10:20, 30:34] = 5.0
    (region,) = find_regions(heat, 1.0, (512, 512), prep, tiling)
    assert (region.x, region.y, region.width, region.height, region.area) == (120, 40, 16, 40, 640)
    mask = mask_from_rectangle("120,40,16,40", (512, 512), prep, tiling)
    assert mask.shape == (128, 128) and mask.sum() == 40 and mask[10:20, 30:34].all()
