"""Regions of interest (issue 14): only part of a fixture's picture matters, so only that part may count.

An ROI is a boolean mask on the model's ``size``×``size`` grid, made the way the image itself is made:

* a bundle's ROI is a PNG of the camera frame (white inside, black outside, any size with the frames'
  aspect), shrunk with the bundle's own resize policy (``mnemo.imaging.resize_pixels``, nearest);
* a request's ROI is a rectangle ``x,y,width,height`` in the uploaded image's pixels, mapped onto the grid
  by the inverse of ``mnemo.tiling.heat_box_to_image``.

A tiled bundle's heatmap is the frame at the tiling's working resolution, not the model's grid: its mask
is the PNG at that resolution, stretched (nearest) to each image's heatmap where frames differ in size.

With an ROI the heatmap outside it is set to the normal level (``fill``: it draws calm and makes no
region) and the image score becomes the heatmap's peak *inside* it, a statistic every model has; a
bundle's ROI comes with a calibration of exactly that statistic on good images (``mnemo recalibrate
--roi``), so its verdict keeps its false-alarm rate. numpy and Pillow only (the serving path).
"""

from __future__ import annotations

import numpy as np

from mnemo.imaging import Preprocessing, decode_image, resize_pixels, resize_to, to_channels
from mnemo.tiling import Tiling, heat_box_to_image, heat_shape

ROI_FILE = "roi.png"


class RoiError(ValueError):
    """An ROI that cannot be used: unreadable, empty, or outside the image."""


def mask_from_image(source, prep: Preprocessing, tiling: Tiling | None = None) -> np.ndarray:
    """A mask PNG (bytes or path) → bool [size, size] (with tiling: [H, W] at the working resolution of
    the mask's own size): pixels brighter than mid-grey are inside."""
    try:
        pixels = to_channels(decode_image(source), 1)
    except (OSError, ValueError) as exc:
        raise RoiError(f"ROI mask unreadable: {exc}") from None
    if tiling is None:
        mask = resize_pixels(pixels, prep.size, prep.resize, nearest=True)[..., 0] > 127.5
    else:
        mask = fit_mask(pixels[..., 0] > 127.5, heat_shape(pixels.shape[1], pixels.shape[0], prep, tiling))
    if not mask.any():
        raise RoiError("the ROI mask is empty: nothing inside it is white")
    return mask


def fit_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A bool mask stretched (nearest) to ``shape`` (rows, columns); itself when it has that shape."""
    if mask.shape == tuple(shape):
        return mask
    rows, cols = shape
    return resize_to(mask[..., None].astype(np.float32), cols, rows, nearest=True)[..., 0] > 0.5


def mask_from_rectangle(
    text: str, image_size: tuple[int, int], prep: Preprocessing, tiling: Tiling | None = None
) -> np.ndarray:
    """``"x,y,width,height"`` in the pixels of a ``image_size`` (width, height) image → bool mask on the
    image's heatmap grid."""
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise RoiError(f"roi must be four integers x,y,width,height, got {text!r}") from None
    width, height = image_size
    if w <= 0 or h <= 0 or x >= width or y >= height or x + w <= 0 or y + h <= 0:
        raise RoiError(f"roi {x},{y},{w},{h} has no pixel inside the {width}×{height} image")
    # clipped to the image: the same pixels, and numbers a float holds (a 400-digit width is an int)
    right, bottom = min(x + w, width), min(y + h, height)
    x, y = max(x, 0), max(y, 0)
    w, h = right - x, bottom - y
    # the model pixels whose footprint in the image overlaps the rectangle
    x0, y0, x1, y1 = heat_box_to_image((0.0, 0.0, 1.0, 1.0), width, height, prep, tiling)
    cell_w, cell_h, left, top = x1 - x0, y1 - y0, x0, y0
    n_rows, n_cols = heat_shape(width, height, prep, tiling)
    cols = np.arange(n_cols) * cell_w + left
    rows = np.arange(n_rows) * cell_h + top
    inside_cols = (cols + cell_w > x) & (cols < x + w)
    inside_rows = (rows + cell_h > y) & (rows < y + h)
    mask = inside_rows[:, None] & inside_cols[None, :]
    if not mask.any():
        raise RoiError(f"roi {x},{y},{w},{h} lies outside what the model sees of the image (centre crop)")
    return mask


def apply_roi(heat: np.ndarray, mask: np.ndarray, fill: float) -> tuple[np.ndarray, float]:
    """The heatmap with ``fill`` outside the mask, and its peak inside (the ROI image score)."""
    return np.where(mask, heat, np.float32(fill)).astype(np.float32), float(heat[mask].max())
