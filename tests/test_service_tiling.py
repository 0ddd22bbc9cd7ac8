"""A tiled bundle (``mnemo.tiling``) served by a real uvicorn server: every tile scored in one batcher
request, the worst tile's score, the heatmap stitched at the working resolution, regions in the upload's
pixels, the limits on tiles, and recalibration of a tiled bundle."""

from __future__ import annotations

import base64
import json
import shutil
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from mnemo.bundle import MANIFEST_FILE, BundleError, read_manifest
from mnemo.calibration import Calibration
from mnemo.imaging import Preprocessing, decode_image
from mnemo.service.model_store import load_bundle
from mnemo.service.recalibration import recalibrate
from mnemo.tiling import Tiling, prepare_tiles, working_pixels
from tests.image_bytes import png_bytes
from tests.service_helpers import export_tiny_bundle, make_settings, running_server, smooth_images
from tests.test_service_api import post_files

TILING = {"tile": 28, "overlap": 4, "scale": 0.5}
FRAME = 112  # 56 px at the working scale: 3 × 3 tiles of 28 px


def frame(seed: int) -> np.ndarray:
    """A 'normal' gray frame larger than the model's input."""
    return smooth_images(1, 1, FRAME, seed=seed)[0]


def with_defect(image: np.ndarray, x: int, y: int, side: int = 20) -> np.ndarray:
    image = image.copy()
    image[y : y + side, x : x + side] = 255
    return image


@pytest.fixture(scope="module")
def tiled_dir(tmp_path_factory) -> Path:
    """``tiled``: the tiny gray AE with a tiling, calibrated on good frames by ``mnemo recalibrate``."""
    root = tmp_path_factory.mktemp("tiled")
    bundle = export_tiny_bundle(root / "models", "tiled")
    raw = json.loads((bundle / MANIFEST_FILE).read_text())
    (bundle / MANIFEST_FILE).write_text(json.dumps({**raw, "tiling": TILING}))
    good = root / "good"
    good.mkdir()
    for i in range(40):
        Image.fromarray(frame(100 + i)[..., 0]).save(good / f"{i:02d}.png")
    recalibrate(bundle, good, version="2", pixel_false_alarm_rate=0.01, progress=False)
    return root / "models"


@pytest.fixture(scope="module")
def tiled_server(tiled_dir):
    with running_server(make_settings(tiled_dir, max_wait_ms=5, max_batch_size=4, max_queue=16)) as url:
        yield url


def offline_tiled(bundle: Path, image: np.ndarray) -> tuple[float, np.ndarray]:
    """The tiled answer without the service: the tiles through the TorchScript copy, merged."""
    manifest = read_manifest(bundle)
    pre, tiling = Preprocessing.from_dict(manifest.preprocessing), Tiling.from_dict(manifest.tiling)
    height, width = image.shape[:2]
    target = tiling.working_size(width, height)
    tiles = prepare_tiles(working_pixels(decode_image(png_bytes(image)), target, 1), pre, tiling)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(bundle / "model.ts"))
    with torch.no_grad():
        scores, heat = (t.numpy() for t in module(torch.from_numpy(tiles)))
    return tiling.merge(scores, heat[:, 0], *target)


def test_a_frame_is_scored_tile_by_tile_and_answered_at_the_working_resolution(tiled_server, tiled_dir):
    image = with_defect(frame(7), 70, 20)
    score, heat = offline_tiled(tiled_dir / "tiled", image)
    body = post_files(tiled_server, "tiled", [png_bytes(image)], heatmap="overlay").json()["results"][0]
    assert body["score"] == pytest.approx(score, rel=1e-5)
    assert (body["heatmap"]["width"], body["heatmap"]["height"]) == (56, 56)  # 112 px at scale 0.5
    grid = post_files(tiled_server, "tiled", [png_bytes(image)], heatmap="grid").json()["results"][0]
    assert np.asarray(grid["heatmap"]["values"]).shape == (32, 32)  # the grid setting's default
    assert heat.shape == (56, 56)


def test_regions_find_a_defect_in_the_uploads_own_pixels(tiled_server, tiled_dir):
    image = with_defect(frame(8), 70, 20)
    body = post_files(tiled_server, "tiled", [png_bytes(image)], regions="true").json()["results"][0]
    assert body["verdict"] == "anomalous"
    top = body["regions"][0]
    assert top["x"] <= 70 + 20 and top["x"] + top["width"] >= 70  # overlaps the blotch at (70, 20)
    assert top["y"] <= 20 + 20 and top["y"] + top["height"] >= 20
    assert top["x"] + top["width"] <= FRAME and top["width"] < FRAME / 2  # a box, not the frame
    good = post_files(tiled_server, "tiled", [png_bytes(frame(9))], regions="true").json()["results"][0]
    assert good["verdict"] == "ok"


def test_the_threshold_is_calibrated_on_whole_frames(tiled_dir):
    manifest = read_manifest(tiled_dir / "tiled")
    calibration = Calibration.from_dict(manifest.calibration)
    scores = [offline_tiled(tiled_dir / "tiled", frame(100 + i))[0] for i in range(40)]
    assert np.min(np.abs(np.asarray(scores) - calibration.threshold)) < 1e-5  # an observed worst-tile score
    # a score that is the threshold may come back a few float32 ulps above it from another batch layout
    assert np.mean(np.asarray(scores) > calibration.threshold + 1e-5) <= calibration.target


def test_reconstructions_are_stitched_like_heatmaps(tiled_server):
    body = post_files(tiled_server, "tiled", [png_bytes(frame(3))], reconstruction="true").json()
    picture = body["results"][0]["reconstruction"]
    assert (picture["width"], picture["height"]) == (56, 56)


def test_an_image_smaller_than_a_tile_gets_a_clear_400(tiled_server):
    small = smooth_images(1, 1, 40, seed=1)[0]  # 20 px at the working scale
    response = post_files(tiled_server, "tiled", [png_bytes(small)])
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "image_too_small" and "at least 56×56" in error["message"]


def test_tiles_count_against_the_queue(tiled_server):
    # 2 frames × 9 tiles = 18 > the queue's 16: refused before decoding, the server keeps serving
    response = post_files(tiled_server, "tiled", [png_bytes(frame(1)), png_bytes(frame(2))])
    assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_tiles"
    assert post_files(tiled_server, "tiled", [png_bytes(frame(1))]).status_code == 200


def test_the_v2_protocol_scores_a_tiled_frame_as_v1_does(tiled_server):
    image = png_bytes(with_defect(frame(4), 10, 60))
    v1 = post_files(tiled_server, "tiled", [image]).json()["results"][0]["score"]
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(image)]}]}
    v2 = httpx.post(f"{tiled_server}/v2/models/tiled/infer", json=request, timeout=30).json()
    score = next(o for o in v2["outputs"] if o["name"] == "score")["data"][0]
    assert score == pytest.approx(v1, rel=1e-6)


def test_model_info_shows_the_tiling(tiled_server):
    assert httpx.get(f"{tiled_server}/v1/models/tiled", timeout=10).json()["tiling"] == {
        "tile": 28, "overlap": 4, "scale": 0.5
    }  # fmt: skip


def test_a_tiling_whose_tile_is_not_the_models_input_is_refused_at_load(tiled_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiled_dir / "tiled", bad)
    raw = json.loads((bad / MANIFEST_FILE).read_text())
    (bad / MANIFEST_FILE).write_text(json.dumps({**raw, "tiling": {**TILING, "tile": 32}}))
    with pytest.raises(BundleError, match=r"tiling\.tile 32 != preprocessing\.size 28"):
        load_bundle(bad, make_settings(tmp_path))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_tiled_bundle_with_an_roi_ignores_defects_outside_it(tiled_dir, tmp_path):
    models, good = tmp_path / "models", tiled_dir.parent / "good"
    mask = np.zeros((FRAME, FRAME), np.uint8)
    mask[:, : FRAME // 2] = 255  # the frame's left half
    Image.fromarray(mask).save(tmp_path / "roi.png")
    models.mkdir()
    recalibrate(
        tiled_dir / "tiled", good, out=models / "tiled", roi=tmp_path / "roi.png", version="3", progress=False
    )
    with running_server(make_settings(models, max_wait_ms=5, max_queue=64)) as url:
        left, right = with_defect(frame(11), 10, 40), with_defect(frame(11), 80, 40)
        body = post_files(url, "tiled", [png_bytes(left), png_bytes(right)], regions="true").json()["results"]
    assert [r["verdict"] for r in body] == ["anomalous", "ok"]
    for result in body:  # nothing outside the ROI is ever reported (inside, the 1 % pixel level may fire)
        assert all(region["x"] + region["width"] <= FRAME // 2 for region in result["regions"])
    assert any(
        region["x"] <= 10 + 20 and region["x"] + region["width"] >= 10 for region in body[0]["regions"]
    )
