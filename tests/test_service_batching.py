"""Unit tests of the service's settings and its dynamic batcher (no HTTP, no models: fast and exact)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from pydantic import ValidationError

from mnemo.service.batching import BatcherClosedError, BatchFailedError, DynamicBatcher, QueueFullError
from mnemo.service.settings import Settings


class Recorder:
    """A fake model: score = mean of the image, heatmap = the image; records every batch it ran."""

    def __init__(self, fail_when: float | None = None, delay_s: float = 0.0) -> None:
        self.batches: list[int] = []
        self.threads: set[str] = set()
        self.fail_when, self.delay_s = fail_when, delay_s

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.batches.append(len(batch))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        if self.fail_when is not None and np.any(batch == self.fail_when):
            raise RuntimeError("poisoned input")
        return batch.mean(axis=(1, 2, 3)), batch[:, :1]


class DepthLog:
    def __init__(self) -> None:
        self.depths: list[int] = []
        self.sizes: list[int] = []

    def queue_depth(self, depth: int) -> None:
        self.depths.append(depth)

    def batch_done(self, size: int, inference_s: float, queue_waits: list[float]) -> None:
        self.sizes.append(size)


def images(*values: float) -> np.ndarray:
    return np.stack([np.full((1, 4, 4), v, np.float32) for v in values])


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


async def started(run_fn, **knobs) -> DynamicBatcher:
    batcher = DynamicBatcher(run_fn, **{"max_batch_size": 8, "max_wait_s": 0.05, "max_queue": 64, **knobs})
    batcher.start()
    return batcher


def test_settings_read_env_with_prefix_and_validate(monkeypatch):
    monkeypatch.setenv("MNEMO_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("MNEMO_API_KEY", "s3cret")
    settings = Settings()
    assert settings.max_batch_size == 4
    assert settings.api_key.get_secret_value() == "s3cret" and "s3cret" not in repr(settings)
    assert Settings(max_batch_size=2).max_batch_size == 2  # explicit values (CLI flags) win over env
    with pytest.raises(ValidationError, match="max_queue"):
        Settings(max_queue=2, max_files=4)
    with pytest.raises(ValidationError):
        Settings(backend="tensorflow")


def test_concurrent_submissions_are_grouped_and_results_go_to_their_callers():
    async def scenario():
        model, log = Recorder(), DepthLog()
        batcher = await started(model, observer=log)
        results = await asyncio.gather(*(batcher.submit(images(float(i))) for i in range(12)))
        await batcher.close()
        return model, log, results

    model, log, results = run(scenario())
    assert [r[0].score for r in results] == [float(i) for i in range(12)]  # no mix-ups between callers
    assert model.batches == [8, 4]  # full batch first, the rest after the wait
    assert log.sizes == [8, 4] and log.depths[-1] == 0
    assert all(r[0].batch_size in (8, 4) and r[0].heatmap.shape == (4, 4) for r in results)
    assert all(name.startswith("infer-") for name in model.threads)  # never on the event loop's thread


def test_a_lone_request_waits_at_most_max_wait():
    async def scenario():
        batcher = await started(Recorder(), max_wait_s=0.05)
        t0 = time.perf_counter()
        [result] = await batcher.submit(images(1.0))
        elapsed = time.perf_counter() - t0
        await batcher.close()
        return result, elapsed

    result, elapsed = run(scenario())
    assert result.batch_size == 1 and result.queue_s >= 0.04 and elapsed < 1.0


def test_greedy_batching_runs_a_lone_image_at_once_and_groups_what_queued_meanwhile():
    async def scenario():
        model = Recorder(delay_s=0.1)
        batcher = await started(model, max_wait_s=0.0)
        t0 = time.perf_counter()
        [alone] = await batcher.submit(images(1.0))
        lone_s = time.perf_counter() - t0
        first = asyncio.create_task(batcher.submit(images(2.0)))
        await asyncio.sleep(0.02)  # the first batch is now running; these five queue behind it
        rest = await asyncio.gather(*(batcher.submit(images(float(i))) for i in range(3, 8)))
        await first
        await batcher.close()
        return model, alone, lone_s, rest

    model, alone, lone_s, rest = run(scenario())
    assert alone.batch_size == 1 and alone.queue_s < 0.02 and lone_s < 0.5
    assert model.batches == [1, 1, 5]
    assert [r[0].score for r in rest] == [3.0, 4.0, 5.0, 6.0, 7.0]


def test_failing_batch_fails_only_its_callers_and_the_next_batch_runs():
    async def scenario():
        model, log = Recorder(fail_when=-1.0), DepthLog()
        batcher = await started(model, observer=log, max_batch_size=2, max_wait_s=0.01)
        first = await asyncio.gather(
            batcher.submit(images(-1.0)), batcher.submit(images(2.0)), return_exceptions=True
        )
        after = await batcher.submit(images(3.0))
        await batcher.close()
        return first, after, log

    first, after, log = run(scenario())
    assert all(isinstance(r, BatchFailedError) and "poisoned input" in str(r) for r in first)
    assert after[0].score == 3.0
    assert log.sizes == [2, 1]


def test_queue_is_bounded_and_admission_is_all_or_nothing():
    async def scenario():
        batcher = await started(Recorder(), max_batch_size=8, max_wait_s=0.3, max_queue=3)
        waiting = asyncio.ensure_future(batcher.submit(images(1.0, 2.0)))
        await asyncio.sleep(0.05)
        assert batcher.depth == 2
        with pytest.raises(QueueFullError):
            await batcher.submit(images(3.0, 4.0))  # 2 + 2 > 3: refused as a whole
        accepted = await batcher.submit(images(5.0))  # 2 + 1 fits, and joins the same batch
        done = await waiting
        await batcher.close()
        return accepted, done

    accepted, done = run(scenario())
    assert accepted[0].batch_size == 3 and [r.score for r in done] == [1.0, 2.0]


class Gated(Recorder):
    """A fake model that takes ``per_image_s`` per image (its first batch ``first_extra_s`` more, as a fresh
    session's does) and holds each batch until ``gate`` is open."""

    def __init__(self, per_image_s: float, first_extra_s: float = 0.0) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.per_image_s, self.first_extra_s = per_image_s, first_extra_s

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.gate.wait()
        time.sleep(self.per_image_s * len(batch) + (self.first_extra_s if not self.batches else 0.0))
        return super().__call__(batch)


async def hold_one(batcher: DynamicBatcher, model: Gated) -> asyncio.Future:
    """Close the gate and let the inference thread take one image, so what is submitted next waits."""
    model.gate.clear()
    running = asyncio.ensure_future(batcher.submit(images(1.0)))
    for _ in range(400):
        await asyncio.sleep(0.005)
        if not batcher.depth:  # taken off the queue: held at the gate
            return running
    pytest.fail("the inference thread never took the image")


async def submitted(batcher: DynamicBatcher, *values: float) -> asyncio.Future:
    """A request of these images, given a moment: a refusal is immediate, an admission waits."""
    request = asyncio.ensure_future(batcher.submit(images(*values)))
    await asyncio.sleep(0.02)
    return request


@pytest.mark.parametrize("budget_s", [0.4, 0.0], ids=["wait-budget", "count-only"])
def test_admission_counts_the_work_ahead_at_the_models_measured_speed(budget_s):
    """0.1 s an image, a 0.4 s budget: with 2 images ahead (0.2 s) a request of four is admitted (its own
    work does not count, so a large request is not starved by small ones); with 6 ahead (0.6 s) a single
    image is refused, though the count limit (64) would take it; with the budget off it is admitted.
    Margins for a busy machine: each image takes at least 0.1 s, and the four are admitted below 0.2 s."""

    async def scenario():
        model = Gated(per_image_s=0.1)
        batcher = await started(model, max_batch_size=1, max_wait_s=0, max_queue_wait_s=budget_s)
        for _ in range(3):  # three batches: the batcher now knows the model's speed
            await batcher.submit(images(0.0))
        running = await hold_one(batcher, model)
        queued = [await submitted(batcher, v) for v in (2.0, 3.0)]
        four = await submitted(batcher, 4.0, 5.0, 6.0, 7.0)
        assert not four.done() and batcher.depth == 6
        last = await submitted(batcher, 8.0)
        refused = last.done()
        model.gate.set()
        results = await asyncio.gather(running, *queued, four, last, return_exceptions=True)
        await batcher.close()
        return refused, results

    refused, results = run(scenario())
    assert [r.score for r in results[3]] == [4.0, 5.0, 6.0, 7.0]
    if budget_s:
        assert refused and isinstance(results[-1], QueueFullError)
        assert "6 images already waiting, about" in str(results[-1]) and "(limit 0.4 s)" in str(results[-1])
    else:
        assert not refused and results[-1][0].score == 8.0


def test_one_slow_first_batch_does_not_shut_the_queue():
    """Found in review: an average over batches kept a fresh session's slow first batch (0.6 s) for a
    while, and refused work the model would have done in time; the median of the last batches does not."""

    async def scenario():
        model = Gated(per_image_s=0.01, first_extra_s=0.6)
        batcher = await started(model, max_batch_size=1, max_wait_s=0, max_queue_wait_s=0.4)
        for _ in range(3):
            await batcher.submit(images(0.0))
        running = await hold_one(batcher, model)
        queued = [await submitted(batcher, float(v)) for v in range(10)]  # up to 0.09 s ahead
        refusals = sum(request.done() for request in queued)
        model.gate.set()
        await asyncio.gather(running, *queued)
        await batcher.close()
        return refusals

    assert run(scenario()) == 0


def test_callers_that_gave_up_are_skipped_not_computed():
    async def scenario():
        model = Recorder()
        batcher = await started(model, max_wait_s=0.2)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batcher.submit(images(1.0)), 0.02)
        [result] = await batcher.submit(images(2.0))
        await batcher.close()
        return model, result

    model, result = run(scenario())
    assert result.score == 2.0 and model.batches == [1]  # the abandoned image never reached the model


def test_close_drains_admitted_work_then_refuses():
    async def scenario():
        batcher = await started(Recorder(delay_s=0.05), max_wait_s=0.01)
        pending = asyncio.ensure_future(batcher.submit(images(7.0)))
        await asyncio.sleep(0)
        await batcher.close()
        with pytest.raises(BatcherClosedError):
            await batcher.submit(images(1.0))
        return await pending

    assert run(scenario())[0].score == 7.0
