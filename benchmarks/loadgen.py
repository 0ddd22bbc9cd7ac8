"""A closed-loop HTTP load generator: ``concurrency`` workers, each on its own keep-alive connection (or a
fresh connection per request), sending its next request as soon as the previous one answers, until
``requests`` were sent or ``duration`` seconds passed.

The client speaks just enough HTTP/1.1 over asyncio streams to resend one prebuilt request and read a
``Content-Length`` response, as ``wrk`` does. A general client costs far more: with httpx the generator
used 2–7 ms of CPU per request, about one of the two cores this runs on, so it measured itself as much as
the service. Bounded on purpose (a request cap and a time cap): it stops by itself. Besides the latency
the client sees, it keeps the server's own ``timings_ms.total_ms`` (decode + queue + inference, as the
service reports it) and the CPU share the generator itself used.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import numpy as np

WARMUP_REQUESTS = 8


@dataclass
class LoadResult:
    concurrency: int
    images_per_request: int
    requests: int
    ok: int
    errors: int
    seconds: float
    images_per_s: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    server_p50_ms: float | None  # the service's own timings_ms.total_ms
    client_cpu_cores: float  # CPU seconds the load generator used per wall second
    server_cpu_ms_per_image: float | None = None  # the server process's CPU (all threads) per image
    mean_batch_size: float | None = None  # images per inference call, from the server's metrics

    def to_dict(self) -> dict:
        return asdict(self)


def image_body(png: bytes, count: int) -> tuple[bytes, str]:
    """A raw ``image/png`` body, or a multipart one with ``count`` file parts (the batch upload)."""
    if count == 1:
        return png, "image/png"
    boundary = "mnemo-bench-boundary"
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="image.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode("ascii")
    body = b"".join(part + png + b"\r\n" for _ in range(count)) + f"--{boundary}--\r\n".encode("ascii")
    return body, f"multipart/form-data; boundary={boundary}"


def post_request(url: str, body: bytes, content_type: str, keep_alive: bool = True) -> bytes:
    """The bytes of one POST (keep-alive, or ``Connection: close``), built once and resent by every worker."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    head = (
        f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode("ascii") + body


class Connection:
    """One keep-alive HTTP/1.1 connection; ``send`` writes a request and reads one whole response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Connection:
        parts = urlsplit(url)
        return cls(*await asyncio.open_connection(parts.hostname, parts.port or 80))

    async def send(self, request: bytes, closing: bool = False) -> tuple[int, bytes]:
        """Status and body of the answer; ``closing``: the request asked the server to close after it."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
        }
        if "content-length" not in headers:
            raise ConnectionError(f"response without Content-Length (status {status})")
        body = await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close" and not closing:
            raise ConnectionError(f"server closed the connection (status {status})")
        return status, body

    def close(self) -> None:
        self.writer.close()


def percentiles_ms(seconds: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 of durations given in seconds, in ms; None each when nothing was measured."""
    ms = 1000 * np.asarray(seconds)
    return {f"p{q}": round(float(np.percentile(ms, q)), 2) if ms.size else None for q in (50, 95, 99)}


async def run_load(
    url: str,
    png: bytes,
    concurrency: int,
    *,
    duration: float = 4.0,
    requests: int = 4000,
    images_per_request: int = 1,
    probe: Callable[[], tuple[float, float, float]] | None = None,
    keep_alive: bool = True,
) -> LoadResult:
    """POST ``png`` (``images_per_request`` copies per request) to ``url`` under closed-loop load.
    ``probe()`` → (server CPU seconds, batch-size sum, batch count), read after the warm-up and at the end,
    makes the result explain itself: the server's CPU per image and its mean batch size. ``keep_alive``
    False: every request on a fresh connection, closed after its answer (as a camera posting one frame per
    connection does), so connection set-up and teardown are part of what is measured."""
    request = post_request(url, *image_body(png, images_per_request), keep_alive=keep_alive)
    connections = [await Connection.open(url) for _ in range(concurrency)]
    for i in range(WARMUP_REQUESTS):
        await connections[i % concurrency].send(request, closing=not keep_alive)
        if not keep_alive:
            connections[i % concurrency].close()
            connections[i % concurrency] = await Connection.open(url)
    latencies: list[float] = []
    server_ms: list[float] = []
    errors = sent = 0
    before = await asyncio.to_thread(probe) if probe else None
    started, cpu_started = time.perf_counter(), time.process_time()
    deadline = started + duration

    async def worker(i: int) -> None:
        nonlocal sent, errors
        while sent < requests and time.perf_counter() < deadline:
            sent += 1
            t = time.perf_counter()
            try:
                if not keep_alive:  # the connection is part of the request: timed with it
                    connections[i].close()
                    connections[i] = await Connection.open(url)
                status, body = await connections[i].send(request, closing=not keep_alive)
            except (OSError, ValueError, asyncio.IncompleteReadError):
                errors += 1  # a broken connection: count it, then carry on with a new one
                connections[i].close()
                connections[i] = await Connection.open(url)
                continue
            if status != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t)
            server_ms.append(json.loads(body)["timings_ms"]["total_ms"])

    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        for c in connections:
            c.close()
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    server = {}
    if probe:
        after = await asyncio.to_thread(probe)
        images = len(latencies) * images_per_request
        cpu_s, batch_sum, batches = (a - b for a, b in zip(after, before))
        server = {
            "server_cpu_ms_per_image": round(1000 * cpu_s / images, 2) if images else None,
            "mean_batch_size": round(batch_sum / batches, 2) if batches else None,
        }
    pct = percentiles_ms(latencies)
    return LoadResult(
        concurrency=concurrency,
        images_per_request=images_per_request,
        requests=sent,
        ok=len(latencies),
        errors=errors,
        seconds=round(seconds, 2),
        images_per_s=round(len(latencies) * images_per_request / seconds, 1),
        p50_ms=pct["p50"],
        p95_ms=pct["p95"],
        p99_ms=pct["p99"],
        server_p50_ms=round(float(np.median(server_ms)), 2) if server_ms else None,
        client_cpu_cores=round(cpu / seconds, 2),
        **server,
    )
