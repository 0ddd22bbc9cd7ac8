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
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse
from prometheus_client.exposition import choose_encoder
from starlette.convertors import StringConvertor, register_url_convertor

from mnemo.service.dependencies import (
    CaptureDep,
    CpuSlotsDep,
    MetricsDep,
    ModelDep,
    SettingsDep,
    StoreDep,
    find_model,
)
from mnemo.service.schemas import (
    ErrorResponse,
    Health,
    HeatmapFormat,
    HeatmapScaleKind,
    ModelInfo,
    ModelList,
    Readiness,
    ReloadResult,
    ScoreResponse,
)
from mnemo.service.scoring import ScoreOptions, score_request

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
        },
    }
}


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


@ops.get("/healthz", response_model=Health, summary="liveness: the process answers")
async def healthz() -> Health:
    return Health()


@ops.get(
    "/readyz",
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
    return Response(encoder(service_metrics.registry), media_type=content_type)


# ------------------------------------------------------------------------------------------------- /v1


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
    return ReloadResult(**vars(await store.reload()))


@v1.post(
    "/models/{name:model_name}:score",
    response_model=ScoreResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
    openapi_extra=UPLOAD_BODY,
    summary="score images: anomaly score, p-value, verdict and optional heatmap per image",
)
async def score(
    request: Request,
    name: str,
    store: StoreDep,
    settings: SettingsDep,
    service_metrics: MetricsDep,
    slots: CpuSlotsDep,
    capture: CaptureDep,
    heatmap: Annotated[
        HeatmapFormat, Query(description="overlay/gray: base64 PNG; grid: float grid")
    ] = "none",
    threshold: Annotated[
        float | None, Query(description="override the model's threshold", allow_inf_nan=False)
    ] = None,
    regions: Annotated[
        bool, Query(description="list the connected areas above the model's calibrated pixel level")
    ] = False,
    reconstruction: Annotated[
        bool, Query(description="return the model's reconstruction: what this part looks like to its memory")
    ] = False,
    roi: Annotated[
        str | None,
        Query(
            description="x,y,width,height in the image's pixels: only that part counts (score = heatmap peak "
            "inside; verdict by the pixel level unless the bundle has its own ROI)",
            pattern=r"^-?\d+,-?\d+,\d+,\d+$",
        ),
    ] = None,
    heatmap_scale: Annotated[
        HeatmapScaleKind,
        Query(
            description="calibrated: one colour scale for every image (default); image: each map's min…max"
        ),
    ] = "calibrated",
) -> ScoreResponse:
    # Counts every request by model and status. The model is looked up here rather than as a dependency,
    # so that an unknown name is counted too (as _unknown) and a bad query still answers 422 first.
    # (No docstring: FastAPI would publish it as the operation's description.)
    with service_metrics.counting(UNKNOWN_MODEL) as count:
        model = find_model(store, name)
        count.model = name
        options = ScoreOptions(heatmap, threshold, regions, reconstruction, heatmap_scale, roi)
        return await score_request(request, model, options, settings, slots, count.started, capture)
