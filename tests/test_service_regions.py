"""Defect regions in the answer (``regions=true``) against a real uvicorn server with real bundles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from mnemo.bundle import MANIFEST_FILE, read_manifest
from mnemo.calibration import Calibration
from mnemo.imaging import Preprocessing
from mnemo.regions import find_regions
from tests.image_bytes import png_bytes
from tests.service_helpers import defect_image, make_settings, running_server, smooth_images
from tests.test_service_api import offline_scores, post_files

pytest_plugins = ["tests.service_fixtures"]


@pytest.mark.parametrize("model", ["gray", "color"])  # resize and center_crop
def test_regions_box_the_flagged_pixels_in_the_uploaded_image(server, bundle_dir, model):
    manifest = read_manifest(bundle_dir / model)
    pixel = Calibration.from_dict(manifest.calibration).pixel
    prep = Preprocessing.from_dict(manifest.preprocessing)
    noise = np.random.default_rng(0).integers(0, 256, (60, 30, 3), dtype=np.uint8)  # far from any normal part
    wide = np.concatenate([noise, smooth_images(1, 3, 60, seed=6)[0]], axis=1)  # 90×60: policies differ
    images = [png_bytes(wide), png_bytes(smooth_images(1, 3, 60, seed=7)[0])]
    _, heatmaps = offline_scores(bundle_dir / model, images)
    body = post_files(server, model, images, regions="true").json()["results"]
    for result, heat in zip(body, heatmaps[:, 0]):
        expected = find_regions(heat, pixel.threshold, (90, 60) if result is body[0] else (60, 60), prep)
        got = result["regions"]
        assert [(r["x"], r["y"], r["width"], r["height"], r["area"]) for r in got] == [
            (e.x, e.y, e.width, e.height, e.area) for e in expected
        ]
        for region in got:
            assert region["peak"] > pixel.threshold and region["peak"] >= region["mean"] > pixel.threshold
            assert region["x"] + region["width"] <= (90 if result is body[0] else 60)
    assert body[0]["regions"], "the noisy strip must make a region at the 1 % pixel level"
    assert "regions" not in post_files(server, model, images[:1]).json()["results"][0]  # only when asked


def test_model_info_shows_the_pixel_level(server, bundle_dir):
    listed = httpx.get(f"{server}/v1/models/gray", timeout=10).json()
    expected = Calibration.from_dict(read_manifest(bundle_dir / "gray").calibration).pixel.threshold
    assert listed["pixel_threshold"] == expected


def test_a_bundle_without_pixel_calibration_refuses_regions_but_still_scores(bundle_dir, tmp_path):
    old = tmp_path / "models" / "old"
    shutil.copytree(bundle_dir / "gray", old)
    raw = json.loads((old / MANIFEST_FILE).read_text())
    del raw["calibration"]["pixel"]  # as exported before pixel calibration existed
    (old / MANIFEST_FILE).write_text(json.dumps(raw))
    image = [png_bytes(defect_image(1, 28))]
    with running_server(make_settings(tmp_path / "models")) as url:
        refused = post_files(url, "gray", image, regions="true")
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "no_pixel_calibration"
        assert "mnemo recalibrate" in refused.json()["error"]["message"]
        scored = post_files(url, "gray", image, heatmap="gray").json()["results"][0]
        assert scored["heatmap"]["scale"]["kind"] == "image"  # no calibrated scale to use


def test_the_shipped_bundle_boxes_defects_and_leaves_good_parts_clean(tmp_path):
    """The default model (bundles/brick, DAAD, pixel level recalibrated on 500 unseen good bricks):
    regions on defective bricks of a seed it never saw overlap their true masks; good bricks get few."""
    from mnemo.training.synthetic import generate  # torch: only for this test

    data = tmp_path / "bricks"
    generate(data, texture="brick", size=64, n_train=0, n_test_good=20, n_test_defect=5, seed=2025)
    good = sorted((data / "test" / "good").glob("*.png"))
    defective = sorted(p for p in (data / "test").glob("*/*.png") if p.parent.name != "good")
    with running_server(make_settings(Path(__file__).resolve().parents[1] / "bundles" / "brick")) as url:

        def regions(path):
            return post_files(url, "brick", [path.read_bytes()], regions="true").json()["results"][0][
                "regions"
            ]

        hits = 0
        for path in defective:
            mask = (
                np.asarray(Image.open(data / "ground_truth" / path.parent.name / f"{path.stem}_mask.png")) > 0
            )
            boxes = regions(path)
            hits += any(
                mask[r["y"] : r["y"] + r["height"], r["x"] : r["x"] + r["width"]].any() for r in boxes
            )
        clean = sum(not regions(path) for path in good)
    assert hits >= 0.8 * len(defective), f"{hits} of {len(defective)} defects boxed"
    assert clean >= 0.8 * len(good), f"only {clean} of {len(good)} good bricks without a region"


def test_reconstruction_shows_what_the_memory_makes_of_the_part(server, bundle_dir):
    import base64
    import io

    import onnxruntime as ort

    from mnemo.imaging import denormalise, preprocess

    manifest = read_manifest(bundle_dir / "color")
    prep = Preprocessing.from_dict(manifest.preprocessing)
    image = png_bytes(defect_image(3, 40))
    result = post_files(server, "color", [image], reconstruction="true").json()["results"][0]
    picture = result["reconstruction"]
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(picture["png_base64"]))))
    session = ort.InferenceSession(
        str(bundle_dir / "color" / "reconstruction.onnx"), providers=["CPUExecutionProvider"]
    )
    (rebuilt,) = session.run(None, {"image": preprocess(image, prep)[None]})
    assert (picture["width"], picture["height"]) == (16, 16) and decoded.shape == (16, 16, 3)
    assert np.array_equal(decoded, denormalise(rebuilt[0], prep))
    assert httpx.get(f"{server}/v1/models/color", timeout=10).json()["reconstruction"] is True
    assert "reconstruction" not in post_files(server, "color", [image]).json()["results"][0]


def test_a_bundle_without_a_reconstruction_graph_says_so(bundle_dir, tmp_path):
    old = tmp_path / "models" / "old"
    shutil.copytree(bundle_dir / "gray", old)
    raw = json.loads((old / MANIFEST_FILE).read_text())
    del raw["files"]["reconstruction.onnx"]  # as exported before reconstructions were
    (old / MANIFEST_FILE).write_text(json.dumps(raw))
    with running_server(make_settings(tmp_path / "models")) as url:
        refused = post_files(url, "gray", [png_bytes(defect_image(1, 28))], reconstruction="true")
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "no_reconstruction"
        assert httpx.get(f"{url}/v1/models/gray", timeout=10).json()["reconstruction"] is False
