"""One JSON error shape for every failure: ``{"error": {"code": ..., "message": ..., "file": ...}}``.

Clients on the line branch on ``code`` (stable, snake_case); ``message`` is for people. FastAPI's own
``{"detail": ...}`` errors (404 route, 405, validation) are rewritten into the same shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from mnemo.service.metrics import ServiceMetrics

HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        file: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.file, self.headers = status, code, message, file, headers


def validation_problems(errors: list[dict[str, Any]], where: tuple[str, ...] = ()) -> str:
    """Pydantic's errors in one line: ``query.heatmap: Input should be ...; ...``."""
    return "; ".join(f"{'.'.join(map(str, (*where, *e['loc'])))}: {e['msg']}" for e in errors)


def error_response(error: ApiError, request: Request | None = None) -> JSONResponse:
    """The service's error shape; under ``/v2`` the Open Inference Protocol's, ``{"error": message}``."""
    if request is not None and request.url.path.startswith("/v2"):
        return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)
    body = {"code": error.code, "message": error.message}
    if error.file is not None:
        body["file"] = error.file
    return JSONResponse({"error": body}, status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI, metrics: ServiceMetrics) -> None:
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics.errors.labels(exc.code).inc()
        return error_response(exc, request)

    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(ApiError(exc.status_code, code, str(exc.detail), headers=exc.headers), request)

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.errors.labels("invalid_parameter").inc()
        return error_response(ApiError(422, "invalid_parameter", validation_problems(exc.errors())), request)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        metrics.errors.labels("internal").inc()  # Starlette still logs the traceback
        return error_response(
            ApiError(500, "internal_error", f"unexpected {type(exc).__name__}; see server log"), request
        )

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(Exception, on_unexpected)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
