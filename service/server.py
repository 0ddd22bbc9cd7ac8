"""The uvicorn server that ``mnemo serve`` runs, with the connection limits an ASGI app cannot enforce.

uvicorn's httptools protocol parses request headers of any size (a 100 MB header is read, and stalls the
event loop while it is) and has no timer before a request's headers are complete or between body
chunks, so a client that sends part of a request and goes silent holds its connection for ever.
``GuardedHttpToolsProtocol`` adds, per connection:

* ``max_header_bytes``: the request line and headers of each request (pipelined ones each on their own,
  found after a ``Content-Length`` body in the same read too); a longer head is answered 431 (after the
  answers owed to the requests before it) and the connection closed, and the excess never reaches the
  parser;
* an ``Upgrade`` offer (``h2c``, from every JDK HttpClient) is ignored, so the request's body still
  arrives (``_receive_head``);
* ``header_timeout_s``: from connecting, or from the first byte of a later request on a kept-alive
  connection, to the end of the headers; a late head is answered 408 and the connection closed;
* ``max_header_bytes`` again for what a chunked body carries besides its data (trailer fields, chunk
  framing beyond ``CHUNK_FRAMING_BYTES`` a chunk) while the body is still arriving: past it, 431 and the
  connection closed; the read that ends the body is parsed whole (at most 256 KiB). Trailer fields are
  ignored (uvicorn would add any number of them to the request's headers).
  A head pipelined behind a *chunked* body in the same read reaches the parser unguarded: only the parser
  knows where such a body ends; that head is bounded by the read (256 KiB at most);
* ``body_timeout_s``: the longest silence while a request body is expected; then the connection is closed
  and the app sees a disconnect. Time in which the server itself holds the body back (flow control, or a
  ``100-continue`` the app has not asked for yet) does not count.

An HTTP/1.0 request asking for keep-alive keeps its connection (``keep_alive_for_http_1_0``; uvicorn closes
every 1.0 connection, so ApacheBench's ``-k`` measured fresh ones). Idle kept-alive connections close
after ``keep_alive_timeout_s`` (uvicorn's ``timeout_keep_alive``), and on SIGTERM/SIGINT whatever still
runs after ``shutdown_timeout_s`` is cancelled (uvicorn's ``timeout_graceful_shutdown``).
``server_config`` builds the ``uvicorn.Config`` with all of it; the tests serve through it too.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import re
from collections.abc import Callable
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from mnemo.service.settings import Settings

HEAD_END = b"\r\n\r\n"  # llhttp takes CRLF line ends only
UPGRADE_HEADER = re.compile(rb"\r\nupgrade:", re.IGNORECASE)
IGNORED_UPGRADE = b"\r\nx-ignored-upgrade:"
_HELD_PREFIXES = (b"\r\nupgrade:", HEAD_END)
CHUNK_FRAMING_BYTES = 64  # a chunk's size line, its CRLFs and a short extension


def _unfinished_tail(head: bytes) -> int:
    """How many of ``head``'s last bytes could begin an Upgrade header or the head's end."""
    tail = head[-10:].lower()
    for n in range(len(tail), 0, -1):
        if any(prefix.startswith(tail[-n:]) for prefix in _HELD_PREFIXES):
            return n
    return 0


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header size, header time and body silence limits."""

    max_header_bytes: ClassVar[int] = 32768
    header_timeout_s: ClassVar[float] = 10.0
    body_timeout_s: ClassVar[float] = 10.0
    on_refuse: ClassVar[Callable[[str], None] | None] = None  # counts refusals by error code

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # the next bytes belong to a request line or headers
        self._head_bytes = 0  # of this head, handed to the parser
        self._held = b""  # of this head, not yet handed over (``_receive_head``)
        self._in_body = False
        self._messages = 0  # requests parsed whole on this connection
        self._body_left: int | None = None  # of this request's Content-Length body (None: chunked)
        self._refusal: tuple[int, str, str] | None = None  # to send once the answers before it are out
        self._framing = 0  # of this request's body bytes, those that were not body data (``data_received``)
        self._chunks = 0  # of this request's body
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------------------- transport events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(OneWriteTransport(transport, asyncio.get_running_loop()))
        self._arm(self.header_timeout_s)  # a connection that never sends a byte is timed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # a refused head waits for the answers before it; what follows is not read
        while data and not self.transport.is_closing() and self._refusal is None:
            if self._in_head:
                data = self._receive_head(data)  # what follows a complete head: body, or pipelined requests
                continue
            self._last_data = self.loop.time()
            left = self._body_left
            if left is None or len(data) <= left:  # a chunked body: the parser alone finds its end
                body, data = data, b""
            else:  # a pipelined request follows this body in the same read: its head gets the guard too
                body, data = data[:left], data[left:]
            if left is not None:
                self._body_left = left - len(body)
            self._receive_body(body)
        # Timers only for what is still incomplete once this chunk is parsed: a request that arrives whole
        # (the usual case) costs no timer at all.
        if self._timer is None and not self.transport.is_closing() and self._refusal is None:
            if self._in_body:
                self._arm(self.body_timeout_s)
            elif self._in_head and (self._head_bytes or self._held):  # a later head on a kept-alive one
                self._arm(self.header_timeout_s)

    def _receive_head(self, data: bytes) -> bytes:
        """Hand the parser this request's head only, without its Upgrade header, and never more of it
        than ``max_header_bytes``; returns what follows a complete head (body, next request).

        Why the Upgrade header goes: httptools stops parsing at the end of a head that offers to switch
        protocols, so the body of a request offering ``Upgrade: h2c`` (every JDK HttpClient does, on plain
        HTTP) never reached the app (Kludex/uvicorn#2722). This server speaks HTTP/1.1 only, so it ignores
        the offer as RFC 9110 §7.8 allows. A few trailing bytes that may begin that header or the head's
        end are held back until more arrive, so neither is missed across reads.
        """
        pending = self._held + data
        end = pending.find(HEAD_END)
        head, rest = (pending[: end + 4], pending[end + 4 :]) if end >= 0 else (pending, b"")
        held = 0 if end >= 0 else _unfinished_tail(head)
        if self._head_bytes + len(head) > self.max_header_bytes:
            self._refuse(
                431, "headers_too_large", f"request line and headers exceed {self.max_header_bytes} bytes"
            )
            return b""
        self._held, head = head[len(head) - held :], head[: len(head) - held]
        self._head_bytes += len(head)
        # even b"": uvicorn cancels its keep-alive timer on any data
        super().data_received(UPGRADE_HEADER.sub(IGNORED_UPGRADE, head))
        return rest

    def _receive_body(self, data: bytes) -> None:
        """Parse body bytes, and count those that were not body data (``on_body`` takes those off) while
        the same request's body goes on: a chunked body's framing and trailer fields, which httptools
        gathers and uvicorn keeps without a limit (a trailer of 100 MB took the server to 1.7 GB)."""
        in_body, message = self._in_body, self._messages
        super().data_received(data)
        if message != self._messages:  # this request ended here; a pipelined one's data may have been
            self._framing = max(self._framing, 0)  # taken off its count: what it sent so far is one read
            return
        if not in_body:
            return
        self._framing += len(data)
        limit = self.max_header_bytes + CHUNK_FRAMING_BYTES * self._chunks
        if self._framing > limit and not self.transport.is_closing():
            self._refuse(431, "headers_too_large", f"chunk framing and trailers exceed {limit} bytes")

    # ------------------------------------------------------------------------------- parser callbacks

    def on_body(self, body: bytes) -> None:
        self._framing -= len(body)
        super().on_body(body)

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_headers_complete(self) -> None:
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not before and self.scope["http_version"] == "1.0":  # a new request (not an upgrade)
            self.cycle.waiting_for_100_continue = False  # RFC 9110 §10.1.1: a 1.0 client gets no 100
            if http_1_0_keeps_alive(self.headers):
                keep_alive_for_http_1_0(self.cycle)
        self._in_head, self._in_body = False, True
        self._body_left = _content_length(self.headers)
        self._last_data = self.loop.time()
        self._disarm()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_body:  # a chunked body's trailer field: ignored (RFC 9110 §6.5.1), not kept with the
            return  # request's headers, where uvicorn would keep any number of them
        super().on_header(name, value)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes, self._in_body = True, 0, False
        self._messages, self._framing, self._chunks = self._messages + 1, 0, 0
        self._body_left = None
        self._disarm()  # the next request's first bytes arm it again; uvicorn times the idle gap
        cycle = self.cycle
        if (
            cycle is not None
            and cycle.response_complete
            and not self.pipeline
            and not self.transport.is_closing()
        ):
            # answered before its body ended (a 404 reads none): uvicorn armed its idle timer with the
            # answer, and the body's later bytes cancelled it; without this the connection idles for ever
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    # ------------------------------------------------------------------------------------------ timers

    def _arm(self, delay: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, self._on_timer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        if self._in_head:
            self._refuse(
                408, "header_timeout", f"request headers not complete within {self.header_timeout_s:g} s"
            )
            return
        if not self._in_body:
            return
        now = self.loop.time()
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            self._last_data = now  # the server holds the body back, not the client
        silence = now - self._last_data
        if silence < self.body_timeout_s:
            self._arm(self.body_timeout_s - silence)
            return
        self._refuse(408, "body_timeout", f"no request body data for {self.body_timeout_s:g} s")

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` with the service's JSON error shape (unless a response is already under way)
        and close the connection. A refused head behind requests still being answered (pipelined) waits
        for their answers; nothing more is read meanwhile."""
        if self.on_refuse is not None:
            self.on_refuse(code)
        if self._answers_owed() if self._in_head else self._withdraw_queued_request():
            self._refusal = (status, code, message)
            self._disarm()
            self.transport.pause_reading()
            return
        answered = not self._in_head and self.cycle is not None and self.cycle.response_started
        if answered:  # the refused request has its answer (a 404 read none of its body): nothing more
            self.transport.close()
            return
        self._answer_and_close(status, code, message)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes its parser refuses (smuggling attempts, bad framing), in the service's
        JSON error shape and counted, like the other refusals, instead of plain text."""
        self._refuse(400, "bad_request", f"{msg.rstrip('.')}: the HTTP parser refused it")

    def _answers_owed(self) -> bool:
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def _withdraw_queued_request(self) -> bool:
        """Whether the request being received waits in uvicorn's pipeline behind unanswered ones; if so it
        leaves the queue (its app never runs: the refusal is its answer, after theirs)."""
        if self.pipeline and self.pipeline[0][0] is self.cycle:
            self.pipeline.popleft()
            return True
        return False

    def on_response_complete(self) -> None:
        last = not self.pipeline  # nothing queued behind the answer just sent: no answer is owed now
        super().on_response_complete()
        if self._refusal is not None and last and not self.transport.is_closing():
            self._answer_and_close(*self._refusal)
        elif self._in_head and (self._head_bytes or self._held):
            self._unset_keepalive_if_required()  # a next head has begun: the header timer governs it

    def _answer_and_close(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        head = (
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode("latin-1") + body)
        self.transport.close()


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    return {
        t.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for t in value.split(b",")
    }


def http_1_0_keeps_alive(headers: list[tuple[bytes, bytes]]) -> bool:
    """An HTTP/1.0 request that asks for keep-alive and may have it: ``close`` wins (RFC 9112 §9.3), and a
    1.0 body framed by Transfer-Encoding ends its connection (§6.1: a proxy may frame it otherwise)."""
    tokens = _connection_tokens(headers)
    chunked = any(name == b"transfer-encoding" for name, _ in headers)
    return b"keep-alive" in tokens and b"close" not in tokens and not chunked


def keep_alive_for_http_1_0(cycle: RequestResponseCycle) -> None:
    """Keep an HTTP/1.0 keep-alive connection open (uvicorn closes every 1.0 one), as ApacheBench's
    ``-k`` asks: the answer says ``connection: keep-alive``, which such a client needs to reuse the
    connection, when it has a Content-Length (every answer here) and nothing has decided to close (a
    shutdown, an app's ``connection: close``); else uvicorn closes and says ``close`` alone."""
    cycle.keep_alive = True
    send = cycle.send

    async def send_announcing_keep_alive(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and cycle.keep_alive:
            headers = list(message.get("headers", ()))
            has_length = any(name.lower() == b"content-length" for name, _ in headers)
            if has_length and b"close" not in _connection_tokens(headers):
                message = {**message, "headers": [*headers, (b"connection", b"keep-alive")]}
            else:
                cycle.keep_alive = False
        await send(message)

    cycle.send = send_announcing_keep_alive  # run_asgi looks it up when the request's task starts


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """A request's body length as its headers declare it (0 without one); None for a chunked body, or a
    length the parser took that ``int`` does not (the parser then finds the end)."""
    length = 0
    for name, value in headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
    return length


class OneWriteTransport:
    """The connection's transport, but a response's status line and headers wait for its first body
    chunk and go out with it in one write: one send, one TCP segment for a small answer, where uvicorn
    writes them apart. A head that no body follows (HEAD, 304, a 100-continue) goes out on the loop's
    next turn; order is always kept. Everything else is the transport's own."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop, self._head = transport, loop, None

    def write(self, data: bytes) -> None:
        if self._transport.is_closing():  # the client left while a pipelined answer was being made
            self._head = None  # (uvloop raises on a write to a closed transport; nobody could read it)
            return
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head + data)
        elif data.startswith(b"HTTP/1.") and data.endswith(b"\r\n\r\n"):  # a response head: hold it
            self._head = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        if self._head is not None and not self._transport.is_closing():
            head, self._head = self._head, None
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class AnswerWhenShutDown:
    """The served ASGI app, wrapped: a request still running when uvicorn's graceful shutdown runs out
    (``shutdown_timeout_s``) and cancels it, a stalled upload say, is answered 503 ``shutting_down`` and
    its connection closed, where uvicorn would answer 500 and log a traceback for each. Costs the hot path
    nothing but a ``try``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if scope["type"] != "http" or not await _answer_shutting_down(send):
                raise


async def _answer_shutting_down(send: Any) -> bool:
    """Send the 503; False when a response had already begun (uvicorn refuses a second start)."""
    body = json.dumps(
        {"error": {"code": "shutting_down", "message": "the server shut down before this request finished"}}
    ).encode()
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
    ]
    try:
        await send({"type": "http.response.start", "status": 503, "headers": head})
    except RuntimeError:
        return False
    await send({"type": "http.response.body", "body": body})
    logging.getLogger("mnemo.service").info("answered 503: a request was still running at shutdown")
    return True


def guarded_protocol(settings: Settings, on_refuse: Callable[[str], None] | None = None) -> type:
    """A ``GuardedHttpToolsProtocol`` subclass carrying these settings' limits (uvicorn makes one
    protocol instance per connection from the class)."""
    protocol = type("MnemoHttpProtocol", (GuardedHttpToolsProtocol,), {})
    _set_limits(protocol, settings, on_refuse)
    return protocol


def configure_protocol(protocol: type, settings: Settings, app: Any) -> None:
    """Give ``protocol`` (a ``GuardedHttpToolsProtocol`` subclass) the limits of ``settings``, its
    refusals counted in ``app``'s metrics."""
    _set_limits(protocol, settings, _refusal_counter(app))


def _set_limits(protocol: type, settings: Settings, on_refuse: Callable[[str], None] | None) -> None:
    protocol.max_header_bytes = settings.max_header_bytes
    protocol.header_timeout_s = settings.header_timeout_s
    protocol.body_timeout_s = settings.body_timeout_s
    protocol.on_refuse = staticmethod(on_refuse) if on_refuse is not None else None


def _refusal_counter(app: Any) -> Callable[[str], None] | None:
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    return (lambda code: metrics.errors.labels(code).inc()) if metrics is not None else None


def server_options(settings: Settings) -> dict[str, Any]:
    """The ``uvicorn.Config`` options ``settings`` decide, protocol aside: address, log level, keep-alive
    and graceful-shutdown timeouts."""
    return dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )


def server_config(settings: Settings, app: Any, *, shortcut: bool = True, **overrides: Any) -> uvicorn.Config:
    """The ``uvicorn.Config`` for ``app`` under ``settings``: address, log level, the guarded protocol,
    keep-alive and graceful-shutdown timeouts; a Mnemo app is served through its ``ScoreShortcut`` unless
    ``shortcut=False`` (the tests compare the two). ``overrides`` go to ``uvicorn.Config`` as they are."""
    from mnemo.service.score_shortcut import ScoreShortcut  # the app's side; a supervisor needs none of it

    options = {**server_options(settings), "http": guarded_protocol(settings, _refusal_counter(app))}
    if shortcut and getattr(getattr(app, "state", None), "metrics", None) is not None:
        app = ScoreShortcut(app)
    return uvicorn.Config(AnswerWhenShutDown(app), **{**options, **overrides})
