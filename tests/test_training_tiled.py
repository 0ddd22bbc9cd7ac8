"""Tiled training (``--tiled``): tiles cut as the service cuts them, frames calibrated and evaluated whole,
and the tiling carried into the bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mnemo.bundle import read_manifest
from mnemo.imaging import Preprocessing, decode_image
from mnemo.tiling import Tiling, prepare_tiles, working_pixels
from mnemo.training.datasets import DatasetError, mvtec_samples
from mnemo.training.synthetic import generate
from mnemo.training.tiled_datasets import FrameDataset, TiledFolderDataset
from tests.test_training import mnemo


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """128 px frames whose defects sit in 32 px windows (the high-resolution generator, scaled down)."""
    root = tmp_path_factory.mktemp("frames")
    generate(root, size=128, defect_size=32, n_train=30, n_test_good=6, n_test_defect=2)
    return root


def test_the_high_resolution_generator_keeps_defects_small(frames):
    summary = json.loads((frames / "dataset.json").read_text())
    assert summary["defect_size"] == 32
    for mask in (frames / "ground_truth").rglob("*_mask.png"):
        ys, xs = np.nonzero(decode_image(mask)[..., 0])
        assert ys.max() - ys.min() < 32 and xs.max() - xs.min() < 32


def test_training_tiles_are_the_tiles_the_service_scores(frames):
    prep, tiling = Preprocessing(channels=1, size=32, mean=(0.5,), std=(0.5,)), Tiling(32, 8, 0.5)
    samples = mvtec_samples(frames, "train")[:2]
    tiles = TiledFolderDataset(samples, prep, tiling)
    assert len(tiles) == 2 * 9  # 64 px working frames: 3 × 3 tiles
    target = tiling.working_size(128, 128)
    served = prepare_tiles(working_pixels(decode_image(samples[1].path), target, 1), prep, tiling)
    for k in range(9):  # uint8 frames in training: within half a grey level of the service's floats
        np.testing.assert_allclose(tiles[9 + k]["image"].numpy(), served[k], atol=0.5 / 255 / 0.5 + 1e-6)


def test_a_frame_smaller_than_a_tile_is_a_clear_dataset_error(frames):
    prep = Preprocessing(channels=1, size=32)
    with pytest.raises(DatasetError, match="32 px tiles need a larger image"):
        FrameDataset(mvtec_samples(frames, "train")[:1], prep, Tiling(32, 0, 0.2))


def test_a_tiled_run_calibrates_on_frames_and_ships_its_tiling(frames, tmp_path):
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    mnemo(
        "train", "--model", "ae", "--data", str(frames), "--out", str(run), "--epochs", "2", "--no-progress",
        "--set", "model_config.image_size=32", "--set", "model_config.hidden_dims=[64,32,16]",
        "--tile-scale", "0.5", "--tile-overlap", "8",
    )  # fmt: skip
    report = json.loads((run / "report.json").read_text())
    assert report["data"]["tiling"] == {
        "tile": 32,
        "overlap": 8,
        "scale": 0.5,
        "train_tiles": 27 * 9,
        "val_tiles": 27,
    }
    assert report["test"]["n_images"] == 16 and "pixel" in report["test"]  # frames, compared with masks
    calibration = json.loads((run / "calibration.json").read_text())
    assert calibration["n"] == 3  # the 3 validation frames, not their 27 tiles
    assert (run / "plots" / "examples.png").stat().st_size > 1000
    mnemo("export", str(run), "--out", str(bundle))
    assert read_manifest(bundle).tiling == {"tile": 32, "overlap": 8, "scale": 0.5}
    evaluated = mnemo("evaluate", str(run), "--no-progress").stdout
    assert "pixel AUROC" in evaluated
