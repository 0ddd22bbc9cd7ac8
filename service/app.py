"""The FastAPI application: ``create_app(settings)`` wires registry, batchers, metrics, auth and routes.

Models load in the background at start-up, so ``/healthz`` answers at once while ``/readyz`` stays 503
until every bundle is loaded and warmed. Routes reach the shared objects through ``request.app.state``.
"""

from __future__ import annotations

import asyncio
import html
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.security import APIKeyHeader
from prometheus_client.exposition import choose_encoder
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from mnemo import __version__
from mnemo.service.batching import BatcherClosedError, BatchFailedError, ImageResult, QueueFullError
from mnemo.service.body_limit import BodyLimitMiddleware
from mnemo.service.errors import ApiError, install_error_handlers
from mnemo.service.metrics import ServiceMetrics
from mnemo.service.model_store import LoadedModel, ModelStore
from mnemo.service.schemas import (
    ErrorResponse,
    Health,
    HeatmapFormat,
    ModelInfo,
    ModelList,
    Readiness,
    ReloadResult,
    ScoreResponse,
    Timings,
)
from mnemo.service.scoring import Decoded, Upload, decode_uploads, judge
from mnemo.service.settings import Settings

logger = logging.getLogger("mnemo.service")
INDEX_HTML = Path(__file__).parent / "static" / "index.html"
UNKNOWN_MODEL = "_unknown"  # metrics label for unknown names, so clients cannot grow label sets at will
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 500, 503, 504)}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "one or several images as multipart file parts (any field name), or one raw image",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

ops = APIRouter()
v1 = APIRouter(prefix="/v1", responses={401: {"model": ErrorResponse}})


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = ServiceMetrics()
    registry = ModelStore(settings, metrics)
    app = FastAPI(
        title="Mnemo",
        version=__version__,
        description="Anomaly scores, heatmaps and verdicts for inspection images.",
        lifespan=_lifespan,
    )
    app.state.settings, app.state.metrics, app.state.registry = settings, metrics, registry
    app.state.loaded = False
    app.state.index_html = INDEX_HTML.read_text().replace(
        "{{API_KEY_HEADER}}", html.escape(settings.api_key_header)
    )
    install_error_handlers(app, metrics)
    too_large = metrics.errors.labels("payload_too_large")
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes, on_reject=too_large.inc)
    app.include_router(ops)
    app.include_router(v1, dependencies=[Depends(_api_key_check(settings))])
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.cpu_limiter = anyio.CapacityLimiter(app.state.settings.decode_concurrency)
    loading = asyncio.create_task(_initial_load(app))
    try:
        yield
    finally:
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
        await app.state.registry.close()


async def _initial_load(app: FastAPI) -> None:
    report = await app.state.registry.reload()
    app.state.loaded = True
    app.state.metrics.ready.set(_is_ready(app))
    logger.info("ready: %d model(s) loaded, %d bundle(s) refused", len(report.loaded), len(report.failed))


def _is_ready(app: FastAPI) -> bool:
    return app.state.loaded and bool(app.state.registry.models)


def _api_key_check(settings: Settings) -> Callable:
    """A dependency enforcing the API key when one is configured (also declared in the OpenAPI document)."""
    header = APIKeyHeader(name=settings.api_key_header, auto_error=False)
    expected = settings.api_key.get_secret_value().encode() if settings.api_key else None

    async def check(key: str | None = Depends(header)) -> None:
        if expected is not None and not (key and secrets.compare_digest(key.encode(), expected)):
            raise ApiError(
                401, "unauthorized", f"missing or wrong API key in the {settings.api_key_header} header"
            )

    return check


# ------------------------------------------------------------------------------------------ operations


@ops.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.index_html)


@ops.get("/healthz", response_model=Health, summary="liveness: the process answers")
async def healthz() -> Health:
    return Health()


@ops.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}}, summary="models loaded")
async def readyz(request: Request, response: Response) -> Readiness:
    ready = _is_ready(request.app)
    response.status_code = 200 if ready else 503
    registry = request.app.state.registry
    return Readiness(ready=ready, models=sorted(registry.models), failed=registry.last_report.failed)


@ops.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(request.app.state.metrics.registry), media_type=content_type)


# ------------------------------------------------------------------------------------------------- /v1


@v1.get("/models", response_model=ModelList, summary="the loaded models")
async def list_models(request: Request) -> ModelList:
    models = request.app.state.registry.models
    return ModelList(models=[models[name].info() for name in sorted(models)])


@v1.get("/models/{name}", response_model=ModelInfo, responses=ERRORS, summary="one loaded model")
async def get_model(request: Request, name: str) -> ModelInfo:
    return _model(request, name).info()


@v1.post("/admin/reload", response_model=ReloadResult, summary="re-scan the model directory")
async def reload_models(request: Request) -> ReloadResult:
    report = await request.app.state.registry.reload()
    request.app.state.metrics.ready.set(_is_ready(request.app))
    return ReloadResult(**vars(report))


@v1.post(
    "/models/{name}:score",
    response_model=ScoreResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
    openapi_extra=UPLOAD_BODY,
    summary="score images: anomaly score, p-value, verdict and optional heatmap per image",
)
async def score(
    request: Request,
    name: str,
    heatmap: Annotated[
        HeatmapFormat, Query(description="overlay/gray: base64 PNG; grid: float grid")
    ] = "none",
    threshold: Annotated[
        float | None, Query(description="override the model's threshold", allow_inf_nan=False)
    ] = None,
) -> ScoreResponse:
    started = time.perf_counter()
    metrics = request.app.state.metrics
    label, status = UNKNOWN_MODEL, 500
    try:
        model = _model(request, name)
        label = name
        response = await _score(request, model, heatmap, threshold, started)
        status = 200
        return response
    except ApiError as exc:
        status = exc.status
        raise
    finally:
        metrics.requests.labels(label, str(status)).inc()
        metrics.request_seconds.labels(label).observe(time.perf_counter() - started)


async def _score(
    request: Request, model: LoadedModel, heatmap: HeatmapFormat, threshold: float | None, started: float
) -> ScoreResponse:
    settings: Settings = request.app.state.settings
    uploads = await _read_uploads(request, settings.max_files)
    limiter = request.app.state.cpu_limiter  # decoding and drawing share a bounded set of threads
    decode = partial(decode_uploads, uploads, model, settings.max_image_pixels, heatmap == "overlay")
    decoded = await anyio.to_thread.run_sync(decode, limiter=limiter)
    decoded_at = time.perf_counter()
    results = await _infer(model, decoded, settings)
    limit = model.threshold if threshold is None else threshold
    draw = partial(judge, model, uploads, results, decoded, limit, heatmap, settings.heatmap_grid_size)
    images = (
        await anyio.to_thread.run_sync(draw, limiter=limiter) if heatmap in ("overlay", "gray") else draw()
    )
    for image in images:
        model.metrics.observe_image(image.score, image.p_value, image.verdict)
    timings = Timings(
        decode_ms=1000 * (decoded_at - started),
        queue_ms=1000 * max(r.queue_s for r in results),
        inference_ms=1000 * max(r.inference_s for r in results),
        total_ms=1000 * (time.perf_counter() - started),
    )
    return ScoreResponse(
        model={"name": model.name, "version": model.manifest.version}, results=images, timings_ms=timings
    )


async def _infer(model: LoadedModel, decoded: Decoded, settings: Settings) -> list[ImageResult]:
    try:
        return await asyncio.wait_for(model.batcher.submit(decoded.inputs), settings.request_timeout_s)
    except QueueFullError as exc:
        headers = {"Retry-After": str(settings.retry_after_s)}
        raise ApiError(503, "queue_full", f"{model.name} is busy: {exc}", headers=headers) from None
    except TimeoutError:
        message = f"no result within {settings.request_timeout_s:g} s"
        raise ApiError(504, "timeout", message) from None
    except BatchFailedError as exc:
        logger.error("inference failed for %s: %s", model.name, exc)
        raise ApiError(500, "inference_failed", f"inference failed for this batch: {exc}") from None
    except BatcherClosedError as exc:
        raise ApiError(503, "model_unloaded", str(exc), headers={"Retry-After": "1"}) from None


async def _read_uploads(request: Request, max_files: int) -> list[Upload]:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media.startswith("image/"):
        return [Upload(None, await request.body())]
    if media != "multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"got {media or 'no content type'}; send multipart/form-data or image/*",
        )
    try:
        form = await request.form(max_files=max_files, max_fields=32)
    except HTTPException as exc:  # Starlette reports multipart limits and syntax errors this way
        code = "too_many_files" if "Too many files" in str(exc.detail) else "bad_multipart"
        raise ApiError(400, code, str(exc.detail)) from None
    try:
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not files:
            raise ApiError(400, "no_image", "the multipart body has no file part")
        return [Upload(f.filename, await f.read()) for f in files]
    finally:
        await form.close()


def _model(request: Request, name: str) -> LoadedModel:
    model = request.app.state.registry.get(name)
    if model is None:
        known = ", ".join(sorted(request.app.state.registry.models)) or "none loaded"
        raise ApiError(404, "unknown_model", f"no model named {name!r} (loaded: {known})")
    return model
