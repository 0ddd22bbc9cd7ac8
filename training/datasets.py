"""Datasets: image folders (MVTec AD layout or a plain folder of good images) and IDX arrays (MNIST family).

Every item is a dict, so loaders collate it and ``training.evaluate.unpack`` reads it:
``image`` float32 [C, H, W] in the model's normalisation (``mnemo.imaging.Preprocessing``), ``label``
(0 good, 1 anomalous), and for folders ``mask`` float32 [1, H, W] (0/1, all zeros for good images),
``has_mask`` and ``path``.

A defect image without a ground-truth mask is *allowed*: its mask is all zeros and ``has_mask`` is False,
and the dataset lists it in ``missing_masks``. Pixel metrics should skip such images (their zeros are
unknown, not "defect-free"); image-level metrics can use them.

IDX protocols (paper 000 §4.1, paper 001 §4.1, paper 003 table 2):

* ``roco`` — remove one class out: ``target_class`` is removed from training and is the positive
  (anomalous) class of the test set; all other classes are normal, and unlabelled for training.
* ``one_class`` — ``target_class`` is the only normal class; every other test class is anomalous
  (the one-class novelty protocol of OCGAN that paper 003 follows).

In both, the validation set is ``val_fraction`` (10 %) of the *normal* training images, drawn by
``np.random.default_rng(split_seed)`` (seed 2022). The papers do not say which RNG they split with, so the
exact index sets are reproducible here but not identical to the authors'; the proportion and the rule
"anomalies never in train or val" are the paper's.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mnemo.imaging import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    Preprocessing,
    decode_image,
    open_image,
    prepare_pixels,
    resize_pixels,
)
from mnemo.layout import GOOD_FOLDERS, good_folder, image_files
from mnemo.tiling import Tiling

GOOD = "good"
IDX_IMAGE_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABEL_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
PROTOCOLS = ("roco", "one_class")


class DatasetError(ValueError):
    """A dataset directory or file that cannot be used, with what was expected."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 good, 1 anomalous
    defect: str  # "good" or the defect type (folder name)
    mask_path: Path | None = None


# ------------------------------------------------------------------------------------------- folders


def list_images(directory: str | Path) -> list[Path]:
    """Image files directly in ``directory``, sorted by name; errors name what was looked for."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"directory not found: {directory}")
    files = image_files(directory)
    if not files:
        what = "is empty" if not any(directory.iterdir()) else "has no image files"
        raise DatasetError(f"{directory} {what}; looked for {', '.join(IMAGE_EXTENSIONS)}")
    return files


def is_mvtec_layout(root: str | Path) -> bool:
    return good_folder(Path(root) / "train") is not None or (Path(root) / "test").is_dir()


def mask_files(folder: Path) -> dict[str, Path]:
    """An image stem -> its ground-truth mask in ``folder``: ``<stem>_mask.<ext>`` (MVTec AD, MPDD) or
    ``<stem>.<ext>`` (BTAD, VisA in MVTec layout), any image extension, or a folder ``<stem>/`` of masks
    (MVTec LOCO: one per defect, united); a file wins over a folder, the ``_mask`` name over the others."""
    if not folder.is_dir():
        return {}
    folders = (d for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith("."))
    found = {d.name: d for d in folders if image_files(d)}
    for path in sorted(image_files(folder), key=lambda p: p.stem.endswith("_mask")):  # ``_mask`` last: wins
        found[path.stem.removesuffix("_mask")] = path
    return found


def mvtec_samples(root: str | Path, split: str) -> list[Sample]:
    """``train``: train/good. ``test``: test/good (label 0) and every test/<defect> (label 1) with its mask
    from ``ground_truth/<defect>/`` when present (``mask_files``). BTAD's ``ok`` stands for ``good``
    (``GOOD_FOLDERS``)."""
    root = Path(root)
    if split == "train":
        folder = good_folder(root / "train")
        if folder is None:
            names = " or ".join(f"train/{name}" for name in GOOD_FOLDERS)
            raise DatasetError(f"directory not found: {root / 'train' / GOOD} (normal images go in {names})")
        return [Sample(p, 0, GOOD) for p in list_images(folder)]
    if split != "test":
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    test = root / "test"
    if not test.is_dir():
        raise DatasetError(f"directory not found: {test}")
    samples: list[Sample] = []
    for folder in sorted(p for p in test.iterdir() if p.is_dir() and not p.name.startswith(".")):
        normal = folder.name in GOOD_FOLDERS
        masks = {} if normal else mask_files(root / "ground_truth" / folder.name)
        for path in list_images(folder):
            if normal:
                samples.append(Sample(path, 0, GOOD))
            else:
                samples.append(Sample(path, 1, folder.name, masks.get(path.stem)))
    if not samples:
        raise DatasetError(f"{test} has no class folders (expected test/good and test/<defect>)")
    return samples


CACHE_BYTES = 1 << 30  # good images are kept decoded in memory when they fit in this (float32 at model size)
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def image_channels(root: str | Path, sample: int = 16) -> int:
    """The channel count a folder's good images call for: 1 when every sampled one is grayscale, else 3.

    Decided from the file's mode (PIL), not its content: a gray-looking RGB photo stays RGB.
    """
    root = Path(root)
    paths = [
        s.path for s in (mvtec_samples(root, "train") if is_mvtec_layout(root) else folder_samples(root))
    ]
    step = max(1, len(paths) // sample)
    for path in paths[::step][:sample]:
        try:
            with open_image(path) as opened:
                if opened.image.mode not in GRAY_MODES:
                    return 3
        except ImageDecodeError as exc:  # its message starts with the path
            raise DatasetError(f"cannot read {exc}") from None
        except OSError as exc:
            raise DatasetError(f"cannot read {path}: {exc}") from None
    return 1


def folder_samples(root: str | Path) -> list[Sample]:
    """A plain folder of good images (no layout): all label 0."""
    root = Path(root)
    sets = (
        sorted(d.name for d in root.iterdir() if d.is_dir() and is_mvtec_layout(d)) if root.is_dir() else []
    )
    if sets and not image_files(root):  # a collection's root (MVTec AD's, BTAD's): one set at a time
        shown = ", ".join(sets[:5]) + (", ..." if len(sets) > 5 else "")
        raise DatasetError(f"{root} holds {len(sets)} MVTec-layout sets ({shown}), not images: train on one "
                           f"of them, e.g. {root / sets[0]}")  # fmt: skip
    return [Sample(p, 0, GOOD) for p in list_images(root)]


class SampleDataset(Dataset):
    """A dataset over ``Sample`` files (set ``samples`` and ``max_pixels``): their labels, the defect
    images without masks, and decoding that names the file it fails on."""

    samples: list[Sample]
    max_pixels: int = DEFAULT_MAX_PIXELS

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], np.int64)

    @property
    def missing_masks(self) -> list[Path]:
        return [s.path for s in self.samples if s.label == 1 and s.mask_path is None]

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, path: Path, *, labels: bool = False) -> np.ndarray:
        """A file's pixels (``decode_image``); with ``labels``, as ``defect_pixels`` of a mask instead."""
        try:
            opened = open_image(path, max_pixels=self.max_pixels)
        except ImageDecodeError as exc:  # its message starts with the path
            raise DatasetError(f"cannot read {exc}") from None
        except OSError as exc:
            raise DatasetError(f"cannot read {path}: {exc}") from None
        palette = opened.image.mode in ("P", "PA")
        try:
            pixels = decode_image(opened)
        except ImageDecodeError as exc:
            raise DatasetError(f"cannot read {path}: {exc}") from None
        return defect_pixels(pixels, palette=palette) if labels else pixels

    def _defect_pixels(self, mask_path: Path) -> np.ndarray:
        """float32 [H, W, 1], 1 on the defect: a mask file's (``defect_pixels``), or the union of a folder
        of masks (MVTec LOCO keeps one per defect in ``ground_truth/<defect>/<stem>/``)."""
        paths = image_files(mask_path) if mask_path.is_dir() else [mask_path]
        masks = [self._decode(path, labels=True) for path in paths]
        if not masks or len({m.shape for m in masks}) > 1:
            sizes = sorted({f"{m.shape[1]}×{m.shape[0]}" for m in masks})
            raise DatasetError(f"the masks in {mask_path} must be one image size, got {sizes or 'none'}")
        return np.maximum.reduce(masks)


class ImageFolderDataset(SampleDataset):
    """Decodes and preprocesses ``samples`` on access (nothing is cached, so memory stays flat).

    ``flips``: random horizontal and vertical flips (paper 003's augmentation) drawn from torch's RNG, so
    ``torch.manual_seed`` and DataLoader worker seeding make them reproducible; image and mask flip together.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        prep: Preprocessing,
        *,
        flips: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        cache: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.prep = prep
        self.flips = flips
        self.max_pixels = max_pixels
        # Decoded, resized, normalised images by index: a small training set then decodes once, not once
        # an epoch (a 300 px PNG costs about as much to decode as a training step spends on it).
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image = self._image(index)
        mask = torch.from_numpy(self._mask(sample))
        if self.flips:
            for dim in (2, 1):
                if torch.rand(()) < 0.5:
                    image, mask = image.flip(dim), mask.flip(dim)
        return {
            "image": image,
            "label": sample.label,
            "mask": mask,
            "has_mask": sample.label == 0 or sample.mask_path is not None,
            "path": str(sample.path),
        }

    def images_tensor(self) -> torch.Tensor | None:
        """Every image decoded and preprocessed, [N, C, H, W] float32 (no flips), when the split is small
        enough to cache (``cache=True``); None otherwise (then it streams through a DataLoader)."""
        if self._cache is None:
            return None
        return torch.stack([self._image(i) for i in range(len(self))]) if len(self) else None

    def _image(self, index: int) -> torch.Tensor:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        image = torch.from_numpy(prepare_pixels(self._decode(self.samples[index].path), self.prep))
        if self._cache is not None:
            self._cache[index] = image
        return image

    def _mask(self, sample: Sample) -> np.ndarray:
        """[1, size, size] float32 0/1, cut like the image (same policy) with nearest sampling."""
        size = self.prep.size
        if sample.mask_path is None:
            return np.zeros((1, size, size), np.float32)
        sized = resize_pixels(self._defect_pixels(sample.mask_path), size, self.prep.resize, nearest=True)
        return sized[..., 0][None]


def defect_pixels(mask: np.ndarray, *, palette: bool = False) -> np.ndarray:
    """A decoded ground-truth mask [H, W, C] on the 0…255 scale → float32 [H, W, 1], 1 on the defect.

    White on black (MVTec's 0/255, with a JPEG's noise, stray dark values or the soft edges of a resized
    mask): pixels brighter than mid-grey. A mask with nothing that bright holds labels, not brightness
    (0/1 as several sets save them, or defect ids 1, 2, …, near-black to the eye): its non-zero pixels.
    A ``palette`` image (PNG/GIF/TIFF mode P: lossless, one colour per label, VOC-style) is a label map
    whatever its colours: every pixel that is not black. A grey label map mixing dark and bright labels
    (ids 1 and 200) reads as white on black and loses its dark labels: save such masks as 0/255."""
    gray = mask.max(axis=-1, keepdims=True)
    cut = 127.5 if gray.max() > 127.5 and not palette else 0.0
    return (gray > cut).astype(np.float32)


# ----------------------------------------------------------------------------------------------- IDX


def _idx_file(directory: Path, split: str, kind: str) -> Path:
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    ubyte = "idx3-ubyte" if kind == "images" else "idx1-ubyte"
    names = [f"{prefix}-{kind}{sep}{ubyte}{gz}" for sep in ("-", ".") for gz in (".gz", "")]
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise DatasetError(f"no IDX {split} {kind} in {directory}; looked for {', '.join(names)}")


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: too short for an IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DatasetError(f"{path}: IDX magic number {found:#010x}, expected {magic:#010x}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise DatasetError(
            f"{path}: header declares {dims} = {int(np.prod(dims))} bytes, file holds {len(body)}"
        )
    return np.frombuffer(body, np.uint8).reshape(dims)


def load_idx(directory: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W], labels int64 [N]) of ``train`` or ``test`` (t10k) from ``directory``.

    Accepts the standard names, gzipped or not, with ``-`` or ``.`` before ``idx``
    (``train-images-idx3-ubyte.gz``, ``t10k-labels.idx1-ubyte``…). MNIST, Fashion-MNIST and KMNIST share it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"directory not found: {directory}")
    images = _read_idx(_idx_file(directory, split, "images"), IDX_IMAGE_MAGIC, 3)
    labels = _read_idx(_idx_file(directory, split, "labels"), IDX_LABEL_MAGIC, 1).astype(np.int64)
    if len(images) != len(labels):
        raise DatasetError(f"{directory}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


class ArrayDataset(Dataset):
    """uint8 images [N, H, W] or [N, H, W, C] with labels; items ``{"image", "label"}``.

    With the default ``Preprocessing`` matching the arrays' size (e.g. channels 1, size 28, mean 0, std 1)
    images are plain [0, 1] floats; otherwise they are resized and normalised like any decoded image.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, prep: Preprocessing) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.prep = images, prep
        self.labels = np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = prepare_pixels(self.images[index].astype(np.float32), self.prep)
        return {"image": torch.from_numpy(image), "label": int(self.labels[index])}

    def images_tensor(self) -> torch.Tensor:
        """Every image as the model sees it, [N, C, H, W] float32, equal to stacking ``__getitem__``.

        Arrays already at the model's size and channel count take ``normalise``'s two float32 steps on the
        whole array at once; any other array goes through ``prepare_pixels`` once per image.
        """
        arrays = self.images if self.images.ndim == 4 else self.images[..., None]
        n, height, width, channels = arrays.shape
        prep = self.prep
        if (height, width) != (prep.size, prep.size) or channels != prep.channels:
            return torch.stack([self[i]["image"] for i in range(n)]) if n else torch.empty(0)
        std = torch.tensor(np.broadcast_to(np.asarray(prep.std, np.float32), (channels,)))
        mean = torch.tensor(np.broadcast_to(np.asarray(prep.mean, np.float32), (channels,)))
        x = torch.from_numpy(arrays.astype(np.float32)).permute(0, 3, 1, 2)  # a copy: IDX reads are read-only
        x *= (1.0 / (255.0 * std)).view(1, -1, 1, 1)
        x -= (mean / std).view(1, -1, 1, 1)
        return x.contiguous()


def images_tensor(dataset: Dataset) -> torch.Tensor | None:
    """A split's images as one in-memory tensor (``training.batches``), or None where it must stream."""
    to_tensor = getattr(dataset, "images_tensor", None)
    return None if to_tensor is None else to_tensor()


# ------------------------------------------------------------------------------------------- splits


def split_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices), sorted: a ``default_rng(seed)`` permutation's first round(fraction·n)
    go to validation — at least 1 when ``fraction`` > 0 and n ≥ 2, and never all n (training needs data)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    n_val = round(fraction * n)
    if fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@dataclass
class Splits:
    """What a run trains, early-stops/calibrates and tests on, plus a JSON-able summary for the manifest."""

    train: Dataset
    val: Dataset
    test: Dataset | None
    summary: dict[str, Any] = field(default_factory=dict)


def idx_protocol(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    protocol: str,
    target_class: int,
    val_fraction: float = 0.1,
    split_seed: int = 2022,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train indices, val indices, binary test labels) for ``roco`` or ``one_class`` (module docstring)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    if target_class not in set(train_labels.tolist()):
        raise DatasetError(f"class {target_class} does not occur in the training labels")
    is_target = train_labels == target_class
    normal = np.flatnonzero(~is_target if protocol == "roco" else is_target)
    train_pos, val_pos = split_validation(len(normal), val_fraction, split_seed)
    anomalous = test_labels == target_class if protocol == "roco" else test_labels != target_class
    return normal[train_pos], normal[val_pos], anomalous.astype(np.int64)


def idx_splits(
    directory: str | Path,
    protocol: str,
    target_class: int,
    prep: Preprocessing | None = None,
    *,
    val_fraction: float = 0.1,
    split_seed: int = 2022,
) -> Splits:
    """Train (normal only, labels all 0: unlabelled), val (normal only) and test (binary labels).

    Without ``prep`` images keep their own size and come out as [1, H, W] floats in [0, 1].
    """
    x_train, y_train = load_idx(directory, "train")
    x_test, y_test = load_idx(directory, "test")
    prep = prep or Preprocessing(channels=1, size=int(x_train.shape[1]))
    tr, va, test_labels = idx_protocol(y_train, y_test, protocol, target_class, val_fraction, split_seed)
    summary = {
        "kind": "idx",
        "path": str(directory),
        "protocol": protocol,
        "target_class": target_class,
        "counts": {
            "train": len(tr),
            "val": len(va),
            "test": len(x_test),
            "test_anomalous": int(test_labels.sum()),
        },
    }
    zeros = np.zeros(len(y_train), np.int64)
    return Splits(
        train=ArrayDataset(x_train[tr], zeros[tr], prep),
        val=ArrayDataset(x_train[va], zeros[va], prep),
        test=ArrayDataset(x_test, test_labels, prep),
        summary=summary,
    )


def folder_splits(
    root: str | Path,
    prep: Preprocessing,
    *,
    val_fraction: float = 0.1,
    split_seed: int = 2022,
    flips: bool = False,
    tiling: Tiling | None = None,
) -> Splits:
    """MVTec AD layout (train/good → train + val; test/ → test) or a plain folder of good images (no test).

    ``flips`` applies to the training split only. The synthetic-defect set (``training.synthetic``) is
    written in the MVTec layout, so it is read here too. With ``tiling``, train and val are the tiles of
    their images and test their whole frames (``training.tiled_datasets``).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset directory not found: {root}")
    mvtec = is_mvtec_layout(root)
    good = mvtec_samples(root, "train") if mvtec else folder_samples(root)
    tr, va = split_validation(len(good), val_fraction, split_seed)
    if tiling is not None:
        return _tiled_splits(root, good, tr, va, prep, tiling, flips, mvtec)
    test = (
        ImageFolderDataset(mvtec_samples(root, "test"), prep) if mvtec and (root / "test").is_dir() else None
    )
    cache = len(good) * prep.channels * prep.size**2 * 4 <= CACHE_BYTES
    return Splits(
        train=ImageFolderDataset([good[i] for i in tr], prep, flips=flips, cache=cache),
        val=ImageFolderDataset([good[i] for i in va], prep, cache=cache),
        test=test,
        summary=_folder_summary(root, mvtec, len(tr), len(va), test),
    )


def _folder_summary(root: Path, mvtec: bool, n_train: int, n_val: int, test: Any) -> dict[str, Any]:
    counts = {"train": n_train, "val": n_val}
    if test is not None:
        counts |= {"test": len(test), "test_anomalous": int(test.labels.sum())}
    summary: dict[str, Any] = {"kind": "folder", "path": str(root), "layout": "mvtec" if mvtec else "plain"}
    summary["counts"] = counts
    if test is not None and test.missing_masks:  # a count: a real set can lack hundreds of masks
        summary["missing_masks"] = len(test.missing_masks)
    return summary


def _tiled_splits(
    root: Path,
    good: list[Sample],
    tr: np.ndarray,
    va: np.ndarray,
    prep: Preprocessing,
    tiling: Tiling,
    flips: bool,
    mvtec: bool,
) -> Splits:
    from mnemo.training.tiled_datasets import FrameDataset, TiledFolderDataset  # it builds on this module

    train = TiledFolderDataset([good[i] for i in tr], prep, tiling, flips=flips)
    val = TiledFolderDataset([good[i] for i in va], prep, tiling)
    has_test = mvtec and (root / "test").is_dir()
    test = FrameDataset(mvtec_samples(root, "test"), prep, tiling) if has_test else None
    summary = _folder_summary(root, mvtec, len(tr), len(va), test)
    summary["tiling"] = {**tiling.to_dict(), "train_tiles": len(train), "val_tiles": len(val)}
    return Splits(train=train, val=val, test=test, summary=summary)
