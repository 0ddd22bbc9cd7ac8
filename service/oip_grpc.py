"""The Open Inference Protocol (KServe V2) over gRPC, beside the REST routes (issue 15).

``MNEMO_GRPC_PORT`` (``mnemo serve --grpc-port``) starts a ``grpc.aio`` server in the service's own event
loop, on the same host, serving ``inference.GRPCInferenceService`` from the same model store, batcher,
limits, metrics and capture as ``/v1`` and ``/v2``: ServerLive, ServerReady, ModelReady, ServerMetadata,
ModelMetadata and ModelInfer, which takes what the REST route takes (``image`` BYTES, ``pixels`` FP32;
typed ``contents`` or ``raw_input_contents``; parameter ``threshold``) and answers every output in
``raw_output_contents``, as Triton does. Errors are gRPC status codes with the REST error's message
(400 → INVALID_ARGUMENT, 404 → NOT_FOUND, 503 → UNAVAILABLE, 504 → DEADLINE_EXCEEDED, …). With
``MNEMO_API_KEY`` set, every call but the health and server-metadata ones needs the key in the metadata
entry named like ``MNEMO_API_KEY_HEADER`` (lower-cased, as gRPC sends it).

The messages come from ``protocol/grpc_predict_v2.pb``, the compiled descriptor of
``protocol/grpc_predict_v2.proto``, through protobuf's runtime message factory: no generated code, so
any protobuf 5+ runtime works. ``grpcio`` is an optional dependency (``pip install mnemo[grpc]``).
"""

from __future__ import annotations

import hmac
import logging
import struct
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from starlette.datastructures import State

from mnemo import __version__
from mnemo.service.errors import ApiError
from mnemo.service.oip import (
    OUTPUTS,
    InferRequest,
    image_bytes,
    metadata_of,
    pixels,
    run_inference,
    threshold_value,
    versioned,
)
from mnemo.service.routes import UNKNOWN_MODEL
from mnemo.service.settings import Settings

logger = logging.getLogger("mnemo.service")
DESCRIPTOR_FILE = Path(__file__).parent / "protocol" / "grpc_predict_v2.pb"
SERVICE = "inference.GRPCInferenceService"
CALLS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")
OPEN_CALLS = {"ServerLive", "ServerReady", "ServerMetadata"}  # probes, like /healthz and /v2/health/*


@cache
def messages() -> dict[str, type]:
    """The protocol's message classes by name, built from the compiled descriptor."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_FILE.read_bytes())
    pool = descriptor_pool.DescriptorPool()  # its own pool: no clash with a client's copy of the proto
    for file in files.file:
        pool.Add(file)
    described = pool.FindFileByName(files.file[0].name)
    return {name: message_factory.GetMessageClass(d) for name, d in described.message_types_by_name.items()}


def status_of(http_status: int):
    """The gRPC status code for a REST error status."""
    import grpc

    codes = {
        400: grpc.StatusCode.INVALID_ARGUMENT,
        401: grpc.StatusCode.UNAUTHENTICATED,
        404: grpc.StatusCode.NOT_FOUND,
        413: grpc.StatusCode.RESOURCE_EXHAUSTED,
        499: grpc.StatusCode.CANCELLED,
        503: grpc.StatusCode.UNAVAILABLE,
        504: grpc.StatusCode.DEADLINE_EXCEEDED,
    }
    return codes.get(http_status, grpc.StatusCode.INTERNAL)


class InferenceService:
    """The six calls, each ``async (request, context) -> response``; ``state`` is the app's."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.m = messages()

    async def ServerLive(self, request, context):
        return self.m["ServerLiveResponse"](live=True)

    async def ServerReady(self, request, context):
        return self.m["ServerReadyResponse"](ready=self.state.store.ready)

    async def ServerMetadata(self, request, context):
        return self.m["ServerMetadataResponse"](name="mnemo", version=__version__, extensions=[])

    async def ModelReady(self, request, context):
        try:
            versioned(self.state.store, request.name, request.version or None)
        except ApiError:
            return self.m["ModelReadyResponse"](ready=False)
        return self.m["ModelReadyResponse"](ready=True)

    async def ModelMetadata(self, request, context):
        meta = metadata_of(versioned(self.state.store, request.name, request.version or None))
        response = self.m["ModelMetadataResponse"]
        tensor = response.TensorMetadata
        return response(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(self, request, context):
        state, settings = self.state, self.state.settings
        with state.metrics.counting(UNKNOWN_MODEL) as count:
            model = versioned(state.store, request.model_name, request.model_version or None)
            count.model = model.name
            parsed = parse_infer(request, model)
            tensors = await run_inference(None, model, parsed, settings, state.cpu_slots, state.capture)
            return infer_response(self.m["ModelInferResponse"], model, parsed, tensors)


def parse_infer(request, model) -> InferRequest:
    """A ``ModelInferRequest`` as the REST route's ``InferRequest``: one input, its data typed or raw."""
    if len(request.inputs) != 1:
        raise ApiError(400, "bad_request", "send exactly one input: 'image' (BYTES) or 'pixels' (FP32)")
    (tensor,) = request.inputs
    expected = {"image": "BYTES", "pixels": "FP32"}.get(tensor.name)
    if expected != tensor.datatype:
        raise ApiError(
            400, "bad_input", f"input {tensor.name!r} {tensor.datatype}: expected image BYTES or pixels FP32"
        )
    shape = [int(d) for d in tensor.shape]
    raw = _raw_contents(request, tensor)
    if tensor.name == "image":
        values = _bytes_elements(raw, list(tensor.contents.bytes_contents), shape)
    else:
        values = pixels(raw if raw is not None else list(tensor.contents.fp32_contents), shape, model)
    asked = [o.name for o in request.outputs]
    unknown = sorted(set(asked) - set(OUTPUTS))
    if unknown:
        raise ApiError(400, "bad_output", f"unknown output(s) {unknown}; outputs: {', '.join(OUTPUTS)}")
    outputs = {name: True for name in (asked or OUTPUTS)}
    return InferRequest(request.id or None, tensor.name, values, outputs, threshold_of(request.parameters))


def _raw_contents(request, tensor) -> bytes | None:
    """The input's raw bytes, when it has them: one entry, and then no typed contents beside it (the
    protocol allows one or the other; taking either silently would score what the client did not mean)."""
    raw = list(request.raw_input_contents)
    if len(raw) > 1:
        raise ApiError(400, "bad_input", f"{len(raw)} raw_input_contents for one input")
    typed = tensor.contents.bytes_contents or tensor.contents.fp32_contents
    if raw and len(typed):
        raise ApiError(400, "bad_input", "an input's data is either raw_input_contents or contents, not both")
    return raw[0] if raw else None


def threshold_of(parameters) -> float | None:
    """The ``threshold`` request parameter, whichever of the protocol's types it came as."""
    if "threshold" not in parameters:
        return None
    parameter = parameters["threshold"]
    kind = parameter.WhichOneof("parameter_choice")
    return threshold_value(None if kind is None else getattr(parameter, kind))


def _bytes_elements(raw: bytes | None, typed: list[bytes], shape: list[int]) -> list[bytes]:
    """BYTES elements from raw contents (4-byte little-endian lengths, read as the REST route reads its
    binary tensors) or typed ``bytes_contents``."""
    if raw is not None:
        return image_bytes(raw, shape)
    if len(shape) != 1 or shape[0] < 1:
        raise ApiError(400, "bad_shape", f"image must have shape [N] with N >= 1, got {shape}")
    if len(typed) != shape[0]:
        raise ApiError(400, "bad_shape", f"image declares {shape[0]} elements but holds {len(typed)}")
    return typed


def infer_response(response_type, model, parsed: InferRequest, tensors: dict[str, Any]):
    """Every requested output as ``raw_output_contents``, in order."""
    response = response_type(model_name=model.name, model_version=model.manifest.version, id=parsed.id or "")
    for name in parsed.outputs:
        value = tensors[name]
        if name == "verdict":
            response.outputs.add(name=name, datatype="BYTES", shape=[len(value)])
            response.raw_output_contents.append(b"".join(struct.pack("<I", len(v)) + v for v in value))
        else:
            array = np.ascontiguousarray(value, "<f4")
            response.outputs.add(name=name, datatype="FP32", shape=list(array.shape))
            response.raw_output_contents.append(array.tobytes())
    return response


def _handlers(service: InferenceService, settings: Settings):
    """One generic handler for the service's calls: request parsing, the API key, errors as statuses."""
    import grpc

    m = messages()
    key = None if settings.api_key is None else settings.api_key.get_secret_value().encode()
    header = settings.api_key_header.lower()

    def wrap(name: str):
        call = getattr(service, name)

        async def handle(request, context):
            try:
                if key is not None and name not in OPEN_CALLS:
                    sent = dict(context.invocation_metadata() or ()).get(header, "")
                    if not hmac.compare_digest(str(sent).encode(), key):
                        raise ApiError(
                            401, "unauthorized", f"missing or wrong API key in the {header} metadata"
                        )
                return await call(request, context)
            except ApiError as exc:
                await context.abort(status_of(exc.status), exc.message)

        return grpc.unary_unary_rpc_method_handler(
            handle,
            request_deserializer=m[f"{name}Request"].FromString,
            response_serializer=m[f"{name}Response"].SerializeToString,
        )

    return grpc.method_handlers_generic_handler(SERVICE, {name: wrap(name) for name in CALLS})


async def start_server(state: State, settings: Settings):
    """A started ``grpc.aio`` server on ``settings.host:settings.grpc_port``; ``stop`` it at shutdown."""
    try:
        import grpc
    except ImportError:
        raise RuntimeError("MNEMO_GRPC_PORT needs grpcio: pip install 'mnemo[grpc]'") from None
    limit = settings.max_upload_bytes
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", 4 * limit)]
    )
    server.add_generic_rpc_handlers((_handlers(InferenceService(state), settings),))
    address = f"{settings.host}:{settings.grpc_port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"gRPC could not listen on {address}")
    await server.start()
    logger.info("Open Inference Protocol over gRPC on %s", address)
    return server
