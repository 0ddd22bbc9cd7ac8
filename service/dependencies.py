"""What the routes use, as FastAPI dependencies: settings, model store, metrics, the CPU slots, one
loaded model, and the API key check.

``create_app`` and its lifespan put the shared objects on ``app.state``; routes reach them only through
these providers, so every route states in its signature what it uses (and tests can override any of
them). The providers are ``async`` so that FastAPI calls them on the event loop, not in a worker thread.
The one exception is the hot scoring route, which reads ``app.state`` itself and validates its query with
``parse_query`` in one pydantic-core call: solving its five dependencies and six query parameters took
FastAPI about as long as the route's own work (issue 17).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ValidationError

from mnemo.service.capture import CaptureStore
from mnemo.service.decoding import CpuSlots
from mnemo.service.errors import ApiError, validation_problems
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


def api_key_guard(settings: Settings) -> Callable[[str | None], None]:
    """``guard(key)`` raises the 401 unless ``key`` is the configured API key (compared in constant time)."""
    if settings.api_key is None:
        raise ValueError("no API key is configured")
    expected = settings.api_key.get_secret_value().encode()

    def guard(key: str | None) -> None:
        if not (key and secrets.compare_digest(key.encode(), expected)):
            raise ApiError(
                401, "unauthorized", f"missing or wrong API key in the {settings.api_key_header} header"
            )

    return guard


def api_key_check(settings: Settings) -> Callable[..., Awaitable[None]]:
    """A dependency enforcing the configured API key (``create_app`` adds it only when a key is set, so
    the OpenAPI document declares the security scheme exactly when the server enforces it).

    Built from the settings rather than injected: the header's name must be known when routes are added.
    """
    guard = api_key_guard(settings)
    header = APIKeyHeader(name=settings.api_key_header, auto_error=False)

    async def check(key: str | None = Depends(header)) -> None:  # not Annotated: `header` is a local
        guard(key)

    return check


Query = TypeVar("Query", bound=BaseModel)


def parse_query(model: type[Query], request: Request) -> Query:
    """The request's query string as ``model``; a bad value is 422 ``invalid_parameter``, worded as
    FastAPI words its own validation errors."""
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise ApiError(422, "invalid_parameter", validation_problems(exc.errors(), ("query",))) from None


def query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """OpenAPI query parameters for ``model``'s fields (what ``parse_query`` accepts)."""
    schema = model.model_json_schema()
    return [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": field.pop("description", ""),
            "schema": field,
        }
        for name, field in schema["properties"].items()
    ]
