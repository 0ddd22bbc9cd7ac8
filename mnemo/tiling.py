"""Tiling for high-resolution images (issue 14): score a 5–20 megapixel frame tile by tile.

Resizing a 4000 px frame to a 128 px model shrinks a defect of a few hundred pixels to less than one;
a tiled bundle looks at the frame at a *working resolution* instead (``scale`` × the frame's own: 1 keeps
every pixel, 0.25 a quarter of each side) and cuts it into ``tile``-sized squares, ``tile`` being the
model's input size, neighbours sharing ``overlap`` pixels. The last tile of a row or column is moved
back to end at the edge, so every pixel is covered and no tile is padded.

* **Heatmap**: the tiles' heatmaps are stitched into one map at the working resolution, blending the
  overlaps by weights that ramp linearly from the tile's edge over ``overlap`` pixels (1 inside), so no
  seam shows where neighbours disagree (weights are normalised, so a pixel one tile covers keeps its
  value).
* **Score**: the worst tile's. A defect sits in one tile or two; averaging over the tiles of a 300-tile
  frame would drown it. The threshold of a tiled bundle is calibrated on exactly this statistic (the max
  over the tiles of held-out good frames), so its false-alarm rate holds per frame.

Training cuts the same grid from its images at the same working resolution, so the model learns from
tiles that look like the ones it will score. numpy only: the serving path has no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from mnemo.imaging import (
    OpenImage,
    Preprocessing,
    decode_for_model,
    model_box_to_image,
    normalise,
    resize_to,
    to_channels,
)


class TilingError(ValueError):
    """An image the tiling cannot cover: smaller than one tile at the working resolution."""


@dataclass(frozen=True)
class Tiling:
    tile: int  # side of a tile in working pixels: the model's input size
    overlap: int = 0  # pixels neighbouring tiles share (blended in the heatmap)
    scale: float = 1.0  # working resolution / the image's own (0 < scale ≤ 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", float(self.scale))
        if self.tile < 1:
            raise ValueError(f"tiling.tile must be positive, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"tiling.overlap must be in [0, tile) = [0, {self.tile}), got {self.overlap}")
        if not 0.0 < self.scale <= 1.0:
            raise ValueError(f"tiling.scale must be in (0, 1], got {self.scale}")

    def to_dict(self) -> dict[str, Any]:
        return {"tile": self.tile, "overlap": self.overlap, "scale": self.scale}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Tiling:
        known = {"tile", "overlap", "scale"}
        unknown = sorted(set(raw) - known)
        if unknown or "tile" not in raw:
            raise ValueError(f"tiling needs 'tile' (and may set 'overlap', 'scale'), got keys {sorted(raw)}")
        return cls(int(raw["tile"]), int(raw.get("overlap", 0)), float(raw.get("scale", 1.0)))

    # ---------------------------------------------------------------------------------------- geometry

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of a ``width``×``height`` image at the working resolution."""
        return max(1, round(width * self.scale)), max(1, round(height * self.scale))

    def check(self, width: int, height: int) -> None:
        """Refuse an image too small to hold one tile at the working resolution."""
        w, h = self.working_size(width, height)
        if min(w, h) < self.tile:
            at = "" if self.scale == 1.0 else f" ({w}×{h} at the working scale {self.scale:g})"
            smallest = math.ceil(self.tile / self.scale)
            raise TilingError(
                f"the image is {width}×{height}{at}, smaller than one {self.tile} px tile; this model "
                f"needs images of at least {smallest}×{smallest}"
            )

    def starts(self, length: int) -> list[int]:
        """Where the tiles along one side of ``length`` working pixels begin (the last one at the edge)."""
        step = self.tile - self.overlap
        count = max(1, math.ceil((length - self.tile) / step) + 1)
        return [min(i * step, length - self.tile) for i in range(count)]

    def origins(self, width: int, height: int) -> list[tuple[int, int]]:
        """(x, y) of every tile of a working-resolution ``width``×``height`` image, row by row."""
        return [(x, y) for y in self.starts(height) for x in self.starts(width)]

    def count(self, width: int, height: int) -> int:
        """How many tiles a ``width``×``height`` image (its own pixels) becomes."""
        w, h = self.working_size(width, height)
        return len(self.starts(w)) * len(self.starts(h))

    # ---------------------------------------------------------------------------------- cut and stitch

    def cut(self, image: np.ndarray) -> np.ndarray:
        """A working-resolution image [..., H, W] → its tiles [N, ..., tile, tile] (copies)."""
        height, width = image.shape[-2:]
        t = self.tile
        return np.stack([image[..., y : y + t, x : x + t] for x, y in self.origins(width, height)])

    @cached_property
    def weights(self) -> np.ndarray:
        """[tile, tile] blending weights: a linear ramp over ``overlap`` pixels from each edge, never 0."""
        i = np.arange(self.tile, dtype=np.float32)
        ramp = np.minimum(np.minimum(i + 1, self.tile - i) / (self.overlap + 1), 1.0)
        return np.outer(ramp, ramp).astype(np.float32)

    def stitch(self, tiles: np.ndarray, width: int, height: int) -> np.ndarray:
        """Tiles [N, ..., tile, tile] (as ``cut`` ordered them) → one [..., height, width] map, overlaps
        blended by ``weights``. ``width``×``height`` is the working resolution."""
        origins = self.origins(width, height)
        if len(tiles) != len(origins):
            raise ValueError(f"{len(tiles)} tiles for a {width}×{height} grid of {len(origins)}")
        t, w = self.tile, self.weights
        total = np.zeros((*tiles.shape[1:-2], height, width), np.float32)
        weight = np.zeros((height, width), np.float32)
        for (x, y), tile in zip(origins, tiles):
            total[..., y : y + t, x : x + t] += tile * w
            weight[y : y + t, x : x + t] += w
        return total / weight

    def merge(
        self, scores: np.ndarray, heatmaps: np.ndarray, width: int, height: int
    ) -> tuple[float, np.ndarray]:
        """One image's tile scores [N] and heatmaps [N, tile, tile] → (its score: the worst tile's, its
        stitched heatmap [height, width])."""
        return float(np.max(scores)), self.stitch(np.asarray(heatmaps, np.float32), width, height)


def heat_shape(width: int, height: int, prep: Preprocessing, tiling: Tiling | None) -> tuple[int, int]:
    """(rows, columns) of the heatmap a ``width``×``height`` image gets: the model's grid, or with tiling
    the working resolution."""
    if tiling is None:
        return prep.size, prep.size
    w, h = tiling.working_size(width, height)
    return h, w


def heat_box_to_image(
    box: tuple[float, float, float, float],
    width: int,
    height: int,
    prep: Preprocessing,
    tiling: Tiling | None,
) -> tuple[float, float, float, float]:
    """A box (x0, y0, x1, y1) on an image's heatmap → the same box in the ``width``×``height`` image's
    own pixels: undoing the model's resize (``mnemo.imaging.model_box_to_image``) or the tiling's scale."""
    if tiling is None:
        return model_box_to_image(box, width, height, prep)
    w, h = tiling.working_size(width, height)
    sx, sy = width / w, height / h
    x0, y0, x1, y1 = box
    return x0 * sx, y0 * sy, x1 * sx, y1 * sy


def decode_working(opened: OpenImage, prep: Preprocessing, tiling: Tiling) -> np.ndarray:
    """An opened image decoded at the tiling's working resolution, in the model's channels: float32
    [h, w, C] on 0…255 (closes ``opened``), as the service and ``mnemo recalibrate`` both cut it."""
    target = tiling.working_size(*opened.image.size)
    return working_pixels(decode_for_model(opened, prep, target), target, prep.channels)


def working_pixels(pixels: np.ndarray, size: tuple[int, int], channels: int) -> np.ndarray:
    """Decoded pixels [H, W, C] on 0…255 (``mnemo.imaging.decode_for_model`` with ``target=size``) → the
    model's channels at exactly the working ``size`` (width, height)."""
    pixels = to_channels(pixels, channels)
    width, height = size
    return pixels if pixels.shape[:2] == (height, width) else resize_to(pixels, width, height)


def prepare_tiles(working: np.ndarray, prep: Preprocessing, tiling: Tiling) -> np.ndarray:
    """Working-resolution pixels [h, w, C] → the model inputs [N, C, tile, tile], normalised."""
    return tiling.cut(normalise(working, prep.mean, prep.std))
