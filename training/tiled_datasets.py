"""Image folders for a tiled model (``mnemo.tiling``): whole frames at the working resolution, and tiles.

A tiled run trains on the tiles of its good images, cut on the very grid the service cuts (same working
resolution, tile and overlap), so the model learns from native-resolution tiles that look like the ones
it will score; it early-stops on the validation images' tiles. Calibration and evaluation score whole
frames: every tile, merged into the frame's score (the worst tile's) and heatmap (stitched at the working
resolution, where the masks are compared: the camera's own resolution at ``scale`` 1).

Frames are decoded once and kept as uint8 at the working resolution when they fit in
``datasets.CACHE_BYTES`` (a 2048² gray frame is 4 MB, so hundreds fit); above that every tile decodes its
frame again, which is correct but slow: lower ``data.tile_scale`` or use fewer images. Keeping uint8
rounds the resized pixels to whole levels (at most 0.5 of 255 away from what the service computes).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mnemo.imaging import DEFAULT_MAX_PIXELS, Preprocessing, normalise, resize_to
from mnemo.tiling import Tiling, working_pixels
from mnemo.training.datasets import CACHE_BYTES, DatasetError, Sample, SampleDataset


class FrameDataset(SampleDataset):
    """Whole images at the tiling's working resolution: ``image`` float32 [C, h, w] in the model's
    normalisation, ``label``, ``mask`` float32 [1, h, w], ``has_mask``, ``path`` (as image folders)."""

    def __init__(
        self,
        samples: Sequence[Sample],
        prep: Preprocessing,
        tiling: Tiling,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.samples, self.prep, self.tiling, self.max_pixels = list(samples), prep, tiling, max_pixels
        self.sizes = [tiling.working_size(*_header_size(s.path)) for s in self.samples]  # (w, h) each
        for sample, size in zip(self.samples, self.sizes):
            if min(size) < tiling.tile:
                raise DatasetError(f"{sample.path}: {tiling.tile} px tiles need a larger image ({size})")
        cached = sum(w * h for w, h in self.sizes) * prep.channels
        self._cache: dict[int, np.ndarray] | None = {} if cached <= CACHE_BYTES else None

    @property
    def cached(self) -> bool:
        """Whether decoded frames are kept (they fit in ``CACHE_BYTES``)."""
        return self._cache is not None

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        return {
            "image": torch.from_numpy(self.normalised(self.pixels(index))),
            "label": sample.label,
            "mask": torch.from_numpy(self._mask(index)),
            "has_mask": sample.label == 0 or sample.mask_path is not None,
            "path": str(sample.path),
        }

    def pixels(self, index: int) -> np.ndarray:
        """uint8 [h, w, C]: the frame at the working resolution in the model's channels."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        sized = working_pixels(self._decode(self.samples[index].path), self.sizes[index], self.prep.channels)
        frame = np.clip(np.rint(sized), 0, 255).astype(np.uint8)
        if self._cache is not None:
            self._cache[index] = frame
        return frame

    def normalised(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [h, w, C] → float32 [C, h, w] in the model's normalisation (``mnemo.imaging.normalise``)."""
        return normalise(pixels, self.prep.mean, self.prep.std)

    def _mask(self, index: int) -> np.ndarray:
        """[1, h, w] float32 0/1 at the working resolution (nearest)."""
        width, height = self.sizes[index]
        sample = self.samples[index]
        if sample.mask_path is None:
            return np.zeros((1, height, width), np.float32)
        return resize_to(self._defect_pixels(sample.mask_path), width, height, nearest=True)[..., 0][None]


class TiledFolderDataset(Dataset):
    """The tiles of ``samples``' frames, grid order, frame after frame: ``image`` [C, tile, tile], ``label``.
    ``frames`` is the ``FrameDataset`` they come from (calibration scores it whole). ``flips``: random
    horizontal and vertical flips of each tile while training, as ``ImageFolderDataset``'s."""

    def __init__(
        self, samples: Sequence[Sample], prep: Preprocessing, tiling: Tiling, *, flips: bool = False
    ) -> None:
        self.frames = FrameDataset(samples, prep, tiling)
        self.tiling, self.flips = tiling, flips
        self.index = [
            (i, x, y) for i, (w, h) in enumerate(self.frames.sizes) for x, y in tiling.origins(w, h)
        ]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict[str, Any]:
        image = torch.from_numpy(self._tile(k))
        if self.flips:
            for dim in (2, 1):
                if torch.rand(()) < 0.5:
                    image = image.flip(dim)
        return {"image": image, "label": self.frames.samples[self.index[k][0]].label}

    def images_tensor(self) -> torch.Tensor | None:
        """Every tile [N, C, tile, tile] float32 (no flips) when they fit in ``CACHE_BYTES``, else None."""
        prep, t = self.frames.prep, self.tiling.tile
        if len(self) * prep.channels * t * t * 4 > CACHE_BYTES or not self.frames.cached:
            return None
        return torch.from_numpy(np.stack([self._tile(k) for k in range(len(self))])) if len(self) else None

    def _tile(self, k: int) -> np.ndarray:
        i, x, y = self.index[k]
        t = self.tiling.tile
        return self.frames.normalised(self.frames.pixels(i)[y : y + t, x : x + t])


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header alone."""
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
