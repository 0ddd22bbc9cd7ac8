"""In-memory batches (training.batches, issue 16): same images as the per-item path, every image once an
epoch, reproducible shuffles and flips."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mnemo.imaging import Preprocessing
from mnemo.training import datasets
from mnemo.training.batches import TensorBatches, random_flips


def stacked(dataset) -> torch.Tensor:
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def test_array_images_tensor_equals_stacked_items_at_native_size_and_resized():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 12, 12), dtype=np.uint8)
    labels = np.zeros(7)
    native = Preprocessing(channels=1, size=12, mean=(0.3,), std=(0.2,))
    for prep in (native, Preprocessing(channels=1, size=8)):
        dataset = datasets.ArrayDataset(images, labels, prep)
        assert torch.equal(dataset.images_tensor(), stacked(dataset))


def test_cached_folder_gives_a_tensor_and_an_uncached_one_streams(tmp_path):
    for i in range(5):
        Image.fromarray(np.full((10, 10), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    samples = datasets.folder_splits(tmp_path, Preprocessing(channels=1, size=8)).train.samples
    prep = Preprocessing(channels=1, size=8)
    cached = datasets.ImageFolderDataset(samples, prep, cache=True)
    assert torch.equal(datasets.images_tensor(cached), stacked(cached))
    assert datasets.images_tensor(datasets.ImageFolderDataset(samples, prep)) is None


def test_shuffled_epochs_cover_every_image_once_and_repeat_with_the_seed():
    images = torch.arange(10.0).view(10, 1, 1, 1)

    def epochs(seed: int) -> list[list[float]]:
        batches = TensorBatches(images, 4, shuffle=True, seed=seed)
        assert len(batches) == 3
        return [torch.cat(list(batches)).flatten().tolist() for _ in range(2)]

    first, second = epochs(0)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert epochs(0) == [first, second] and epochs(1) != [first, second]
    assert torch.cat(list(TensorBatches(images, 4))).flatten().tolist() == list(range(10))


def test_random_flips_mirror_some_images_and_keep_the_rest():
    image = torch.arange(4.0).view(1, 1, 2, 2)
    batch = image.repeat(64, 1, 1, 1)
    flipped = random_flips(batch, torch.Generator().manual_seed(0))
    variants = {tuple(x.flatten().tolist()) for x in flipped}
    assert variants == {
        tuple(v.flatten().tolist()) for v in (image, image.flip(-1), image.flip(-2), image.flip(-1).flip(-2))
    }
    assert torch.equal(batch, image.repeat(64, 1, 1, 1))  # the cached images themselves stay unflipped
