"""A region of interest in training (``mnemo train --roi MASK.png``): scores are the heatmap's peak inside,
calibration and pixel metrics count only the pixels inside, and the bundle carries the mask."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mnemo.bundle import read_manifest
from mnemo.imaging import Preprocessing
from mnemo.roi import ROI_FILE
from mnemo.training.datasets import ImageFolderDataset, mvtec_samples, split_validation
from mnemo.training.detection_metrics import pixel_auroc, pro_score
from mnemo.training.evaluate import score_dataset
from mnemo.training.run import load_model, loader
from mnemo.training.synthetic import generate
from tests.test_training import mnemo


def test_a_run_with_an_roi_is_judged_and_calibrated_inside_it_and_ships_the_mask(tmp_path):
    data, run, bundle, mask_png = (
        tmp_path / "data",
        tmp_path / "run",
        tmp_path / "bundle",
        tmp_path / "roi.png",
    )
    generate(data, size=32, n_train=30, n_test_good=6, n_test_defect=2)
    mask = np.zeros((64, 64), np.uint8)  # a frame-sized mask at twice the images' size: only the left half
    mask[:, :32] = 255
    Image.fromarray(mask).save(mask_png)
    mnemo(
        "train", "--model", "ae", "--data", str(data), "--out", str(run), "--epochs", "1", "--no-progress",
        "--set", "model_config.image_size=32", "--set", "model_config.hidden_dims=[64,32,16]",
        "--roi", str(mask_png),
    )  # fmt: skip
    assert (run / ROI_FILE).read_bytes() == mask_png.read_bytes()

    model = load_model(run)
    prep = Preprocessing.from_model_config(model.config)
    good = mvtec_samples(data, "train")
    _, val = split_validation(len(good), 0.1, 2022)
    scored = score_dataset(
        model, loader(ImageFolderDataset([good[i] for i in val], prep), 8, 0), "cpu", False
    )
    peaks = scored.heatmaps[:, :, :16].reshape(len(val), -1).max(axis=1)  # the left half of the 32 px grid
    calibration = json.loads((run / "calibration.json").read_text())
    assert np.min(np.abs(peaks - calibration["threshold"])) < 1e-6  # an observed peak inside the ROI
    assert not np.allclose(peaks, scored.scores)  # not the model's own score

    test = score_dataset(
        model, loader(ImageFolderDataset(mvtec_samples(data, "test"), prep), 8, 0), "cpu", False
    )
    inside = np.zeros((32, 32), bool)
    inside[:, :16] = True
    report = json.loads((run / "report.json").read_text())["test"]
    # the run scored in other batches: heatmaps agree to float32 rounding, not bit for bit
    expected = {
        "auroc": pixel_auroc(test.heatmaps, test.masks, valid=inside),
        "pro": pro_score(test.heatmaps, test.masks, valid=inside),
    }
    assert {k: report["pixel"][k] for k in expected} == pytest.approx(expected, abs=1e-6)

    mnemo("export", str(run), "--out", str(bundle))
    manifest = read_manifest(bundle)  # checks the mask's sha256 too
    assert manifest.roi == {"file": ROI_FILE} and ROI_FILE in manifest.files


def test_pixel_metrics_inside_an_roi_ignore_whatever_lies_outside():
    rng = np.random.default_rng(0)
    heat = rng.random((4, 16, 16))
    masks = np.zeros((4, 16, 16), bool)
    masks[:, 2:6, 2:6] = True
    heat[masks] += 1.0  # the defects stand out inside
    inside = np.zeros((16, 16), bool)
    inside[:, :8] = True
    noisy = heat.copy()
    noisy[:, :, 8:] = 5.0  # outside the ROI: hotter than any defect
    assert pixel_auroc(noisy, masks, valid=inside) == pixel_auroc(heat, masks, valid=inside) == 1.0
    assert pro_score(noisy, masks, valid=inside) == pro_score(heat, masks, valid=inside)
    assert pixel_auroc(noisy, masks) < 0.5  # without the ROI the outside swamps them
