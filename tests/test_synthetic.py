"""mnemo.training.synthetic: determinism, layout, masks, visibility of the defects."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mnemo.training import synthetic


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    summary = synthetic.generate(
        root, texture="gravel", size=32, n_train=4, n_test_good=2, n_test_defect=3, seed=5
    )
    return root, summary


def test_layout_counts_and_summary(small_set):
    root, summary = small_set
    assert len(list((root / "train" / "good").glob("*.png"))) == 4
    assert len(list((root / "test" / "good").glob("*.png"))) == 2
    for kind in synthetic.DEFECT_TYPES:
        assert len(list((root / "test" / kind).glob("*.png"))) == 3
        assert len(list((root / "ground_truth" / kind).glob("*_mask.png"))) == 3
    assert summary["counts"]["test/hole"] == 3 and summary["channels"] == 1
    assert json.loads((root / "dataset.json").read_text()) == summary
    assert read(root / "train" / "good" / "000.png").shape == (32, 32)


def test_deterministic_given_seed(small_set, tmp_path):
    root, _ = small_set
    synthetic.generate(
        tmp_path / "a", texture="gravel", size=32, n_train=4, n_test_good=2, n_test_defect=3, seed=5
    )
    synthetic.generate(
        tmp_path / "b", texture="gravel", size=32, n_train=4, n_test_good=2, n_test_defect=3, seed=6
    )
    for rel in ("train/good/003.png", "test/perlin/002.png", "ground_truth/scratch/001_mask.png"):
        assert np.array_equal(read(root / rel), read(tmp_path / "a" / rel))
    assert not np.array_equal(read(root / "train/good/000.png"), read(tmp_path / "b" / "train/good/000.png"))


def test_masks_are_binary_and_non_trivial(small_set):
    root, _ = small_set
    for mask_path in (root / "ground_truth").rglob("*_mask.png"):
        mask = read(mask_path)
        assert set(np.unique(mask).tolist()) == {0, 255}
        assert 0.002 <= (mask > 0).mean() <= 0.5


@pytest.mark.parametrize("kind", synthetic.DEFECT_TYPES)
@pytest.mark.parametrize("rgb", [False, True])
def test_defects_are_visible_inside_their_mask(kind, rgb):
    textures = {t: synthetic.load_texture(t) for t in synthetic.TEXTURES}
    for i in range(3):
        rng = np.random.default_rng(i)
        good = synthetic.good_image(textures["brick"], "brick", 48, rng)
        good = np.repeat(good[..., None], 3 if rgb else 1, axis=-1)
        bad, mask = synthetic.make_defect(good, kind, rng, textures, "brick")
        diff = np.abs(bad - good).mean(axis=-1)
        assert bad.shape == good.shape and mask.any()
        assert diff[mask].mean() >= synthetic.MIN_CONTRAST
        assert diff[mask].mean() > 5 * diff[~mask].mean()


def test_rgb_is_tinted_and_bad_arguments_fail(tmp_path):
    synthetic.generate(
        tmp_path, texture="grass", size=32, n_train=1, n_test_good=0, n_test_defect=0, rgb=True
    )
    img = read(tmp_path / "train" / "good" / "000.png").astype(float)
    assert img.shape == (32, 32, 3) and img[..., 1].mean() > img[..., 2].mean()  # grass is green
    with pytest.raises(ValueError, match="unknown texture"):
        synthetic.generate(tmp_path, texture="marble")


def test_perlin_noise_is_smooth_and_seeded():
    a = synthetic.perlin_noise((64, 64), 4, np.random.default_rng(0))
    b = synthetic.perlin_noise((64, 64), 4, np.random.default_rng(0))
    assert np.array_equal(a, b) and np.abs(a).max() <= 1.0 + 1e-6 and a.std() > 0.1
    assert np.abs(np.diff(a, axis=1)).max() < 0.25  # gradient noise has no jumps between pixels
