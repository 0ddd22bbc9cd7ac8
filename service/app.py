"""The FastAPI application: ``create_app(settings)`` wires the model store, metrics, auth and routes.

Models load in the background at start-up, so ``/healthz`` answers at once while ``/readyz`` stays 503
until every bundle is loaded and warmed (or, with ``MNEMO_READY_REQUIRES=any``, one of them). The routes
are in ``service/routes.py``; they reach the objects made here through ``service/dependencies.py``. The
API key check, and with it the security scheme and the 401 answers in the OpenAPI document, exist only
when a key is configured. The server around the app (connection limits) is ``service/server.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from PIL import ImageFile

from mnemo import __version__
from mnemo.service.body_limit import BodyLimitMiddleware
from mnemo.service.capture import CaptureStore
from mnemo.service.decoding import CpuSlots
from mnemo.service.dependencies import api_key_check
from mnemo.service.errors import install_error_handlers
from mnemo.service.metrics import ServiceMetrics
from mnemo.service.model_store import ModelStore
from mnemo.service.oip import v2, v2_health
from mnemo.service.oip_grpc import start_server as start_grpc
from mnemo.service.routes import ops, v1
from mnemo.service.schemas import ErrorResponse
from mnemo.service.settings import Settings

logger = logging.getLogger("mnemo.service")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = ServiceMetrics()
    app = FastAPI(
        title="Mnemo",
        version=__version__,
        description="Anomaly scores, heatmaps and verdicts for inspection images.",
        lifespan=_lifespan,
    )
    app.state.settings, app.state.metrics = settings, metrics
    app.state.store = ModelStore(settings, metrics)
    install_error_handlers(app, metrics)
    too_large = metrics.errors.labels("payload_too_large")
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes, on_reject=too_large.inc)
    for router in (v1, v2):  # the API key, when set, guards both protocols
        if settings.api_key is None:
            app.include_router(router)
        else:
            app.include_router(
                router,
                dependencies=[Depends(api_key_check(settings))],
                responses={401: {"model": ErrorResponse}},
            )
    app.include_router(ops)  # after /v1: routes are matched in order, and nearly every request is a score
    app.include_router(v2_health)
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # process-wide; it would score images with missing rows
        logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set; turning it off")
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    app.state.cpu_slots = CpuSlots.create(settings.decode_concurrency)
    app.state.capture = _capture_store(settings, app.state.metrics)
    store: ModelStore = app.state.store
    loading = asyncio.create_task(_initial_load(store))
    grpc_server = None
    try:
        if settings.workers > 1:  # a worker takes connections only once it can score; others serve meanwhile
            await loading
        grpc_server = await start_grpc(app.state, settings) if settings.grpc_port else None
        yield
    finally:
        if grpc_server is not None:  # running calls get the shutdown timeout to finish
            await grpc_server.stop(settings.shutdown_timeout_s)
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
        await store.close()
        if app.state.capture is not None:
            await asyncio.to_thread(app.state.capture.close)
        app.state.metrics.close()


def _capture_store(settings: Settings, metrics: ServiceMetrics) -> CaptureStore | None:
    if settings.capture_dir is None:
        return None
    return CaptureStore(
        settings.capture_dir,
        max_bytes=int(settings.capture_max_mb * 2**20),
        ok_fraction=settings.capture_ok_fraction,
        queue_size=settings.capture_queue,
        on_saved=lambda model, verdict: metrics.captured.labels(model, verdict).inc(),
        on_dropped=lambda reason: metrics.capture_dropped.labels(reason).inc(),
    )


async def _initial_load(store: ModelStore) -> None:
    report = await store.load_at_start()
    logger.info("ready: %d model(s) loaded, %d bundle(s) refused", len(report.loaded), len(report.failed))
