"""The Open Inference Protocol (V2) on a real uvicorn server, driven by a client nobody here wrote:
``tritonclient.http`` from PyPI (binary tensors, as it sends them by default), plus plain JSON requests."""

from __future__ import annotations

import base64
import json
import math
import struct

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from mnemo.bundle import read_manifest
from mnemo.imaging import Preprocessing, preprocess
from mnemo.service.oip import HEADER_LENGTH
from tests.image_bytes import png_bytes
from tests.service_helpers import defect_image, make_settings, metric_value, running_server, smooth_images
from tests.test_service_api import offline_scores, post_files

pytest_plugins = ["tests.service_fixtures"]
JSON = {"content-type": "application/json"}


@pytest.fixture
def client(server):
    client = triton.InferenceServerClient(server.removeprefix("http://"), network_timeout=30)
    yield client
    client.close()


def images() -> list[bytes]:
    return [
        png_bytes(smooth_images(1, 1, 28, seed=3)[0]),
        png_bytes(defect_image(1, 40)),
        png_bytes(defect_image(3, 90)),
    ]


def test_health_and_metadata(client, bundle_dir):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "mnemo"
    version = read_manifest(bundle_dir / "color").version
    meta = client.get_model_metadata("color")
    assert meta["versions"] == [version]
    assert {i["name"]: i["shape"] for i in meta["inputs"]} == {"image": [-1], "pixels": [-1, 3, 16, 16]}
    assert [o["name"] for o in meta["outputs"]] == ["score", "p_value", "verdict", "heatmap"]
    assert client.is_model_ready("color") and client.is_model_ready("color", model_version=version)
    assert not client.is_model_ready("color", model_version="nope") and not client.is_model_ready("nothing")


def test_bytes_batch_scores_like_v1_and_offline(client, server, bundle_dir):
    batch = images()
    tensor = triton.InferInput("image", [len(batch)], "BYTES")
    tensor.set_data_from_numpy(np.array(batch, dtype=np.object_))
    before = metric_value(httpx.get(f"{server}/metrics").text, "mnemo_images_scored_total", model="gray")
    result = client.infer("gray", [tensor])  # no outputs named: all of them, in binary
    scores, heatmaps = offline_scores(bundle_dir / "gray", batch)
    np.testing.assert_allclose(result.as_numpy("score"), scores, atol=1e-4)
    np.testing.assert_allclose(result.as_numpy("heatmap"), heatmaps, atol=1e-4)
    v1 = post_files(server, "gray", batch).json()["results"]
    np.testing.assert_allclose(result.as_numpy("p_value"), [r["p_value"] for r in v1], rtol=1e-6)
    assert [v.decode() for v in result.as_numpy("verdict")] == [r["verdict"] for r in v1]
    after = metric_value(httpx.get(f"{server}/metrics").text, "mnemo_images_scored_total", model="gray")
    assert after == before + 2 * len(batch)  # both protocols count in the same metrics


def test_fp32_inputs_and_a_threshold_parameter(client, bundle_dir):
    pre = Preprocessing.from_dict(read_manifest(bundle_dir / "color").preprocessing)
    x = np.stack([preprocess(data, pre) for data in images()])
    tensor = triton.InferInput("pixels", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    wanted = [triton.InferRequestedOutput("score"), triton.InferRequestedOutput("verdict", binary_data=False)]
    result = client.infer("color", [tensor], outputs=wanted, parameters={"threshold": -1e9})
    scores, _ = offline_scores(bundle_dir / "color", images())
    np.testing.assert_allclose(result.as_numpy("score"), scores, atol=1e-4)
    assert result.as_numpy("heatmap") is None  # only what was asked for
    assert [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("verdict")] == [
        "anomalous"
    ] * 3


def test_errors_are_the_protocols(client, server):
    wrong = triton.InferInput("pixels", [1, 1, 8, 8], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(InferenceServerException, match=r"pixels must have shape \[N, 1, 28, 28\]") as exc:
        client.infer("gray", [wrong])
    assert exc.value.status() == "400"
    broken = triton.InferInput("image", [1], "BYTES")
    broken.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(
        InferenceServerException, match=r"image\[0\]: not an image in an accepted format"
    ) as exc:
        client.infer("gray", [broken])
    assert exc.value.status() == "400"
    with pytest.raises(InferenceServerException, match="no model named 'nothing'") as exc:
        client.infer("nothing", [broken])
    assert exc.value.status() == "404"
    answer = httpx.post(f"{server}/v2/models/gray/infer", content=b"{not json", timeout=10)
    assert answer.status_code == 400 and isinstance(answer.json()["error"], str)
    assert httpx.get(f"{server}/v1/models/gray", timeout=10).status_code == 200  # still serving


def _image_input(**fields) -> dict:
    return {"name": "image", "datatype": "BYTES", "shape": [1], "data": [], **fields}


MALFORMED_BODIES = {
    "shape-overflow": {"inputs": [_image_input(shape=[1e999])]},
    "shape-float": {"inputs": [_image_input(shape=[1.9])]},
    "shape-string": {"inputs": [_image_input(shape="1")]},
    "tensor-parameters-list": {"inputs": [_image_input(parameters=[1])]},
    "binary-size-text": {"inputs": [_image_input(parameters={"binary_data_size": "abc"})]},
    "binary-size-overflow": {"inputs": [_image_input(parameters={"binary_data_size": 1e999})]},
    "request-parameters-text": {"inputs": [_image_input()], "parameters": "abc"},
    "outputs-number": {"inputs": [_image_input()], "outputs": 5},
    "output-parameters-list": {"inputs": [_image_input()], "outputs": [{"name": "score", "parameters": [1]}]},
    "threshold-400-digits": {"inputs": [_image_input()], "parameters": {"threshold": 10**400}},
    "pixels-400-digits": {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 28],
                                      "data": [10**400] * 784}]},
    "name-a-list": {"inputs": [_image_input(name=["image"])]},
    "id-a-list": {"inputs": [_image_input()], "id": [[1]]},
    "pixels-float32-max": {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 28],
                                       "data": [3e38] * 784}]},  # finite, but overflows in the model
}  # fmt: skip


def test_malformed_infer_bodies_are_400s_and_the_server_keeps_serving(server):
    """Every wrong type or oversized number is the client's mistake (found probing the server by hand:
    each of these was a 500 with a traceback)."""
    url = f"{server}/v2/models/gray/infer"
    with httpx.Client(timeout=10) as http:
        for case, body in MALFORMED_BODIES.items():
            answer = http.post(url, content=json.dumps(body), headers=JSON)  # 1e999: Infinity in JSON
            assert answer.status_code == 400, (case, answer.text)
            assert isinstance(answer.json()["error"], str), case
        deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # past Python's recursion limit
        assert http.post(url, content=deep, headers=JSON).status_code == 400
        many = struct.pack("<I", 0) * 100_000  # 100 000 empty images in a binary tensor declaring so
        tensor = _image_input(shape=[100_000], data=None, parameters={"binary_data_size": len(many)})
        header = json.dumps({"inputs": [tensor]}).encode()
        refused = http.post(url, content=header + many, headers={HEADER_LENGTH: str(len(header))})
        assert refused.status_code == 400 and "the limit is 16" in refused.json()["error"]
        past_end = json.dumps({"inputs": [_image_input(parameters={"binary_data_size": 8})]}).encode()
        cut = http.post(url, content=past_end + struct.pack("<I", 10**9) + b"abcd",
                        headers={HEADER_LENGTH: str(len(past_end))})  # fmt: skip
        assert cut.status_code == 400 and "truncated BYTES tensor" in cut.json()["error"]
        assert http.get(f"{server}/v1/models/gray").status_code == 200  # still serving
    metrics = httpx.get(f"{server}/metrics").text
    assert (
        metric_value(metrics, "mnemo_requests_total", model="gray", status="400") >= len(MALFORMED_BODIES) + 3
    )
    assert metric_value(metrics, "mnemo_requests_total", status="500") == 0
    assert math.isfinite(metric_value(metrics, "mnemo_anomaly_score_sum", model="gray"))


def test_plain_json_with_base64_images(server, bundle_dir):
    batch = images()[:2]
    body = {
        "id": "42",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                    "data": [base64.b64encode(b).decode() for b in batch]}],
        "outputs": [{"name": "score"}, {"name": "verdict"}],
    }  # fmt: skip
    answer = httpx.post(f"{server}/v2/models/gray/infer", json=body, timeout=30).json()
    assert answer["id"] == "42" and answer["model_name"] == "gray"
    (score, verdict) = answer["outputs"]
    np.testing.assert_allclose(score["data"], offline_scores(bundle_dir / "gray", batch)[0], atol=1e-4)
    assert (
        score["shape"] == [2]
        and verdict["datatype"] == "BYTES"
        and set(verdict["data"]) <= {"ok", "anomalous"}
    )


def test_an_api_key_guards_the_models_but_not_the_probes(bundle_dir):
    with running_server(make_settings(bundle_dir, api_key="k")) as url:
        assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
        refused = httpx.get(f"{url}/v2/models/gray", timeout=10)
        assert refused.status_code == 401 and "API key" in refused.json()["error"]
        assert httpx.get(f"{url}/v2/models/gray", headers={"X-API-Key": "k"}, timeout=10).status_code == 200
