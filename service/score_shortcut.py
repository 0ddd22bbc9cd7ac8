"""The score route's way past the framework: nearly every request is ``POST /v1/models/NAME:score``.

Through FastAPI such a request passes seven ASGI layers (server errors, telemetry, two body limits,
exception handlers, an exit stack, the router's match against every route) before ``routes.score`` runs,
and its answer goes back through a ``send`` wrapper per layer: 0.18 of the event loop's 0.87 ms per
request (brick bundle, c=8 and 32, event-loop thread CPU; issue 17). ``ScoreShortcut`` sits outside the
app and hands exactly these requests to the same ``routes.score``, behind the app's own middleware (the
body limit), the same API key check and the app's exception handlers, so the answer is the app's byte for
byte; every other request (another method on the same path included) goes through the app unchanged, and
the OpenAPI document still lists the route. ``server_config`` serves every app through it.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from mnemo.service.dependencies import api_key_guard
from mnemo.service.routes import ModelNameConvertor, score

SCORE_PATH = re.compile(rf"/v1/models/({ModelNameConvertor.regex}):score")


class ScoreShortcut:
    """An ASGI app: score requests straight to ``routes.score``, everything else to ``app``."""

    def __init__(self, app: FastAPI) -> None:
        settings = app.state.settings
        self.app = app
        self.guard: Callable[[str | None], None] | None = None
        if settings.api_key is not None:
            self.guard, self.key_header = api_key_guard(settings), settings.api_key_header
        self.limited: ASGIApp = self._score  # inside the app's own middleware (the body limit), as built
        for cls, args, kwargs in reversed(app.user_middleware):
            self.limited = cls(self.limited, *args, **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            match = SCORE_PATH.fullmatch(scope["path"])
            if match is not None:
                scope["app"], scope["path_params"] = self.app, {"name": match[1]}
                await self.limited(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _score(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        try:
            if self.guard is not None:
                self.guard(request.headers.get(self.key_header))
            response = await score(request)
        except Exception as exc:
            handler = self._handler(exc)
            await (await handler(request, exc))(scope, receive, send)
            if handler is self.app.exception_handlers.get(Exception):
                raise  # as Starlette's ServerErrorMiddleware does: answered 500, then the server logs it
            return
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Callable[[Request, Exception], Awaitable[Response]]:
        """The app's handler for ``exc``: the most specific registered class, as Starlette looks it up."""
        handlers = self.app.exception_handlers
        return next(handlers[kind] for kind in type(exc).__mro__ if kind in handlers)
