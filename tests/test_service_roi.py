"""Regions of interest (mnemo.roi): a request's rectangle and a bundle's mask PNG, on a real server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from mnemo.bundle import read_manifest
from mnemo.calibration import Calibration
from mnemo.imaging import Preprocessing
from mnemo.roi import RoiError, mask_from_image, mask_from_rectangle
from tests.image_bytes import png_bytes
from tests.service_helpers import make_settings, running_server, smooth_images
from tests.test_service_api import offline_scores, post_files

pytest_plugins = ["tests.service_fixtures"]


def test_rectangles_cover_the_model_pixels_they_overlap():
    stretch = Preprocessing(channels=1, size=4)
    mask = mask_from_rectangle("0,0,8,4", (16, 8), stretch)  # 16×8 → 4×4: a model pixel is 4×2
    assert mask.tolist() == [[True, True, False, False]] * 2 + [[False] * 4] * 2
    crop = Preprocessing(channels=1, size=4, resize="center_crop")  # 16×8 → 8×4, image columns 4…11 kept
    assert mask_from_rectangle("0,0,5,8", (16, 8), crop).tolist() == [[True, False, False, False]] * 4
    with pytest.raises(RoiError, match="outside what the model sees"):
        mask_from_rectangle("0,0,4,8", (16, 8), crop)  # the cut-off left border only
    for bad in ("0,0,0,4", "16,0,2,2", "-5,0,5,2", "1,2,3"):
        with pytest.raises(RoiError):
            mask_from_rectangle(bad, (16, 8), stretch)
    huge = "9" * 400  # more than a float holds: clipped to the image, as any rectangle that overhangs it
    assert np.array_equal(mask_from_rectangle(f"0,0,{huge},{huge}", (16, 8), stretch), np.ones((4, 4), bool))


def test_a_mask_png_follows_the_bundles_resize(tmp_path):
    picture = np.zeros((20, 40), np.uint8)
    picture[:, 20:] = 255  # right half
    Image.fromarray(picture).save(tmp_path / "roi.png")
    mask = mask_from_image(tmp_path / "roi.png", Preprocessing(channels=1, size=4))
    assert mask.tolist() == [[False, False, True, True]] * 4
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(RoiError, match="empty"):
        mask_from_image(tmp_path / "empty.png", Preprocessing(channels=1, size=4))


def half_noisy(side: str) -> np.ndarray:
    """56×56 gray: smooth, with noise far from any normal part on the ``side`` half."""
    image = smooth_images(1, 1, 56, seed=8)[0].copy()
    noise = np.random.default_rng(1).integers(0, 256, (56, 28, 1), dtype=np.uint8)
    if side == "left":
        image[:, :28] = noise
    else:
        image[:, 28:] = noise
    return image


def test_a_request_rectangle_scores_only_its_part(server, bundle_dir):
    pixel = Calibration.from_dict(read_manifest(bundle_dir / "gray").calibration).pixel
    image = png_bytes(half_noisy("left"))
    _, heatmaps = offline_scores(bundle_dir / "gray", [image])
    heat = heatmaps[0, 0]  # 28×28 for the 56×56 upload
    right = post_files(server, "gray", [image], roi="40,0,16,56", regions="true").json()["results"][0]
    assert right["score"] == pytest.approx(float(heat[:, 20:].max()), abs=1e-4)  # the peak inside only
    assert right["threshold"] == pixel.threshold  # judged by the pixel level: a rectangle has no calibration
    assert right["verdict"] == ("anomalous" if right["score"] > pixel.threshold else "ok")
    assert all(r["x"] >= 38 for r in right["regions"])  # nothing from the noisy half
    left = post_files(server, "gray", [image], roi="0,0,28,56", regions="true").json()["results"][0]
    assert (
        left["score"] == pytest.approx(float(heat[:, :14].max()), abs=1e-4) and left["verdict"] == "anomalous"
    )
    assert left["regions"] and all(r["x"] + r["width"] <= 28 for r in left["regions"])
    for bad, status in (("0,0,0,5", 400), ("99,99,5,5", 400), ("a,b,c,d", 422)):
        assert post_files(server, "gray", [image], roi=bad).status_code == status, bad


def test_a_bundle_roi_from_recalibrate_makes_outside_defects_invisible(bundle_dir, tmp_path):
    models = tmp_path / "models"
    bundle = models / "gray"
    shutil.copytree(bundle_dir / "gray", bundle)
    good = tmp_path / "good"
    good.mkdir()
    for i, image in enumerate(smooth_images(30, 1, 28, seed=12)):
        Image.fromarray(image[..., 0]).save(good / f"{i}.png")
    picture = np.zeros((56, 56), np.uint8)
    picture[:, 28:] = 255  # the fixture's right half is the part
    Image.fromarray(picture).save(tmp_path / "roi.png")
    done = subprocess.run(
        [sys.executable, "-m", "mnemo", "recalibrate", str(bundle), "--data", str(good), "--roi",
         str(tmp_path / "roi.png"), "--version", "roi1", "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["roi"] is True and read_manifest(bundle).roi == {"file": "roi.png"}
    with running_server(make_settings(models)) as url:
        assert httpx.get(f"{url}/v1/models/gray", timeout=10).json()["roi"] is True
        outside, inside = (
            post_files(url, "gray", [png_bytes(half_noisy(side))], heatmap="grid").json()["results"][0]
            for side in ("left", "right")
        )
        assert (outside["verdict"], inside["verdict"]) == ("ok", "anomalous")
        grid = np.array(outside["heatmap"]["values"])
        pixel = Calibration.from_dict(read_manifest(bundle).calibration).pixel
        assert np.allclose(grid[:, :14], pixel.scale[0])  # calm outside: the normal median
    (bundle / "roi.png").unlink()
    with running_server(make_settings(models), ready=False) as url:
        failed = httpx.get(f"{url}/v1/models", timeout=10).json()["failed"]
        assert any("roi.png" in reason for reason in failed.values())
