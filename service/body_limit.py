"""ASGI middleware that caps request bodies, so an upload can never grow memory past ``max_bytes``.

A declared ``Content-Length`` over the cap is answered 413 before anything is read; a chunked body is
counted as it streams and cut off at the cap with ``BodyTooLargeError`` (turned into the same 413 by the
app's error handler). The pattern is Starlette's pure-ASGI middleware (wrap ``receive``).
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mnemo.service.errors import ApiError, error_response


class BodyTooLargeError(ApiError):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, "payload_too_large", f"request body exceeds the {max_bytes}-byte limit")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Callable[[], None] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject  # counts early rejections (the streaming ones pass the error handler)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if self.on_reject is not None:
                self.on_reject()
            # Kept alive on purpose: the server reads the declared body and drops it, so the client, still
            # sending, reads the 413; closing at once made the kernel reset the connection under it.
            refused = BodyTooLargeError(self.max_bytes)
            await error_response(refused, Request(scope))(scope, receive, send)  # /v2: the protocol's shape
            return
        await self.app(scope, self._counting(receive), send)

    def _counting(self, receive: Receive) -> Receive:
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        return wrapped
