"""mnemo.heatmaps: the gray PNG, the jet overlay and the float grid that people and clients see."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from mnemo import heatmaps
from mnemo.imaging import Preprocessing, display_rgb

GRAY = (np.random.default_rng(0).random((6, 8)) * 255).astype(np.uint8)


def test_overlay_and_heatmap_png_decode_back():
    image = display_rgb(GRAY, Preprocessing(size=16))
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    heat = np.zeros((8, 8), np.float32)
    heat[:4] = 1.0  # hot top half, at another resolution than the image
    overlay = Image.open(io.BytesIO(heatmaps.heatmap_overlay_png(image, heat)))
    raw = Image.open(io.BytesIO(heatmaps.heatmap_png(heat)))
    assert overlay.size == (16, 16) and overlay.mode == "RGB"
    assert raw.size == (8, 8) and raw.mode == "L"
    over = np.asarray(overlay).astype(int)
    assert over[0, 0, 0] > over[0, 0, 2] and over[-1, 0, 2] > over[-1, 0, 0]  # red top, blue bottom
    assert np.asarray(raw)[0, 0] == 255 and np.asarray(raw)[-1, 0] == 0


def test_overlay_takes_a_gray_image_as_well():
    heat = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    gray, rgb = GRAY[:, :6], np.repeat(GRAY[:, :6, None], 3, axis=-1)
    assert heatmaps.heatmap_overlay_png(gray, heat) == heatmaps.heatmap_overlay_png(rgb, heat)


def test_jet_endpoints():
    lut = heatmaps.jet(np.array([0.0, 0.5, 1.0]))
    assert (
        lut[0].tolist() == [0, 0, 128]
        and lut[1].tolist() == [128, 255, 128]
        and lut[2].tolist() == [128, 0, 0]
    )


def test_heatmap_grid_area_averages_and_never_upsamples():
    heat = np.zeros((64, 64), np.float32)
    heat[:32, :32] = 4.0
    grid = heatmaps.heatmap_grid(heat, 8)
    assert grid.shape == (8, 8)
    assert np.allclose(grid[:4, :4], 4.0) and np.allclose(grid[4:, :], 0.0)
    assert np.isclose(grid.mean(), heat.mean())
    assert heatmaps.heatmap_grid(heat[:5, :5], 8).shape == (5, 5)
