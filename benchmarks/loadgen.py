"""A closed-loop HTTP load generator (asyncio + httpx): ``concurrency`` workers, each sending its next
request as soon as the previous one answers, until ``requests`` were sent or ``duration`` seconds passed.

Bounded on purpose (loopback only, a request cap and a time cap): it stops by itself. Besides the latency
the client sees, it keeps the server's own ``timings_ms.total_ms`` (decode + queue + inference, as the
service reports it) and the CPU share the generator itself used: on a small box the client competes with
the server for the same cores, and these two numbers tell the reader how much.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass

import httpx
import numpy as np

WARMUP_REQUESTS = 8


@dataclass
class LoadResult:
    concurrency: int
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

    def to_dict(self) -> dict:
        return asdict(self)


async def run_load(
    url: str, png: bytes, concurrency: int, *, duration: float = 4.0, requests: int = 4000
) -> LoadResult:
    """POST ``png`` (one image per request) to ``url`` under closed-loop load; latency per request."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
        headers = {"content-type": "image/png"}
        for _ in range(WARMUP_REQUESTS):
            await client.post(url, content=png, headers=headers)
        latencies: list[float] = []
        server_ms: list[float] = []
        errors = 0
        sent = 0
        started, cpu_started = time.perf_counter(), time.process_time()
        deadline = started + duration

        async def worker() -> None:
            nonlocal sent, errors
            while sent < requests and time.perf_counter() < deadline:
                sent += 1
                t = time.perf_counter()
                try:
                    response = await client.post(url, content=png, headers=headers)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t)
                    server_ms.append(response.json()["timings_ms"]["total_ms"])
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    ms = 1000 * np.asarray(latencies) if latencies else None
    pct = {q: None if ms is None else round(float(np.percentile(ms, q)), 2) for q in (50, 95, 99)}
    return LoadResult(
        concurrency=concurrency,
        requests=sent,
        ok=len(latencies),
        errors=errors,
        seconds=round(seconds, 2),
        images_per_s=round(len(latencies) / seconds, 1),
        p50_ms=pct[50],
        p95_ms=pct[95],
        p99_ms=pct[99],
        server_p50_ms=round(float(np.median(server_ms)), 2) if server_ms else None,
        client_cpu_cores=round(cpu / seconds, 2),
    )
