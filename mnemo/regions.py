"""Defect regions of a heatmap: the connected areas above the calibrated pixel level (issue 14).

A PLC or an operator screen draws boxes; it should not have to decode a heatmap for that. Each region is
an 8-connected component of the pixels whose score exceeds ``PixelCalibration.threshold`` (the strict
rule of every Mnemo threshold), labelled by ``scipy.ndimage`` on the model-sized map, then mapped back to
the input image: bounding box and area in the input's pixels (``mnemo.tiling.heat_box_to_image``),
peak and mean score over the region. Largest peak first. numpy/scipy only: the serving path has no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mnemo.imaging import Preprocessing
from mnemo.tiling import Tiling, heat_box_to_image

EIGHT_CONNECTED = np.ones((3, 3), bool)


@dataclass(frozen=True)
class Region:
    x: int  # bounding box in input-image pixels: left, top, width, height
    y: int
    width: int
    height: int
    area: int  # input-image pixels covered (model pixels × the input pixels each stands for)
    peak: float  # highest heatmap score in the region
    mean: float


def find_regions(
    heat: np.ndarray,
    threshold: float,
    image_size: tuple[int, int],
    prep: Preprocessing,
    tiling: Tiling | None = None,
    max_regions: int = 32,
) -> list[Region]:
    """Regions of ``heat`` [H, W] above ``threshold``, in the coordinates of the ``image_size`` (width,
    height) input (``heat`` on the model's grid, or a tiled bundle's working resolution); at most
    ``max_regions``, strongest peak first."""
    above = np.asarray(heat) > threshold
    labels, count = ndimage.label(above, structure=EIGHT_CONNECTED)
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    peaks = ndimage.maximum(heat, labels, index)
    means = ndimage.mean(heat, labels, index)
    sizes = ndimage.sum_labels(above, labels, index)
    width, height = image_size
    x0, y0, x1, y1 = heat_box_to_image((0.0, 0.0, 1.0, 1.0), width, height, prep, tiling)
    pixel_area = (x1 - x0) * (y1 - y0)  # input pixels behind one model pixel
    regions = []
    for k, box in enumerate(ndimage.find_objects(labels)):
        rows, cols = box
        left, top, right, bottom = heat_box_to_image(
            (cols.start, rows.start, cols.stop, rows.stop), width, height, prep, tiling
        )
        left, top = max(0, int(np.floor(left))), max(0, int(np.floor(top)))
        right, bottom = min(width, int(np.ceil(right))), min(height, int(np.ceil(bottom)))
        regions.append(
            Region(
                x=left, y=top, width=right - left, height=bottom - top,
                area=round(float(sizes[k]) * pixel_area), peak=float(peaks[k]), mean=float(means[k]),
            )
        )  # fmt: skip
    regions.sort(key=lambda r: -r.peak)
    return regions[:max_regions]
