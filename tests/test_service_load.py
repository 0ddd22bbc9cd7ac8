"""Batching under concurrency, back-pressure (503), timeouts (504), failing batches (500), load smoke."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np

from mnemo.service.app import create_app
from tests.image_bytes import png_bytes
from tests.service_helpers import make_settings, metric_value, running_server, smooth_images

pytest_plugins = ["tests.service_fixtures"]  # the shared fixtures: bundle_dir, server

IMAGES = [png_bytes(smooth_images(1, 1, 28, seed=100 + i)[0]) for i in range(32)]
RAW = {"content-type": "image/png"}


async def score_all(url: str, images: list[bytes]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(images))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        return await asyncio.gather(
            *(client.post("/v1/models/gray:score", content=data, headers=RAW) for data in images)
        )


def test_parallel_clients_are_batched_and_each_gets_its_own_score(bundle_dir):
    with running_server(make_settings(bundle_dir, max_batch_size=8, max_wait_ms=50)) as url:
        alone = [httpx.post(f"{url}/v1/models/gray:score", content=d, headers=RAW).json() for d in IMAGES[:4]]
        before = httpx.get(f"{url}/metrics").text
        responses = asyncio.run(score_all(url, IMAGES))
        after = httpx.get(f"{url}/metrics").text
    assert all(r.status_code == 200 for r in responses)
    scores = [r.json()["results"][0]["score"] for r in responses]
    np.testing.assert_allclose(
        scores[:4], [a["results"][0]["score"] for a in alone], atol=1e-5
    )  # mates don't matter

    def delta(name, **labels):
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    batches = delta("mnemo_batch_size_count", model="gray")
    assert delta("mnemo_batch_size_sum", model="gray") == len(IMAGES)
    assert batches <= len(IMAGES) / 2  # requests really were grouped
    assert delta("mnemo_batch_size_bucket", model="gray", le="1.0") < batches  # some batches held > 1
    assert metric_value(after, "mnemo_queue_depth", model="gray") == 0


def test_full_queue_answers_503_with_retry_after_and_slow_requests_504(bundle_dir):
    # The batch window (1.5 s) outlasts the request timeout (0.5 s), so a lone request must time out.
    settings = make_settings(
        bundle_dir, max_queue=2, max_files=2, max_batch_size=16, max_wait_ms=1500, request_timeout_s=0.5
    )
    with running_server(settings) as url:
        first: dict = {}
        files = [("files", ("a.png", IMAGES[0], "image/png")), ("files", ("b.png", IMAGES[1], "image/png"))]
        waiter = threading.Thread(
            target=lambda: first.update(r=httpx.post(f"{url}/v1/models/gray:score", files=files, timeout=10))
        )
        waiter.start()
        deadline = time.monotonic() + 5
        while metric_value(httpx.get(f"{url}/metrics").text, "mnemo_queue_depth", model="gray") < 2:
            assert time.monotonic() < deadline, "the first request never queued"
            time.sleep(0.01)
        busy = httpx.post(f"{url}/v1/models/gray:score", content=IMAGES[2], headers=RAW)
        waiter.join(timeout=10)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "queue_full"
        timed_out = first["r"]
        assert timed_out.status_code == 504 and timed_out.json()["error"]["code"] == "timeout"
        assert httpx.get(f"{url}/healthz").status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert metric_value(metrics, "mnemo_requests_total", model="gray", status="503") == 1
        assert metric_value(metrics, "mnemo_requests_total", model="gray", status="504") == 1


def test_a_failing_batch_fails_only_its_requests_and_the_next_one_runs(bundle_dir):
    settings = make_settings(bundle_dir, max_wait_ms=1)
    app = create_app(settings)
    with running_server(settings, app=app) as url:
        batcher = app.state.store.models["gray"].batcher
        healthy, calls = batcher._run, []

        def fails_once(batch):
            calls.append(len(batch))
            if len(calls) == 1:
                raise RuntimeError("GPU fell off the bus")
            return healthy(batch)

        batcher._run = fails_once  # fault injection into the live service
        failed = httpx.post(f"{url}/v1/models/gray:score", content=IMAGES[0], headers=RAW)
        recovered = httpx.post(f"{url}/v1/models/gray:score", content=IMAGES[0], headers=RAW)
        metrics = httpx.get(f"{url}/metrics").text
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error["code"] == "inference_failed" and "GPU fell off the bus" in error["message"]
    assert recovered.status_code == 200 and len(calls) == 2
    assert metric_value(metrics, "mnemo_errors_total", kind="inference_failed") == 1


def test_load_smoke_stops_by_itself(server):
    """A few clients hammer the service for ~2 s; everything must succeed and be counted."""
    duration_s, clients, sent = 2.0, 6, []

    async def client(k: int, http: httpx.AsyncClient) -> list[httpx.Response]:
        stop, out = time.monotonic() + duration_s, []
        while time.monotonic() < stop and len(out) < 200:
            n = 1 + (len(out) + k) % 3
            files = [("files", (f"{i}.png", IMAGES[(k + i) % len(IMAGES)], "image/png")) for i in range(n)]
            sent.append(n)
            out.append(await http.post("/v1/models/gray:score", files=files, params={"heatmap": "grid"}))
        return out

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=30) as http:
            return [r for rs in await asyncio.gather(*(client(k, http) for k in range(clients))) for r in rs]

    before = httpx.get(f"{server}/metrics").text
    started = time.monotonic()
    responses = asyncio.run(run())
    elapsed = time.monotonic() - started
    after = httpx.get(f"{server}/metrics").text
    assert elapsed < duration_s + 5
    assert len(responses) >= 10 and all(r.status_code == 200 for r in responses)
    scored = metric_value(after, "mnemo_images_scored_total", model="gray")
    assert scored - metric_value(before, "mnemo_images_scored_total", model="gray") == sum(sent)
    latencies = sorted(r.json()["timings_ms"]["total_ms"] for r in responses)
    assert latencies[int(0.95 * (len(latencies) - 1))] < 2000
