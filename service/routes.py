"""The HTTP routes: the upload page, probes and metrics at the root; the model API under ``/v1``.

``create_app`` puts ``/v1`` behind the API key check when a key is configured. Routes take what they use
as dependencies (``service/dependencies.py``); a score request itself is ``scoring.score_request``.
A model name in a path never contains ``:`` (``model_store.NAME_PATTERN``), so ``GET`` or ``OPTIONS`` on
``/v1/models/NAME:score`` reaches the score route and is answered 405 with ``Allow: POST`` rather than
being read as a model called ``NAME:score``.
"""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse
from prometheus_client.exposition import choose_encoder
from starlette.convertors import StringConvertor, register_url_convertor

from mnemo.service.dependencies import (
    MetricsDep,
    ModelDep,
    SettingsDep,
    StoreDep,
    find_model,
    parse_query,
    query_parameters,
)
from mnemo.service.schemas import (
    ErrorResponse,
    Health,
    ModelInfo,
    ModelList,
    Readiness,
    ReloadResult,
    ScoreResponse,
)
from mnemo.service.scoring import ScoreOptions, score_request
from mnemo.service.workers import request_rolling_restart

INDEX_HTML = Path(__file__).parent / "static" / "index.html"
UNKNOWN_MODEL = "_unknown"  # metrics label for unknown names, so clients cannot grow label sets at will
ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 422, 500, 503, 504)}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "one or several images as multipart file parts (any field name), or one raw image",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string", "format": "binary"},
                        }
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


MODEL_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}


class ModelNameConvertor(StringConvertor):
    """A path segment without ``:``: what ``model_store.NAME_PATTERN`` allows, and never ``NAME:score``."""

    regex = "[^/:]+"


register_url_convertor("model_name", ModelNameConvertor())
ops = APIRouter()
v1 = APIRouter(prefix="/v1")  # create_app adds the API key check and its 401 when a key is configured


# ------------------------------------------------------------------------------------------ operations


@ops.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index(settings: SettingsDep) -> HTMLResponse:
    return HTMLResponse(index_page(settings.api_key_header))


@cache
def index_page(api_key_header: str) -> str:
    """The upload page, told which header carries the API key."""
    return INDEX_HTML.read_text().replace("{{API_KEY_HEADER}}", html.escape(api_key_header))


# GET and HEAD: load balancers' health checks use either (HEAD: the same status, no body)
@ops.api_route(
    "/healthz", methods=["GET", "HEAD"], response_model=Health, summary="liveness: the process answers"
)
async def healthz() -> Health:
    return Health()


@ops.api_route(
    "/readyz",
    methods=["GET", "HEAD"],
    response_model=Readiness,
    responses={503: {"model": Readiness}},
    summary="readiness: the bundles are loaded and warmed (all of them, or any, per MNEMO_READY_REQUIRES)",
)
async def readyz(response: Response, store: StoreDep) -> Readiness:
    ready = store.ready
    response.status_code = 200 if ready else 503
    return Readiness(
        ready=ready,
        requires=store.settings.ready_requires,
        models=sorted(store.models),
        failed=store.last_report.failed,
    )


@ops.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request, service_metrics: MetricsDep) -> Response:
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(service_metrics.exposition_registry()), media_type=content_type)


# ------------------------------------------------------------------------------------------------- /v1


# The score route first: routes are matched in order, and this one takes nearly every request.
@v1.post(
    "/models/{name:model_name}:score",
    response_model=ScoreResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
    openapi_extra={**UPLOAD_BODY, "parameters": [MODEL_NAME, *query_parameters(ScoreOptions)]},
    summary="score images: anomaly score, p-value, verdict and optional heatmap per image",
)
async def score(request: Request) -> Response:
    # Lean on purpose (issue 17): the query string is validated by pydantic-core in one call and the
    # service's parts come from app.state, so FastAPI solves no dependencies per request; the answer is
    # serialised once, straight to JSON bytes (returning the model would have FastAPI validate it again
    # and encode it with the standard library). Counted by model and status; the model is looked up
    # here, after the query, so an unknown name is counted too and a bad query answers 422 first.
    # (No docstring: FastAPI would publish it as the operation's description.)
    state = request.app.state
    with state.metrics.counting(UNKNOWN_MODEL) as count:
        options = parse_query(ScoreOptions, request)
        name = request.path_params["name"]
        model = find_model(state.store, name)
        count.model = name
        answer = await score_request(
            request, model, options, state.settings, state.cpu_slots, count.started, state.capture
        )
        return Response(answer.model_dump_json(exclude_none=True), media_type="application/json")


@v1.get("/models", response_model=ModelList, summary="the loaded models, and the bundles that failed to load")
async def list_models(store: StoreDep) -> ModelList:
    return ModelList(
        models=[store.models[name].info() for name in sorted(store.models)], failed=store.last_report.failed
    )


@v1.get("/models/{name:model_name}", response_model=ModelInfo, responses=ERRORS, summary="one loaded model")
async def get_model(model: ModelDep) -> ModelInfo:
    return model.info()


@v1.post("/admin/reload", response_model=ReloadResult, summary="re-scan the model directory")
async def reload_models(store: StoreDep) -> ReloadResult:
    report = await store.reload()
    request_rolling_restart(report)  # with several workers, all are replaced and load the same directory
    return ReloadResult(**vars(report))
