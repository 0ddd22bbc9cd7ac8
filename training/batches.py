"""Batches of a data set held in memory as one tensor: no per-item Python on the training hot path.

A ``DataLoader`` over a map-style dataset calls ``__getitem__`` once per image and collates a dict per
item: for MNIST-sized networks that per-item Python costs more than the model's step (issue 16). When a
split's preprocessed images fit in memory (``datasets.images_tensor``), the trainer iterates this instead:
one ``randperm`` an epoch, one index per batch, flips drawn for the whole batch at once.

Randomness comes from one ``torch.Generator`` seeded by the run's seed, so shuffling and flips are
reproducible and independent of the model's own random draws.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


class TensorBatches:
    """Iterable of image batches [b, C, H, W] sliced from ``images`` [N, C, H, W]; ``len`` = batches."""

    def __init__(
        self,
        images: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        flips: bool = False,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images = images
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.flips = flips
        self.generator = torch.Generator().manual_seed(seed)
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return math.ceil(self._per_rank() / self.batch_size)

    def _per_rank(self) -> int:
        """Images each rank takes an epoch: all of them alone, an equal share under torchrun."""
        return len(self.images) if self.world == 1 else len(self.images) // self.world

    def __iter__(self) -> Iterator[torch.Tensor]:
        n = len(self.images)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        if self.world > 1:  # every rank draws the same permutation and takes its every world-th image
            order = (torch.arange(n) if order is None else order)[self.rank :: self.world][: self._per_rank()]
        count = n if order is None else len(order)
        for start in range(0, count, self.batch_size):
            if order is None:
                batch = self.images[start : start + self.batch_size]
            else:
                batch = self.images[order[start : start + self.batch_size]]
            yield random_flips(batch, self.generator) if self.flips else batch


def random_flips(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image flipped horizontally and, independently, vertically with probability ½ (paper 003's
    augmentation, as ``ImageFolderDataset(flips=True)`` does per item)."""
    flip_w, flip_h = (torch.rand(2, len(batch), 1, 1, 1, generator=generator) < 0.5).unbind(0)
    batch = torch.where(flip_w, batch.flip(-1), batch)
    return torch.where(flip_h, batch.flip(-2), batch)
