"""End-to-end API tests against a real uvicorn server on loopback, with real exported bundles."""

from __future__ import annotations

import base64
import io
import json
import shutil
import warnings

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from mnemo.bundle import ONNX_FILE, read_manifest
from mnemo.calibration import Calibration
from mnemo.imaging import Preprocessing, preprocess
from tests.image_bytes import png_bytes
from tests.service_helpers import (
    defect_image,
    make_settings,
    metric_value,
    running_server,
    smooth_images,
)

pytest_plugins = ["tests.service_fixtures"]  # the shared fixtures: bundle_dir, server


def offline_scores(bundle, images: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """What the model says without the service: mnemo.imaging + the bundle's TorchScript copy."""
    manifest = read_manifest(bundle)
    pre = Preprocessing.from_dict(manifest.preprocessing)
    x = torch.from_numpy(np.stack([preprocess(data, pre) for data in images]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(bundle / "model.ts"))
    with torch.no_grad():
        score, heatmap = module(x)
    return score.numpy(), heatmap.numpy()


def post_files(url: str, model: str, images: list[bytes], **params) -> httpx.Response:
    files = [("files", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return httpx.post(f"{url}/v1/models/{model}:score", files=files, params=params, timeout=30)


def decode_png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_scores_p_values_and_verdicts_match_offline_scoring(server, bundle_dir):
    big_rgb = smooth_images(1, 3, 120, seed=5)[0]  # far from 28×28 and colour: resized + converted
    images = [
        png_bytes(smooth_images(1, 1, 28, seed=2)[0]),
        png_bytes(defect_image(1, 28)),
        png_bytes(big_rgb),
    ]
    response = post_files(server, "gray", images)
    assert response.status_code == 200, response.text
    body = response.json()
    scores, _ = offline_scores(bundle_dir / "gray", images)
    calibration = Calibration.from_dict(read_manifest(bundle_dir / "gray").calibration)
    results = body["results"]
    assert [r["filename"] for r in results] == ["img0.png", "img1.png", "img2.png"]
    np.testing.assert_allclose([r["score"] for r in results], scores, atol=1e-4)
    for result in results:
        assert result["threshold"] == pytest.approx(calibration.threshold)
        assert result["p_value"] == pytest.approx(calibration.p_value(result["score"]))
        assert result["verdict"] == ("anomalous" if result["score"] > calibration.threshold else "ok")
        assert "heatmap" not in result  # only on request
    assert body["model"] == {"name": "gray", "version": "1"}
    assert body["timings_ms"]["total_ms"] >= body["timings_ms"]["inference_ms"] > 0


def test_raw_image_body_on_the_colour_model(server, bundle_dir):
    image = png_bytes(smooth_images(1, 3, 40, seed=7)[0][:, :30])  # 40×30: center-cropped per manifest
    response = httpx.post(
        f"{server}/v1/models/color:score", content=image, headers={"content-type": "image/png"}, timeout=30
    )
    assert response.status_code == 200, response.text
    [result] = response.json()["results"]
    scores, _ = offline_scores(bundle_dir / "color", [image])
    assert result["score"] == pytest.approx(float(scores[0]), abs=1e-4)


@pytest.mark.parametrize("model,size", [("gray", 28), ("color", 16)])
def test_heatmap_formats(server, bundle_dir, model, size):
    image = png_bytes(defect_image(3, 50))
    _, heatmaps = offline_scores(bundle_dir / model, [image])
    grid = post_files(server, model, [image], heatmap="grid").json()["results"][0]["heatmap"]
    assert (grid["format"], grid["width"], grid["height"]) == ("grid", size, size)
    np.testing.assert_allclose(np.array(grid["values"]), heatmaps[0, 0], atol=1e-4)  # below 32 px: exact
    overlay = post_files(server, model, [image], heatmap="overlay").json()["results"][0]["heatmap"]
    picture = decode_png(overlay["png_base64"])
    assert (picture.mode, picture.size) == ("RGB", (size, size))
    gray = post_files(server, model, [image], heatmap="gray", heatmap_scale="image").json()["results"][0]
    levels = np.asarray(decode_png(gray["heatmap"]["png_base64"]))
    assert levels.shape == (size, size) and levels.min() == 0 and levels.max() == 255  # min…max stretch
    hottest = np.unravel_index(np.argmax(heatmaps[0, 0]), (size, size))
    assert levels[hottest] == 255
    assert gray["heatmap"]["scale"] == pytest.approx(
        {"kind": "image", "vmin": heatmaps[0, 0].min(), "vmax": heatmaps[0, 0].max()}, abs=1e-4
    )


@pytest.mark.parametrize("model", ["gray", "color"])
def test_heatmap_colours_follow_the_calibrated_scale_by_default(server, bundle_dir, model):
    """One scale for every image (normal pixels' median → region level), so a normal part looks calm."""
    pixel = Calibration.from_dict(read_manifest(bundle_dir / model).calibration).pixel
    vmin, vmax = pixel.scale
    normal, defect = png_bytes(smooth_images(1, 3, 40, seed=4)[0]), png_bytes(defect_image(3, 40))
    _, heatmaps = offline_scores(bundle_dir / model, [normal, defect])
    body = post_files(server, model, [normal, defect], heatmap="gray").json()["results"]
    for result, heat in zip(body, heatmaps[:, 0]):
        assert result["heatmap"]["scale"] == {"kind": "calibrated", "vmin": vmin, "vmax": vmax}
        levels = np.asarray(decode_png(result["heatmap"]["png_base64"]), np.float64)
        expected = np.clip((heat - vmin) / (vmax - vmin), 0, 1) * 255
        assert np.abs(levels - expected).max() <= 1.0  # the same score is the same grey in every image


def test_request_threshold_overrides_the_verdict(server):
    image = [png_bytes(smooth_images(1, 1, 28, seed=3)[0])]
    score = post_files(server, "gray", image).json()["results"][0]["score"]
    below = post_files(server, "gray", image, threshold=score - 1e-3).json()["results"][0]
    above = post_files(server, "gray", image, threshold=score + 1e-3).json()["results"][0]
    assert (below["verdict"], above["verdict"]) == ("anomalous", "ok")
    assert below["threshold"] == pytest.approx(score - 1e-3)


def test_model_listing_reports_manifest_facts(server, bundle_dir):
    listing = httpx.get(f"{server}/v1/models").json()["models"]
    assert [m["name"] for m in listing] == ["color", "gray"]
    gray = httpx.get(f"{server}/v1/models/gray").json()
    manifest = read_manifest(bundle_dir / "gray")
    assert (gray["input_channels"], gray["input_size"]) == (1, 28)
    assert gray["threshold"] == pytest.approx(manifest.threshold)
    assert (gray["version"], gray["architecture"], gray["backend"], gray["device"]) == (
        "1", "ae", "onnxruntime", "cpu",
    )  # fmt: skip
    assert gray["preprocessing"] == manifest.preprocessing
    missing = httpx.get(f"{server}/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_model"


def test_health_readiness_and_openapi(server):
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    for probe in ("healthz", "readyz"):  # load balancers' HEAD checks: the status, no body
        head = httpx.head(f"{server}/{probe}")
        assert head.status_code == 200 and head.content == b""
    ready = httpx.get(f"{server}/readyz").json()
    assert ready == {"ready": True, "requires": "all", "models": ["color", "gray"], "failed": {}}
    spec = httpx.get(f"{server}/openapi.json").json()
    operation = spec["paths"]["/v1/models/{name}:score"]["post"]
    assert {"multipart/form-data", "image/*"} <= set(operation["requestBody"]["content"])
    assert {"200", "404", "413", "415", "503", "504"} <= set(operation["responses"])
    assert httpx.get(f"{server}/docs").status_code == 200


def test_metrics_are_exposed_and_move(server):
    before = httpx.get(f"{server}/metrics").text
    images = [png_bytes(smooth_images(1, 1, 28, seed=s)[0]) for s in (10, 11)]
    body = post_files(server, "gray", images).json()
    after = httpx.get(f"{server}/metrics").text
    flagged = sum(r["verdict"] == "anomalous" for r in body["results"])

    def delta(name, **labels):
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert delta("mnemo_requests_total", model="gray", status="200") == 1
    assert delta("mnemo_images_scored_total", model="gray") == 2
    assert delta("mnemo_verdicts_total", model="gray", verdict="anomalous") == flagged
    assert delta("mnemo_verdicts_total", model="gray", verdict="ok") == 2 - flagged
    assert delta("mnemo_anomaly_score_count", model="gray") == 2
    assert delta("mnemo_p_value_count", model="gray") == 2
    assert delta("mnemo_queue_wait_seconds_count", model="gray") == 2
    assert delta("mnemo_request_duration_seconds_count", model="gray") == 1
    assert delta("mnemo_batch_size_sum", model="gray") == 2
    info = dict(model="gray", version="1", architecture="ae", backend="onnxruntime", device="cpu")
    assert metric_value(after, "mnemo_model_info", **info) == 1
    assert metric_value(after, "mnemo_ready") == 1


def test_api_key_auth_and_admin_reload(bundle_dir, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(bundle_dir, root)
    with running_server(make_settings(root, api_key="let-me-in", api_key_header="X-Key")) as url:
        image = {"content": png_bytes(smooth_images(1, 1, 28)[0]), "headers": {"content-type": "image/png"}}
        refused = httpx.post(f"{url}/v1/models/gray:score", **image)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        wrong = httpx.get(f"{url}/v1/models", headers={"X-Key": "guess"})
        assert wrong.status_code == 401
        key = {"X-Key": "let-me-in"}
        ok = httpx.post(
            f"{url}/v1/models/gray:score", content=image["content"], headers={**image["headers"], **key}
        )
        assert ok.status_code == 200
        assert httpx.get(f"{url}/healthz").status_code == 200  # probes and metrics stay open
        assert "X-Key" in httpx.get(f"{url}/").text  # the page sends the configured header

        assert httpx.post(f"{url}/v1/admin/reload").status_code == 401
        (root / "gray" / ONNX_FILE).write_bytes(b"corrupted on disk")
        report = httpx.post(f"{url}/v1/admin/reload", headers=key).json()
        assert report["kept"] == ["gray"] and report["unchanged"] == ["color"]
        assert "corrupt" in json.dumps(report["failed"])
        again = httpx.post(
            f"{url}/v1/models/gray:score", content=image["content"], headers={**image["headers"], **key}
        )
        assert again.status_code == 200 and again.json()["model"]["version"] == "1"
        metrics = httpx.get(f"{url}/metrics").text
        assert metric_value(metrics, "mnemo_errors_total", kind="unauthorized") == 3
        assert metric_value(metrics, "mnemo_errors_total", kind="bundle_load") == 1


def test_torchscript_backend_serves_the_same_scores(bundle_dir, server):
    images = [png_bytes(smooth_images(1, 1, 28, seed=s)[0]) for s in (20, 21)]
    expected = [r["score"] for r in post_files(server, "gray", images).json()["results"]]
    with running_server(make_settings(bundle_dir, backend="torchscript", device="auto")) as url:
        assert httpx.get(f"{url}/v1/models/gray").json()["backend"] == "torchscript"
        got = [r["score"] for r in post_files(url, "gray", images).json()["results"]]
    np.testing.assert_allclose(got, expected, atol=1e-4)
