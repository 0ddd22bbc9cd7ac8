"""From uploaded bytes to per-image results for one model: decode, (batcher runs the model), judge, draw.

Decoding and PNG drawing are CPU work, so the app runs ``decode_uploads`` and ``judge`` in a worker
thread. The verdict is ``mnemo.calibration.is_anomalous``, the rule training calibrated for.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from mnemo.calibration import is_anomalous, p_value
from mnemo.heatmaps import heatmap_grid, heatmap_overlay_png, heatmap_png
from mnemo.imaging import ImageDecodeError, decode_image, display_rgb, prepare_pixels
from mnemo.service.batching import ImageResult
from mnemo.service.errors import ApiError
from mnemo.service.model_store import LoadedModel
from mnemo.service.schemas import Heatmap, HeatmapFormat, ImageScore


@dataclass(frozen=True)
class Upload:
    filename: str | None
    data: bytes


@dataclass(frozen=True)
class Decoded:
    inputs: list[np.ndarray]  # N × [C, H, W] in the model's normalisation; the batcher stacks them once
    displays: list[np.ndarray] | None  # uint8 RGB at model size, as the model saw it; only for overlays


def decode_uploads(uploads: list[Upload], model: LoadedModel, max_pixels: int, overlay: bool) -> Decoded:
    """Decode every upload or fail the request on the first bad one, naming it."""
    pre = model.preprocessing
    inputs = []
    displays = [] if overlay else None
    for i, upload in enumerate(uploads):
        name = upload.filename or f"image {i}"
        try:
            pixels = decode_image(upload.data, max_pixels=max_pixels)
        except ImageDecodeError as exc:
            raise ApiError(400, exc.reason, f"{name}: {exc}", file=upload.filename) from None
        inputs.append(prepare_pixels(pixels, pre))
        if displays is not None:
            displays.append(display_rgb(pixels, pre))
    return Decoded(inputs, displays)


def judge(
    model: LoadedModel,
    uploads: list[Upload],
    results: list[ImageResult],
    decoded: Decoded,
    threshold: float,
    heatmap: HeatmapFormat,
    grid_size: int,
) -> list[ImageScore]:
    scores = np.array([r.score for r in results], np.float64)
    p_values = np.atleast_1d(p_value(scores, model.quantiles, model.calibration.n))
    flagged = is_anomalous(scores, threshold)
    return [
        ImageScore(
            filename=upload.filename,
            score=float(score),
            p_value=float(p),
            verdict="anomalous" if flag else "ok",
            threshold=threshold,
            heatmap=render_heatmap(result.heatmap, heatmap, decoded.displays, i, grid_size),
        )
        for i, (upload, result, score, p, flag) in enumerate(zip(uploads, results, scores, p_values, flagged))
    ]


def render_heatmap(
    heat: np.ndarray, fmt: HeatmapFormat, displays: list[np.ndarray] | None, index: int, grid_size: int
) -> Heatmap | None:
    """Colours stretch each heatmap's own min…max: bundles carry no calibrated pixel-level scale yet."""
    height, width = heat.shape
    if fmt == "none":
        return None
    if fmt == "grid":
        grid = heatmap_grid(heat, grid_size)
        return Heatmap(format="grid", width=grid.shape[1], height=grid.shape[0], values=grid.tolist())
    png = heatmap_overlay_png(displays[index], heat) if fmt == "overlay" else heatmap_png(heat)
    return Heatmap(format=fmt, width=width, height=height, png_base64=base64.b64encode(png).decode("ascii"))
