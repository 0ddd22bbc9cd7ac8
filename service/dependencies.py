"""What the routes use, as FastAPI dependencies: settings, model store, metrics, the CPU slots, one
loaded model, and the API key check.

``create_app`` and its lifespan put the shared objects on ``app.state``; routes reach them only through
these providers, so every route states in its signature what it uses (and tests can override any of
them). The providers are ``async`` so that FastAPI calls them on the event loop, not in a worker thread.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

from mnemo.service.capture import CaptureStore
from mnemo.service.decoding import CpuSlots
from mnemo.service.errors import ApiError
from mnemo.service.metrics import ServiceMetrics
from mnemo.service.model_store import LoadedModel, ModelStore
from mnemo.service.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> ModelStore:
    return request.app.state.store


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


async def get_cpu_slots(request: Request) -> CpuSlots:
    """Bound the threads that decode and draw images (made at start-up: they need the running loop)."""
    return request.app.state.cpu_slots


async def get_capture(request: Request) -> CaptureStore | None:
    """The review capture store (MNEMO_CAPTURE_DIR), or None when capture is off."""
    return request.app.state.capture


SettingsDep = Annotated[Settings, Depends(get_settings)]
CaptureDep = Annotated[CaptureStore | None, Depends(get_capture)]
StoreDep = Annotated[ModelStore, Depends(get_store)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
CpuSlotsDep = Annotated[CpuSlots, Depends(get_cpu_slots)]


def find_model(store: ModelStore, name: str) -> LoadedModel:
    """The model served as ``name``, or a 404 that lists the loaded names."""
    model = store.get(name)
    if model is None:
        known = ", ".join(sorted(store.models)) or "none loaded"
        raise ApiError(404, "unknown_model", f"no model named {name!r} (loaded: {known})")
    return model


async def loaded_model(name: str, store: StoreDep) -> LoadedModel:
    return find_model(store, name)


ModelDep = Annotated[LoadedModel, Depends(loaded_model)]


def api_key_check(settings: Settings) -> Callable[..., Awaitable[None]]:
    """A dependency enforcing the configured API key (``create_app`` adds it only when a key is set, so
    the OpenAPI document declares the security scheme exactly when the server enforces it).

    Built from the settings rather than injected: the header's name must be known when routes are added.
    """
    if settings.api_key is None:
        raise ValueError("no API key is configured")
    header = APIKeyHeader(name=settings.api_key_header, auto_error=False)
    expected = settings.api_key.get_secret_value().encode()

    async def check(key: str | None = Depends(header)) -> None:  # not Annotated: `header` is a local
        if not (key and secrets.compare_digest(key.encode(), expected)):
            raise ApiError(
                401, "unauthorized", f"missing or wrong API key in the {settings.api_key_header} header"
            )

    return check
