"""The Open Inference Protocol over gRPC (``MNEMO_GRPC_PORT``) on a real server, driven by a client nobody
here wrote: ``tritonclient.grpc`` from PyPI, which speaks Triton's ``inference.GRPCInferenceService``."""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.utils import InferenceServerException

from mnemo.bundle import read_manifest
from mnemo.imaging import Preprocessing, preprocess
from mnemo.service.oip_grpc import DESCRIPTOR_FILE, messages
from tests.image_bytes import png_bytes
from tests.service_helpers import (
    defect_image,
    make_settings,
    metric_value,
    running_server,
    smooth_images,
)
from tests.test_service_api import offline_scores, post_files
from tests.test_service_cli import free_port

pytest_plugins = ["tests.service_fixtures"]
KEY = "grpc-secret"


@pytest.fixture(scope="module")
def served(bundle_dir):
    """(REST URL, gRPC address) of one server that speaks both."""
    port = free_port()
    with running_server(make_settings(bundle_dir, grpc_port=port, max_wait_ms=5)) as url:
        yield url, f"127.0.0.1:{port}"


@pytest.fixture
def client(served):
    client = triton.InferenceServerClient(served[1])
    yield client
    client.close()


def images() -> list[bytes]:
    return [png_bytes(smooth_images(1, 1, 28, seed=3)[0]), png_bytes(defect_image(1, 40))]


def image_input(batch: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(batch)], "BYTES")
    tensor.set_data_from_numpy(np.array(batch, dtype=np.object_))
    return tensor


def test_health_and_metadata(client, bundle_dir):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata().name == "mnemo"
    version = read_manifest(bundle_dir / "color").version
    meta = client.get_model_metadata("color")
    assert list(meta.versions) == [version] and meta.platform == "mnemo_onnxruntime"
    assert {i.name: list(i.shape) for i in meta.inputs} == {"image": [-1], "pixels": [-1, 3, 16, 16]}
    assert [o.name for o in meta.outputs] == ["score", "p_value", "verdict", "heatmap"]
    assert client.is_model_ready("color") and client.is_model_ready("color", model_version=version)
    assert not client.is_model_ready("color", model_version="nope") and not client.is_model_ready("nothing")


def test_bytes_batch_scores_like_v1_and_offline(client, served, bundle_dir):
    url, _ = served
    batch = images()
    before = metric_value(httpx.get(f"{url}/metrics").text, "mnemo_images_scored_total", model="gray")
    result = client.infer("gray", [image_input(batch)])
    scores, heatmaps = offline_scores(bundle_dir / "gray", batch)
    np.testing.assert_allclose(result.as_numpy("score"), scores, atol=1e-4)
    np.testing.assert_allclose(result.as_numpy("heatmap"), heatmaps, atol=1e-4)
    v1 = post_files(url, "gray", batch).json()["results"]
    np.testing.assert_allclose(result.as_numpy("p_value"), [r["p_value"] for r in v1], rtol=1e-6)
    assert [v.decode() for v in result.as_numpy("verdict")] == [r["verdict"] for r in v1]
    after = metric_value(httpx.get(f"{url}/metrics").text, "mnemo_images_scored_total", model="gray")
    assert after - before == 4  # 2 over gRPC, 2 over /v1: the same metrics


def test_fp32_pixels_and_a_threshold_parameter(client, bundle_dir):
    batch = images()
    prep = Preprocessing.from_dict(read_manifest(bundle_dir / "gray").preprocessing)
    x = np.stack([preprocess(b, prep) for b in batch])
    tensor = triton.InferInput("pixels", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    outputs = [triton.InferRequestedOutput("score"), triton.InferRequestedOutput("verdict")]
    result = client.infer("gray", [tensor], outputs=outputs, parameters={"threshold": 0.0})
    np.testing.assert_allclose(
        result.as_numpy("score"), offline_scores(bundle_dir / "gray", batch)[0], atol=1e-4
    )
    assert [v.decode() for v in result.as_numpy("verdict")] == ["anomalous", "anomalous"]  # every score > 0
    assert result.as_numpy("heatmap") is None  # only what was asked for


@pytest.mark.parametrize(
    "model, tensor, code, words",
    [
        ("nothing", "image", "StatusCode.NOT_FOUND", "nothing"),
        ("gray", "broken", "StatusCode.INVALID_ARGUMENT", "not an image in an accepted format"),
        ("gray", "pixels", "StatusCode.INVALID_ARGUMENT", "pixels must have shape"),
    ],
)
def test_errors_are_grpc_statuses_with_the_reason(client, model, tensor, code, words):
    if tensor == "pixels":
        bad = triton.InferInput("pixels", [1, 1, 5, 5], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 1, 5, 5), np.float32))
    else:
        bad = image_input([b"not an image" if tensor == "broken" else images()[0]])
    with pytest.raises(InferenceServerException) as raised:
        client.infer(model, [bad])
    assert raised.value.status() == code and words in raised.value.message()
    assert client.infer("gray", [image_input(images()[:1])]).as_numpy("score").shape == (1,)  # still serving


def test_an_api_key_guards_inference_but_not_health(bundle_dir, monkeypatch):
    monkeypatch.setenv("MNEMO_API_KEY", KEY)
    port = free_port()
    with running_server(make_settings(bundle_dir, grpc_port=port)):
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_live()
        with pytest.raises(InferenceServerException) as raised:
            client.infer("gray", [image_input(images()[:1])])
        assert raised.value.status() == "StatusCode.UNAUTHENTICATED"
        scored = client.infer("gray", [image_input(images()[:1])], headers={"x-api-key": KEY})
        assert scored.as_numpy("score").shape == (1,)
        client.close()


def test_the_descriptor_speaks_tritons_wire_format():
    """Every message Mnemo serves has the fields (names, numbers, types, repetition) of Triton's own."""
    ours = messages()
    for name, cls in ours.items():
        theirs = triton_pb2.DESCRIPTOR.message_types_by_name[name]
        _same_fields(cls.DESCRIPTOR, theirs)
    service = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"} <= {
        m.name for m in service.methods
    }


def _same_fields(ours, theirs) -> None:
    for field in ours.fields:
        other = theirs.fields_by_name[field.name]
        assert (field.number, field.type, field.is_repeated) == (
            other.number,
            other.type,
            other.is_repeated,
        ), f"{ours.full_name}.{field.name}"
    for nested in ours.nested_types:
        _same_fields(nested, theirs.nested_types_by_name[nested.name])


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools is not installed")
def test_the_committed_descriptor_is_the_proto_compiled(tmp_path):
    proto = Path(DESCRIPTOR_FILE).with_suffix(".proto")
    out = tmp_path / "fresh.pb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{proto.parent}",
            f"--descriptor_set_out={out}",
            str(proto),
        ],
        check=True,
    )
    assert out.read_bytes() == DESCRIPTOR_FILE.read_bytes(), "recompile: see the .proto's header"


def test_typed_contents_work_as_raw_ones(served, bundle_dir):
    """A client that sends ``contents.bytes_contents`` (not tritonclient's raw form) gets the same scores."""
    import grpc

    m = messages()
    request = m["ModelInferRequest"](model_name="gray")
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend(images())
    request.outputs.add(name="score")
    with grpc.insecure_channel(served[1]) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=m["ModelInferRequest"].SerializeToString,
            response_deserializer=m["ModelInferResponse"].FromString,
        )
        response = infer(request, timeout=30)
    (output,) = response.outputs
    assert output.name == "score" and list(output.shape) == [2]
    scores = np.frombuffer(response.raw_output_contents[0], "<f4")
    np.testing.assert_allclose(scores, offline_scores(bundle_dir / "gray", images())[0], atol=1e-4)


def test_raw_and_typed_contents_together_or_extra_raw_ones_are_invalid(served):
    """Found by a hostile sweep: both were scored, from whichever the server looked at first."""
    import grpc

    m = messages()
    both = m["ModelInferRequest"](model_name="gray")
    tensor = both.inputs.add(name="image", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(images()[0])
    both.raw_input_contents.append(struct.pack("<I", len(images()[1])) + images()[1])
    extra = m["ModelInferRequest"](model_name="gray")
    extra.inputs.add(name="image", datatype="BYTES", shape=[1])
    extra.raw_input_contents.extend([struct.pack("<I", len(images()[0])) + images()[0]] * 2)
    with grpc.insecure_channel(served[1]) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=m["ModelInferRequest"].SerializeToString,
            response_deserializer=m["ModelInferResponse"].FromString,
        )
        for request, words in ((both, "not both"), (extra, "2 raw_input_contents")):
            with pytest.raises(grpc.RpcError) as error:
                infer(request, timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in error.value.details()
