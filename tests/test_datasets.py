"""mnemo.training.datasets: MVTec-layout and plain folders, IDX files and the ROCO / one-class protocols."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mnemo.imaging import Preprocessing
from mnemo.training import datasets
from mnemo.training.datasets import DatasetError

PREP = Preprocessing(channels=1, size=8)


def save(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


@pytest.fixture
def mvtec(tmp_path):
    """train/good ×10, test/good ×2, test/crack ×2 (one without a mask), 16×16 grayscale."""
    for i in range(10):
        save(tmp_path / "train" / "good" / f"{i:03d}.png", np.full((16, 16), 10 * i))
    for i in range(2):
        save(tmp_path / "test" / "good" / f"{i:03d}.png", np.full((16, 16), 100))
        save(tmp_path / "test" / "crack" / f"{i:03d}.png", np.full((16, 16), 200))
    mask = np.zeros((16, 16))
    mask[:8, :4] = 255  # top-left 8×4 → 4×2 at size 8
    save(tmp_path / "ground_truth" / "crack" / "000_mask.png", mask)
    return tmp_path


def test_mvtec_folder_items_labels_masks_paths(mvtec):
    splits = datasets.folder_splits(mvtec, PREP)
    assert len(splits.train) == 9 and len(splits.val) == 1 and len(splits.test) == 4
    items = [splits.test[i] for i in range(4)]
    assert [it["label"] for it in items] == [1, 1, 0, 0]  # test/crack sorts before test/good
    assert items[0]["path"].endswith("test/crack/000.png")
    assert items[0]["image"].shape == (1, 8, 8) and items[0]["image"].dtype == torch.float32
    assert items[0]["image"].max().item() == pytest.approx(200 / 255)
    mask = items[0]["mask"]
    assert mask.shape == (1, 8, 8) and mask.sum().item() == 8 and mask[0, :4, :2].min().item() == 1
    assert items[1]["has_mask"] is False and items[1]["mask"].sum().item() == 0  # flagged, no crash
    assert items[2]["has_mask"] is True and items[2]["mask"].sum().item() == 0
    assert splits.test.missing_masks == [mvtec / "test" / "crack" / "001.png"]
    assert splits.summary["counts"] == {"train": 9, "val": 1, "test": 4, "test_anomalous": 2}
    assert splits.summary["missing_masks"] == 1  # a count, not a list of paths


def test_masks_are_found_under_the_names_real_sets_use(tmp_path):
    """MVTec AD names a mask ``<stem>_mask.png``; BTAD and VisA in MVTec layout use the image's own stem
    (``ko/0001.png`` for ``0001.bmp``, ``bad/000.png`` for ``000.JPG``)."""
    for name in ("000.png", "001.bmp", "002.JPG", "003.png"):
        save(tmp_path / "test" / "ko" / name, np.full((16, 16), 200))
    save(tmp_path / "test" / "good" / "000.png", np.full((16, 16), 100))
    corner = np.zeros((16, 16))
    corner[:4, :4] = 255
    save(tmp_path / "ground_truth" / "ko" / "000_mask.png", corner)
    save(tmp_path / "ground_truth" / "ko" / "000.png", np.zeros((16, 16)))  # the _mask name wins
    save(tmp_path / "ground_truth" / "ko" / "001.png", corner)
    save(tmp_path / "ground_truth" / "ko" / "002_mask.bmp", corner)
    samples = datasets.mvtec_samples(tmp_path, "test")
    masks = {s.path.name: s.mask_path and s.mask_path.name for s in samples}
    assert masks == {
        "000.png": "000_mask.png",
        "001.bmp": "001.png",
        "002.JPG": "002_mask.bmp",
        "003.png": None,
    }
    assert [s.label for s in samples] == [0, 1, 1, 1, 1]  # test/good sorts before test/ko


def test_ground_truth_masks_saved_as_labels_or_as_white_on_black_mark_the_same_pixels(tmp_path):
    """MVTec saves 0/255; other sets save 0/1 or defect ids (near-black to the eye), JPEG masks whose
    noise strays from 0 and 255, masks with stray dark values or shrunk with interpolation (soft edges):
    each marks the same 8×8 square (one 2×2 cell at size 8 from 32 px)."""
    square = np.zeros((32, 32))
    square[:8, 8:16] = 1
    strays = square * 255
    strays[10:14, 8:16] = 2  # a painting tool's near-black stray values under the square
    soft = np.asarray(Image.fromarray(np.kron(square * 255, np.ones((4, 4))).astype(np.uint8)).resize(
        (32, 32), Image.Resampling.BILINEAR), np.float64)  # fmt: skip
    soft[10:14, 6:18] = 30  # and a faint rim where the sampling at size 8 looks
    encodings = {
        "white": (square * 255, "png"),
        "ones": (square, "png"),
        "ids": (square * 3, "png"),
        "jpeg": (square * 255, "jpg"),
        "strays": (strays, "png"),
        "soft": (soft, "png"),
    }
    for name, (mask, ext) in encodings.items():
        save(tmp_path / "test" / "crack" / f"{name}.png", np.full((32, 32), 200))
        save(tmp_path / "ground_truth" / "crack" / f"{name}_mask.{ext}", mask)
    save(tmp_path / "test" / "good" / "000.png", np.full((32, 32), 100))
    save(tmp_path / "ground_truth" / "crack" / "blank_mask.png", np.zeros((32, 32)))
    save(tmp_path / "test" / "crack" / "blank.png", np.full((32, 32), 200))
    dataset = datasets.ImageFolderDataset(datasets.mvtec_samples(tmp_path, "test"), PREP)
    masks = {Path(item["path"]).stem: item["mask"][0] for item in dataset}
    expected = torch.zeros(8, 8)
    expected[:2, 2:4] = 1
    for name in encodings:
        assert torch.equal(masks[name], expected), name
    assert masks["blank"].sum() == 0 and masks["000"].sum() == 0


def test_a_palette_mask_marks_every_label_that_is_not_black(tmp_path):
    """VOC-style palette masks hold one colour per defect id, dark ones (64, 0, 0) beside bright ones
    (128, 0, 0): every pixel whose colour is not black is a defect, where the same colours saved as RGB
    read as brightness (the dark label is lost, as the docs say)."""
    labels = np.zeros((8, 8), np.uint8)
    labels[0, :2], labels[7, 6:] = 1, 8  # VOC's ids 1 (128, 0, 0) and 8 (64, 0, 0)
    voc = [0, 0, 0] * 256
    voc[3:6], voc[24:27] = [128, 0, 0], [64, 0, 0]
    palette = Image.fromarray(labels, "P")
    palette.putpalette(voc)
    for name in ("palette", "rgb"):
        save(tmp_path / "test" / "crack" / f"{name}.png", np.full((8, 8), 200))
    (tmp_path / "ground_truth" / "crack").mkdir(parents=True)
    palette.save(tmp_path / "ground_truth" / "crack" / "palette_mask.png")
    palette.convert("RGB").save(tmp_path / "ground_truth" / "crack" / "rgb_mask.png")
    save(tmp_path / "test" / "good" / "000.png", np.full((8, 8), 100))
    dataset = datasets.ImageFolderDataset(datasets.mvtec_samples(tmp_path, "test"), PREP)
    masks = {Path(item["path"]).stem: item["mask"][0] for item in dataset}
    assert torch.equal(masks["palette"], torch.from_numpy(labels > 0).float())
    assert torch.equal(masks["rgb"], torch.from_numpy(labels == 1).float())


def test_a_folder_of_masks_per_image_marks_their_union(tmp_path):
    """MVTec LOCO: ``ground_truth/<defect>/<stem>/000.png, 001.png, ...``, one mask per defect."""
    save(tmp_path / "test" / "good" / "000.png", np.full((8, 8), 100))
    save(tmp_path / "test" / "logical" / "000.png", np.full((8, 8), 200))
    save(tmp_path / "test" / "logical" / "001.png", np.full((8, 8), 200))
    first, second = np.zeros((8, 8)), np.zeros((8, 8))
    first[0, :2], second[7, 6:] = 255, 255
    save(tmp_path / "ground_truth" / "logical" / "000" / "000.png", first)
    save(tmp_path / "ground_truth" / "logical" / "000" / "001.png", second)
    (tmp_path / "ground_truth" / "logical" / "001").mkdir()  # no mask in it: 001 has none
    samples = datasets.mvtec_samples(tmp_path, "test")
    assert [s.mask_path and s.mask_path.name for s in samples] == [None, "000", None]
    (item,) = [
        it for it in datasets.ImageFolderDataset(samples, PREP) if it["path"].endswith("logical/000.png")
    ]
    assert item["has_mask"] and torch.equal(
        item["mask"][0], torch.from_numpy(((first + second) > 0) * 1.0).float()
    )
    save(tmp_path / "ground_truth" / "logical" / "000" / "002.png", np.zeros((4, 4)))
    with pytest.raises(
        DatasetError, match=r"masks in .*logical/000 must be one image size, got \['4×4', '8×8'\]"
    ):
        list(datasets.ImageFolderDataset(samples, PREP))


def test_hidden_files_and_folders_a_copied_set_carries_are_not_read(mvtec):
    """An archive made on a Mac holds ``._NAME.png`` (a resource fork with the image's extension and none
    of its bytes) and ``.DS_Store``; Jupyter leaves ``.ipynb_checkpoints`` in any folder it opened."""
    fork = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X"
    for folder in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (mvtec / folder / "._000.png").write_bytes(fork)
        (mvtec / folder / ".DS_Store").write_bytes(fork)
    save(mvtec / "test" / ".ipynb_checkpoints" / "000-checkpoint.png", np.full((16, 16), 1))
    splits = datasets.folder_splits(mvtec, PREP)
    assert splits.summary["counts"] == {"train": 9, "val": 1, "test": 4, "test_anomalous": 2}
    assert {str(splits.test[i]["path"]).split("/")[-2] for i in range(4)} == {"good", "crack"}
    assert datasets.mask_files(mvtec / "ground_truth" / "crack") == {
        "000": mvtec / "ground_truth" / "crack" / "000_mask.png"
    }
    assert all(splits.train[i]["image"].shape == (1, 8, 8) for i in range(9))  # every one decodes


def test_btad_names_its_normal_folders_ok(tmp_path):
    """BTAD: train/ok, test/ok, test/ko, ground_truth/ko/<stem>.png."""
    for i in range(5):
        save(tmp_path / "train" / "ok" / f"{i:04d}.bmp", np.full((16, 16), 50 + i))
    save(tmp_path / "test" / "ok" / "0000.bmp", np.full((16, 16), 50))
    save(tmp_path / "test" / "ko" / "0001.bmp", np.full((16, 16), 200))
    save(tmp_path / "ground_truth" / "ko" / "0001.png", np.full((16, 16), 255))
    assert datasets.is_mvtec_layout(tmp_path)
    splits = datasets.folder_splits(tmp_path, PREP)
    assert splits.summary["counts"] == {"train": 4, "val": 1, "test": 2, "test_anomalous": 1}
    assert [s.defect for s in splits.test.samples] == ["ko", "good"] and splits.test.missing_masks == []
    (tmp_path / "train" / "ok").rename(tmp_path / "train" / "normal")
    with pytest.raises(DatasetError, match=r"train/good \(normal images go in train/good or train/ok\)"):
        datasets.folder_splits(tmp_path, PREP)


def test_folder_loader_batches_and_val_is_reproducible(mvtec):
    a = datasets.folder_splits(mvtec, PREP, val_fraction=0.2)
    b = datasets.folder_splits(mvtec, PREP, val_fraction=0.2)
    assert [s.path for s in a.val.samples] == [s.path for s in b.val.samples] and len(a.val) == 2
    assert not {s.path for s in a.val.samples} & {s.path for s in a.train.samples}
    batch = next(iter(DataLoader(a.test, batch_size=4)))
    assert batch["image"].shape == (4, 1, 8, 8) and batch["mask"].shape == (4, 1, 8, 8)
    assert batch["label"].tolist() == [1, 1, 0, 0] and len(batch["path"]) == 4


def test_preprocessing_controls_size_channels_and_crop(mvtec):
    prep = Preprocessing(channels=3, size=4, mean=(0.5,), std=(0.5,), resize="center_crop")
    item = datasets.folder_splits(mvtec, prep).test[0]
    assert item["image"].shape == (3, 4, 4) and item["mask"].shape == (1, 4, 4)
    assert item["image"].max().item() == pytest.approx(200 / 255 * 2 - 1, abs=1e-5)


def test_flips_move_image_and_mask_together(mvtec):
    sample = datasets.mvtec_samples(mvtec, "test")[0]
    plain = datasets.ImageFolderDataset([sample], PREP)[0]
    flipping = datasets.ImageFolderDataset([sample], PREP, flips=True)
    torch.manual_seed(0)
    seen = {tuple(flipping[0]["mask"][0].nonzero()[0].tolist()) for _ in range(20)}
    assert len(seen) > 1  # the defect corner moves
    assert plain["mask"][0, 0, 0] == 1


def test_plain_folder_of_good_images(tmp_path):
    for i in range(5):
        save(tmp_path / f"img{i}.jpg", np.full((12, 20), 50))
    (tmp_path / "notes.txt").write_text("ignored")
    splits = datasets.folder_splits(tmp_path, PREP)
    assert splits.test is None and splits.summary["layout"] == "plain"
    assert len(splits.train) == 4 and len(splits.val) == 1 and splits.train[0]["label"] == 0


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        datasets.folder_splits(tmp_path / "nowhere", PREP)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"is empty; looked for \.png"):
        datasets.folder_splits(tmp_path / "empty", PREP)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"texts has no image files; looked for .png, .jpg"):
        datasets.folder_splits(tmp_path / "texts", PREP)
    for name in ("cable", "bottle"):  # a collection's root given instead of one of its sets
        save(tmp_path / "collection" / name / "train" / "good" / "000.png", np.zeros((8, 8)))
    sets = r"holds 2 MVTec-layout sets \(bottle, cable\), not images: train on one of them, e.g. .*/bottle"
    with pytest.raises(DatasetError, match=sets):
        datasets.folder_splits(tmp_path / "collection", PREP)
    (tmp_path / "bad" / "train" / "good").mkdir(parents=True)
    (tmp_path / "bad" / "train" / "good" / "broken.png").write_bytes(b"not a png")
    splits = datasets.folder_splits(tmp_path / "bad", PREP, val_fraction=0.0)
    with pytest.raises(DatasetError) as raised:
        splits.train[0]
    message = str(raised.value)
    assert message.startswith("cannot read ") and message.count("broken.png") == 1  # the path said once
    whole = tmp_path / "bad" / "train" / "good" / "cut.png"
    save(whole, np.random.default_rng(0).integers(0, 255, (64, 64)))
    whole.write_bytes(whole.read_bytes()[:-200])  # the header reads; the pixels run out
    with pytest.raises(DatasetError, match=r"^cannot read .*cut\.png: truncated or corrupt PNG data"):
        datasets.folder_splits(tmp_path / "bad", PREP, val_fraction=0.0).train[1]


def write_idx(directory, split, images, labels, gz: bool) -> None:
    prefix = "train" if split == "train" else "t10k"
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    n, h, w = images.shape
    with opener(directory / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as fh:
        fh.write((2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, h, w)))
        fh.write(images.astype(np.uint8).tobytes())
    with opener(directory / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as fh:
        fh.write((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.astype(np.uint8).tobytes())


@pytest.fixture(params=[True, False], ids=["gz", "plain"])
def idx_dir(tmp_path, request):
    rng = np.random.default_rng(0)
    train_labels = np.repeat(np.arange(4), 50)  # 4 classes × 50
    test_labels = np.repeat(np.arange(4), 5)
    # pixel value encodes the class, so the tests can see which class an image came from
    write_idx(
        tmp_path,
        "train",
        train_labels[:, None, None] * 60 + rng.integers(0, 5, (200, 6, 6)),
        train_labels,
        request.param,
    )
    write_idx(tmp_path, "test", np.repeat(test_labels * 60, 36).reshape(20, 6, 6), test_labels, request.param)
    return tmp_path


def test_load_idx_reads_both_encodings(idx_dir):
    images, labels = datasets.load_idx(idx_dir, "train")
    assert images.shape == (200, 6, 6) and images.dtype == np.uint8 and labels.tolist()[:3] == [0, 0, 0]
    images, labels = datasets.load_idx(idx_dir, "test")
    assert images.shape == (20, 6, 6) and np.bincount(labels).tolist() == [5, 5, 5, 5]


def test_idx_errors(tmp_path, idx_dir):
    with pytest.raises(DatasetError, match=r"looked for train-images-idx3-ubyte\.gz"):
        datasets.load_idx(tmp_path / "..", "train")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train-images-idx3-ubyte").write_bytes((2049).to_bytes(4, "big") + bytes(12))
    (bad / "train-labels-idx1-ubyte").write_bytes((2049).to_bytes(4, "big") + bytes(4))
    with pytest.raises(DatasetError, match="magic number 0x00000801, expected 0x00000803"):
        datasets.load_idx(bad, "train")


def class_of(dataset, i: int) -> int:
    return round(dataset[i]["image"].max().item() * 255 / 60)


def test_roco_protocol(idx_dir):
    splits = datasets.idx_splits(idx_dir, "roco", target_class=2)
    train_classes = {class_of(splits.train, i) for i in range(len(splits.train))}
    val_classes = {class_of(splits.val, i) for i in range(len(splits.val))}
    assert 2 not in train_classes | val_classes and train_classes == {0, 1, 3}
    assert len(splits.val) == 15 and len(splits.train) == 135  # 10 % of the 150 normal images
    assert all(splits.train[i]["label"] == 0 for i in range(len(splits.train)))  # unlabelled normals
    test_labels = [splits.test[i]["label"] for i in range(20)]
    assert test_labels == [int(class_of(splits.test, i) == 2) for i in range(20)] and sum(test_labels) == 5
    assert splits.train[0]["image"].shape == (1, 6, 6)
    assert splits.train[0]["image"].min() >= 0.0 and splits.train[0]["image"].max() <= 1.0
    tr, va, _ = datasets.idx_protocol(np.repeat(np.arange(4), 50), np.arange(4), "roco", 2)
    tr2, va2, _ = datasets.idx_protocol(np.repeat(np.arange(4), 50), np.arange(4), "roco", 2)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    _, va3, _ = datasets.idx_protocol(np.repeat(np.arange(4), 50), np.arange(4), "roco", 2, split_seed=7)
    assert not np.array_equal(va, va3)


def test_one_class_protocol(idx_dir):
    splits = datasets.idx_splits(idx_dir, "one_class", target_class=1)
    assert {class_of(splits.train, i) for i in range(len(splits.train))} == {1}
    assert len(splits.train) == 45 and len(splits.val) == 5
    test_labels = [splits.test[i]["label"] for i in range(20)]
    assert test_labels == [int(class_of(splits.test, i) != 1) for i in range(20)] and sum(test_labels) == 15
    with pytest.raises(DatasetError, match="class 9"):
        datasets.idx_splits(idx_dir, "one_class", target_class=9)
    with pytest.raises(ValueError, match="protocol"):
        datasets.idx_splits(idx_dir, "leave_two_out", target_class=1)


def test_synthetic_set_reads_back(tmp_path):
    from mnemo.training import synthetic

    synthetic.generate(tmp_path, size=16, n_train=10, n_test_good=2, n_test_defect=1, seed=1)
    splits = datasets.folder_splits(tmp_path, Preprocessing(channels=1, size=16))
    assert len(splits.test) == 2 + len(synthetic.DEFECT_TYPES) and not splits.test.missing_masks
    defects = [splits.test[i] for i in range(len(splits.test)) if splits.test[i]["label"] == 1]
    assert all(item["mask"].sum() > 0 for item in defects)
