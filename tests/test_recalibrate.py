"""``mnemo recalibrate``: new good images give a new threshold and pixel level under a new version, which a
real server picks up at its next reload; bad input gets one clear line."""

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
from mnemo.calibration import Calibration, calibrate_normal, is_anomalous
from tests.image_bytes import png_bytes
from tests.service_helpers import make_settings, running_server, smooth_images
from tests.test_service_api import offline_scores, post_files

pytest_plugins = ["tests.service_fixtures"]


def mnemo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnemo", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def brighter_good_images(tmp_path):
    """The line's lighting changed: the same kind of part, 40 grey levels brighter."""
    folder = tmp_path / "new-good"
    folder.mkdir()
    for i, image in enumerate(smooth_images(30, 1, 28, seed=11)):
        Image.fromarray(np.clip(image[..., 0].astype(int) + 40, 0, 255).astype(np.uint8)).save(
            folder / f"{i}.png"
        )
    return folder


def test_recalibrate_moves_the_threshold_and_a_reload_serves_it(bundle_dir, tmp_path, brighter_good_images):
    models = tmp_path / "models"
    bundle = models / "gray"
    shutil.copytree(bundle_dir / "gray", bundle)
    before = read_manifest(bundle)
    files = sorted(brighter_good_images.iterdir())
    scores, heatmaps = offline_scores(bundle, [f.read_bytes() for f in files])
    expected = calibrate_normal(scores, 0.05, heatmaps[:, 0], 0.01)  # the bundle's own rates

    with running_server(make_settings(models)) as url:
        done = mnemo("recalibrate", str(bundle), "--data", str(brighter_good_images), "--version", "2",
                     "--no-progress")  # fmt: skip
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        old = Calibration.from_dict(before.calibration)
        assert report["images"] == 30 and report["version"] == {"old": before.version, "new": "2"}
        assert report["threshold"]["old"] == old.threshold
        assert report["threshold"]["new"] == pytest.approx(expected.threshold, abs=1e-4)
        assert report["pixel_threshold"]["new"] == pytest.approx(expected.pixel.threshold, abs=1e-4)
        assert report["old_threshold_flags"] == pytest.approx(np.mean(is_anomalous(scores, old.threshold)))
        assert report["warning"] is None and "warning" not in done.stderr  # 30 images resolve 5 %

        after = read_manifest(bundle)  # checksums verified: the model files are untouched
        assert after.version == "2" and after.files == before.files
        assert after.training["recalibrated"]["images"] == 30
        assert httpx.get(f"{url}/v1/models/gray", timeout=10).json()["version"] == before.version
        reload = httpx.post(f"{url}/v1/admin/reload", timeout=60).json()
        assert reload["loaded"] == ["gray"]
        info = httpx.get(f"{url}/v1/models/gray", timeout=10).json()
        assert info["version"] == "2" and info["threshold"] == report["threshold"]["new"]
        result = post_files(url, "gray", [png_bytes(smooth_images(1, 1, 28, seed=2)[0])]).json()["results"][0]
        assert result["threshold"] == report["threshold"]["new"]


def test_recalibrate_errors_are_one_clear_line(bundle_dir, tmp_path, brighter_good_images):
    bundle = tmp_path / "gray"
    shutil.copytree(bundle_dir / "gray", bundle)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "holds no images": ("recalibrate", str(bundle), "--data", str(empty)),
        "exists": ("recalibrate", str(bundle), "--data", str(brighter_good_images), "--out", str(empty)),
        "current one": ("recalibrate", str(bundle), "--data", str(brighter_good_images), "--version",
                        read_manifest(bundle).version),
        "no manifest.json": ("recalibrate", str(empty), "--data", str(brighter_good_images)),
    }  # fmt: skip
    for message, args in cases.items():
        done = mnemo(*args, "--no-progress")
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    (bundle / "model.onnx").write_bytes(b"broken")
    done = mnemo("recalibrate", str(bundle), "--data", str(brighter_good_images), "--no-progress")
    assert done.returncode == 2 and "corrupt" in done.stderr
    assert read_manifest(bundle, verify_files=False).version != "2"  # nothing written


def test_recalibrate_to_a_new_directory_leaves_the_bundle_alone(bundle_dir, tmp_path, brighter_good_images):
    out = tmp_path / "gray-v2"
    args = ("--out", str(out), "--version", "v2", "--false-alarm-rate", "0.1", "--no-progress")
    done = mnemo("recalibrate", str(bundle_dir / "gray"), "--data", str(brighter_good_images), *args)
    assert done.returncode == 0, done.stderr
    assert read_manifest(out).version == "v2" and read_manifest(out).calibration["target"] == 0.1
    assert read_manifest(bundle_dir / "gray").version != "v2"


def test_recalibrate_warns_when_its_images_cannot_resolve_the_rate(
    bundle_dir, tmp_path, brighter_good_images
):
    args = ("--out", str(tmp_path / "strict"), "--false-alarm-rate", "0.001", "--no-progress")
    done = mnemo("recalibrate", str(bundle_dir / "gray"), "--data", str(brighter_good_images), *args)
    assert done.returncode == 0, done.stderr
    warning = json.loads(done.stdout)["warning"]
    assert "30 good images" in warning and "needs 1000" in warning and "3%" in warning  # 1/31
    assert f"warning: {warning}" in done.stderr
