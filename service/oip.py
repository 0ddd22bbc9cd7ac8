"""The Open Inference Protocol (KServe V2), REST, beside ``/v1``: the one protocol Triton, KServe, MLServer
and OpenVINO Model Server share, so their clients (``tritonclient``, KServe's) drive Mnemo as they are.

Served from the same model store, batcher, limits and metrics as ``/v1`` (issue 15):

* ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``; ``GET /v2/models/{name}[/versions/{v}]``
  (metadata), ``GET /v2/models/{name}[/versions/{v}]/ready``;
* ``POST /v2/models/{name}[/versions/{v}]/infer`` with one input: ``image``, ``BYTES`` [N] of encoded
  images (decoded and limited exactly as ``/v1`` uploads; in JSON ``data`` as base64 strings), or
  ``pixels``, ``FP32`` [N, C, H, W] already in the model's layout and normalisation. Outputs ``score``
  FP32 [N], ``p_value`` FP32 [N], ``verdict`` BYTES [N] (``ok``/``anomalous``), ``heatmap`` FP32
  [N, 1, H, W]: all of them unless the request names some. Request parameter ``threshold`` overrides
  the model's.
* Tensors as JSON ``data`` or through the binary tensor extension (``binary_data_size``, the
  ``Inference-Header-Content-Length`` header), as ``tritonclient`` sends and reads them by default.
* Errors as the protocol has them, ``{"error": "<message>"}`` (``service/errors.py`` renders every
  ``/v2`` error so).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import struct
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Request, Response

from mnemo import __version__
from mnemo.service.capture import CaptureStore
from mnemo.service.decoding import INLINE_BYTES, CpuSlots
from mnemo.service.dependencies import CaptureDep, CpuSlotsDep, MetricsDep, SettingsDep, StoreDep, find_model
from mnemo.service.errors import ApiError
from mnemo.service.model_store import LoadedModel
from mnemo.service.routes import UNKNOWN_MODEL
from mnemo.service.scoring import ScoreOptions, decode_and_infer, infer_inputs, judge, observe, within_roi
from mnemo.service.settings import Settings
from mnemo.service.uploads import Upload

HEADER_LENGTH = "Inference-Header-Content-Length"
INPUTS = {"image": "BYTES", "pixels": "FP32"}
OUTPUTS = ("score", "p_value", "verdict", "heatmap")
TAGS = ["Open Inference Protocol (V2)"]
v2_health = APIRouter(prefix="/v2", tags=TAGS)  # open like /healthz: probes carry no API key
v2 = APIRouter(prefix="/v2", tags=TAGS)


# --------------------------------------------------------------------------------------- metadata


@v2_health.get("", summary="server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "mnemo", "version": __version__, "extensions": ["binary_tensor_data"]}


@v2_health.get("/health/live", summary="liveness")
async def live() -> Response:
    return Response(status_code=200)


@v2_health.get("/health/ready", summary="readiness: as /readyz")
async def ready(store: StoreDep) -> Response:
    return Response(status_code=200 if store.ready else 503)


@v2.get("/models/{name:model_name}", summary="model metadata")
@v2.get("/models/{name:model_name}/versions/{version}", summary="model metadata, one version")
async def model_metadata(name: str, store: StoreDep, version: str | None = None) -> dict[str, Any]:
    return metadata_of(versioned(store, name, version))


def metadata_of(model: LoadedModel) -> dict[str, Any]:
    """The protocol's model metadata (REST and gRPC). A tiled bundle takes images of any size (its
    heatmaps follow them) and ``pixels`` as single tiles."""
    pre, m = model.preprocessing, model.manifest
    heat = [-1, 1, -1, -1] if model.tiling else [-1, 1, pre.size, pre.size]
    return {
        "name": m.name,
        "versions": [m.version],
        "platform": f"mnemo_{model.runner.backend}",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "FP32", "shape": [-1, pre.channels, pre.size, pre.size]},
        ],
        "outputs": [
            {"name": "score", "datatype": "FP32", "shape": [-1]},
            {"name": "p_value", "datatype": "FP32", "shape": [-1]},
            {"name": "verdict", "datatype": "BYTES", "shape": [-1]},
            {"name": "heatmap", "datatype": "FP32", "shape": heat},
        ],
    }


@v2.get("/models/{name:model_name}/ready", summary="model readiness")
@v2.get("/models/{name:model_name}/versions/{version}/ready", summary="model readiness, one version")
async def model_ready(name: str, store: StoreDep, version: str | None = None) -> Response:
    versioned(store, name, version)
    return Response(status_code=200)


def versioned(store, name: str, version: str | None) -> LoadedModel:
    model = find_model(store, name)
    if version is not None and version != model.manifest.version:
        message = f"{name} version {version!r} is not served (serving {model.manifest.version!r})"
        raise ApiError(404, "unknown_version", message)
    return model


# ------------------------------------------------------------------------------------------- infer


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    input_name: str
    tensor: Any  # list[bytes] for ``image``; np.ndarray [N, C, H, W] for ``pixels``
    outputs: dict[str, bool]  # requested output -> in binary
    threshold: float | None


@v2.post("/models/{name:model_name}/infer", summary="score images (BYTES) or model inputs (FP32)")
@v2.post("/models/{name:model_name}/versions/{version}/infer", summary="score, one version")
async def infer(
    request: Request,
    name: str,
    store: StoreDep,
    settings: SettingsDep,
    service_metrics: MetricsDep,
    slots: CpuSlotsDep,
    capture: CaptureDep,
    version: str | None = None,
) -> Response:
    with service_metrics.counting(UNKNOWN_MODEL) as count:
        model = versioned(store, name, version)
        count.model = name
        body = await request.body()
        parse = partial(
            parse_infer_request, body, request.headers.get(HEADER_LENGTH), model, settings.max_files
        )
        # a large JSON body takes the loop seconds to parse (20 MiB of numbers: 1.4 s), so not on the loop
        parsed = (
            parse() if len(body) <= INLINE_BYTES else await anyio.to_thread.run_sync(parse, limiter=slots.any)
        )
        tensors = await run_inference(request, model, parsed, settings, slots, capture)
        return infer_response(model, parsed, tensors)


async def run_inference(
    request: Request | None,
    model: LoadedModel,
    parsed: InferRequest,
    settings: Settings,
    slots: CpuSlots,
    capture: CaptureStore | None,
) -> dict[str, Any]:
    """The output tensors of a parsed infer request (REST, or gRPC with ``request`` None): its images
    decoded and limited as ``/v1`` uploads (or its pixels taken as they are), through the batcher,
    judged, counted and offered to capture."""
    check_image_count(len(parsed.tensor), settings.max_files)  # gRPC requests come here unchecked
    if parsed.input_name == "image":
        uploads = [Upload(f"image[{i}]", data) for i, data in enumerate(parsed.tensor)]
        decoded, results, _ = await decode_and_infer(request, model, uploads, settings, slots)
    else:
        uploads = [Upload(f"pixels[{i}]", b"") for i in range(len(parsed.tensor))]
        decoded, results = await infer_inputs(request, model, list(parsed.tensor), settings)
    options = ScoreOptions(threshold=parsed.threshold)
    images = judge(model, uploads, results, decoded, options, settings.heatmap_grid_size)
    observe(model, images, uploads, capture)
    tensors = {
        "score": np.array([i.score for i in images], np.float32),
        "p_value": np.array([i.p_value for i in images], np.float32),
        "verdict": [i.verdict.encode() for i in images],
    }
    if "heatmap" in parsed.outputs:  # the largest output: only when asked for (or all are)
        heat = [within_roi(model, r, size, None)[0] for r, size in zip(results, decoded.sizes)]
        if len({h.shape for h in heat}) > 1:  # a tiled bundle's maps follow each image's size
            shapes = ", ".join(f"{h.shape[1]}×{h.shape[0]}" for h in heat)
            message = f"heatmaps of {shapes}: one tensor needs images of one size (or one per request)"
            raise ApiError(400, "mixed_sizes", message)
        tensors["heatmap"] = np.stack(heat)[:, None].astype(np.float32)
    return tensors


# What a malformed body raises on its way through ``json`` and the lookups below (a wrong type anywhere, a
# number no float holds, nesting past the recursion limit): always the client's mistake, so a 400.
MALFORMED = (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError)


def parse_infer_request(
    body: bytes, header_length: str | None, model: LoadedModel, max_files: int
) -> InferRequest:
    """The JSON header and, after it, the binary tensors (``binary_data_size``) of an infer request."""
    try:
        return _parse_infer_request(body, header_length, model, max_files)
    except MALFORMED as exc:
        raise ApiError(400, "bad_request", f"not an inference request: {shortened(str(exc), 200)}") from None


def _parse_infer_request(
    body: bytes, header_length: str | None, model: LoadedModel, max_files: int
) -> InferRequest:
    split = len(body) if header_length is None else int(header_length)
    if not 0 <= split <= len(body):
        raise ValueError(f"{HEADER_LENGTH} {split} outside the body's {len(body)} bytes")
    header = json.loads(body[:split])
    inputs = header["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise ValueError("send exactly one input: 'image' (BYTES, encoded images) or 'pixels' (FP32)")
    (tensor,) = inputs
    name, datatype, shape = tensor["name"], tensor["datatype"], tensor_shape(tensor["shape"])
    if not isinstance(name, str) or INPUTS.get(name) != datatype:
        raise ApiError(400, "bad_input", f"input {name!r} {datatype}: expected image BYTES or pixels FP32")
    if shape:  # before the data is read: a tensor declaring millions of images
        check_image_count(shape[0], max_files)
    binary = body[split:]
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None and int(size) != len(binary):
        raise ApiError(400, "bad_input", f"binary_data_size {size} but {len(binary)} bytes follow the header")
    data = binary if size is not None else tensor.get("data")
    values = image_bytes(data, shape) if name == "image" else pixels(data, shape, model)
    return InferRequest(request_id(header), name, values, requested_outputs(header), threshold_of(header))


def request_id(header: dict[str, Any]) -> str | None:
    """The request's ``id``, which the answer echoes: a string, as the protocol has it (anything else, a
    deeply nested list say, would only fail later, when the scored answer is encoded)."""
    value = header.get("id")
    if value is not None and not isinstance(value, str):
        raise ApiError(400, "bad_input", f"id must be a string, got {type(value).__name__}")
    return value


def check_image_count(count: int, max_files: int) -> None:
    if count > max_files:
        raise ApiError(400, "too_many_files", f"{count} images; the limit is {max_files}")


def shortened(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters: error messages echo client input, which may be huge."""
    return text if len(text) <= limit else f"{text[:limit]}…"


def tensor_shape(value: Any) -> list[int]:
    """A tensor's ``shape``: a list of non-negative JSON integers (not ``1.9``, not ``"1"``)."""
    if not isinstance(value, list) or not all(type(d) is int and 0 <= d < 2**31 for d in value):
        raise ValueError(f"shape must be a list of non-negative integers, got {value!r}")
    return value


def image_bytes(data: bytes | list | None, shape: list[int]) -> list[bytes]:
    """BYTES elements: from binary (each a 4-byte little-endian length, then its bytes) or JSON strings."""
    if len(shape) != 1 or shape[0] < 1:
        raise ApiError(400, "bad_shape", f"image must have shape [N] with N >= 1, got {shape}")
    if isinstance(data, bytes):
        elements, offset = [], 0
        while offset < len(data) and len(elements) <= shape[0]:  # one past N is enough to refuse
            length = struct.unpack_from("<I", data, offset)[0] if offset + 4 <= len(data) else None
            if length is None or offset + 4 + length > len(data):
                raise ApiError(
                    400, "bad_input", f"truncated BYTES tensor: element {len(elements)} ends past it"
                )
            elements.append(data[offset + 4 : offset + 4 + length])
            offset += 4 + length
    elif isinstance(data, list):  # JSON strings cannot hold raw image bytes: base64, as KServe clients send
        try:
            elements = [base64.b64decode(item, validate=True) for item in data]
        except (binascii.Error, TypeError, ValueError):
            raise ApiError(400, "bad_input", "image data in JSON must be base64 strings") from None
    else:
        raise ApiError(400, "bad_input", "image has no data")
    if len(elements) != shape[0]:  # binary elements were each checked to end inside the tensor
        raise ApiError(400, "bad_shape", f"image declares {shape[0]} elements but holds more or fewer")
    return elements


def pixels(data: bytes | list | None, shape: list[int], model: LoadedModel) -> np.ndarray:
    """FP32 [N, C, H, W] in the model's layout: from raw little-endian floats or a flat JSON list."""
    pre = model.preprocessing
    expected = [pre.channels, pre.size, pre.size]
    if len(shape) != 4 or shape[1:] != expected or shape[0] < 1:
        raise ApiError(
            400, "bad_shape", f"pixels must have shape [N, {', '.join(map(str, expected))}], got {shape}"
        )
    try:
        flat = np.frombuffer(data, "<f4") if isinstance(data, bytes) else np.asarray(data, np.float32).ravel()
        array = flat.reshape(shape).astype(np.float32)
    except (ValueError, TypeError) as exc:
        raise ApiError(400, "bad_shape", f"pixels data does not fill shape {shape}: {exc}") from None
    if not np.isfinite(array).all():
        raise ApiError(400, "bad_input", "pixels contain NaN or infinity")
    return array


def requested_outputs(header: dict[str, Any]) -> dict[str, bool]:
    everything_binary = bool((header.get("parameters") or {}).get("binary_data_output", False))
    asked = header.get("outputs")
    if not asked:
        return {name: everything_binary for name in OUTPUTS}
    chosen = {}
    for output in asked:
        name = output.get("name") if isinstance(output, dict) else None
        if name not in OUTPUTS:
            raise ApiError(400, "bad_output", f"unknown output {name!r}; outputs: {', '.join(OUTPUTS)}")
        chosen[name] = bool((output.get("parameters") or {}).get("binary_data", everything_binary))
    return chosen


def threshold_of(header: dict[str, Any]) -> float | None:
    return threshold_value((header.get("parameters") or {}).get("threshold"))


def threshold_value(value: Any) -> float | None:
    """The ``threshold`` request parameter: None, or a finite number."""
    if value is None:
        return None
    number = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):  # an integer of hundreds of digits stays NaN
            number = float(value)
    if not math.isfinite(number):
        shown = shortened(repr(value), 40)
        raise ApiError(400, "bad_parameter", f"parameter threshold must be a finite number, got {shown}")
    return number


def infer_response(model: LoadedModel, request: InferRequest, tensors: dict[str, Any]) -> Response:
    """The JSON header, then every binary output in order (with its length in the header)."""
    outputs, blobs = [], []
    for name, binary in request.outputs.items():
        value = tensors[name]
        datatype = "BYTES" if name == "verdict" else "FP32"
        shape = [len(value)] if datatype == "BYTES" else list(value.shape)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            blob = (
                b"".join(struct.pack("<I", len(v)) + v for v in value)
                if datatype == "BYTES"
                else value.tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = [v.decode() for v in value] if datatype == "BYTES" else value.ravel().tolist()
        outputs.append(entry)
    header = {"model_name": model.name, "model_version": model.manifest.version, "outputs": outputs}
    if request.id is not None:
        header["id"] = request.id
    text = json.dumps(header).encode()
    if not blobs:
        return Response(text, media_type="application/json")
    headers = {HEADER_LENGTH: str(len(text))}
    return Response(text + b"".join(blobs), media_type="application/octet-stream", headers=headers)
