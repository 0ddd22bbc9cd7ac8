"""Torch-free heatmap rendering for people: a gray PNG, a jet overlay on the image, a coarse float grid.

One home for drawing a model's heatmap, so the service (and anything else that shows heatmaps) colours and
scales them the same way; turning images into model pixels stays in ``mnemo.imaging``. numpy and Pillow
only, because the serving path must not import torch.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from mnemo.imaging import to_channels


def jet(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → uint8 RGB [..., 3] through the classic jet ramp (blue → cyan → yellow → red).

    Jet is piecewise linear, so it is three lines of numpy instead of a matplotlib dependency.
    """
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], np.float32)  # where r, g, b peak on the 4·v axis, scaled
    rgb = np.clip(1.5 - np.abs(4.0 * v - 4.0 * centres), 0.0, 1.0)
    return np.rint(rgb * 255.0).astype(np.uint8)


def scale_heatmap(heatmap: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Heatmap → [0, 1]. Defaults stretch this heatmap's own min…max (per-image contrast); pass a fixed
    ``vmin``/``vmax`` (e.g. 0 and a calibrated level) to make colours comparable between images."""
    heat = np.nan_to_num(np.asarray(heatmap, np.float64), nan=0.0)
    lo = float(heat.min()) if vmin is None else float(vmin)
    hi = float(heat.max()) if vmax is None else float(vmax)
    if hi <= lo:
        return np.zeros(heat.shape, np.float32)
    return np.clip((heat - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def heatmap_overlay_png(
    image_rgb: np.ndarray,
    heatmap: np.ndarray,
    *,
    alpha: float = 0.45,
    vmin: float | None = None,
    vmax: float | None = None,
) -> bytes:
    """PNG bytes of ``image_rgb`` (uint8 [H, W, 3] or [H, W]) blended with the jet-coloured heatmap.

    A heatmap of another size is resized bilinearly to the image's.
    """
    rgb = to_channels(np.atleast_3d(np.asarray(image_rgb, np.float32)), 3)
    colours = jet(_fit(scale_heatmap(heatmap, vmin, vmax), rgb.shape[:2])).astype(np.float32)
    blended = (1.0 - alpha) * rgb + alpha * colours
    return png_bytes(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


def heatmap_png(heatmap: np.ndarray, *, vmin: float | None = None, vmax: float | None = None) -> bytes:
    """PNG bytes of the heatmap alone, 8-bit grayscale (0 = ``vmin``, 255 = ``vmax``)."""
    return png_bytes(np.rint(scale_heatmap(heatmap, vmin, vmax) * 255.0).astype(np.uint8))


def heatmap_grid(heat: np.ndarray, size: int) -> np.ndarray:
    """Area-average the heatmap down to at most ``size``×``size`` cells (never upsampled): numbers a
    client can draw or threshold itself, far smaller than the full-resolution map."""
    height, width = heat.shape
    if height <= size and width <= size:
        return heat.astype(np.float64)
    shape = (min(size, width), min(size, height))
    return np.asarray(
        Image.fromarray(heat.astype(np.float32)).resize(shape, Image.Resampling.BOX), np.float64
    )


def _fit(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if values.shape == shape:
        return values
    resized = Image.fromarray(values.astype(np.float32)).resize(shape[::-1], Image.Resampling.BILINEAR)
    return np.asarray(resized)


def png_bytes(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W] or [H, W, 3] picture (heatmaps, reconstructions)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
