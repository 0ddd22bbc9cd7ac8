"""Per-model dynamic batching: group queued images into one inference call, off the event loop.

Callers ``await submit(images)``; a single collector task per model takes the first waiting image, then
keeps taking more until ``max_batch_size`` images are in hand or ``max_wait_s`` has passed since the first
(with ``max_wait_s = 0`` it takes only what is already queued: greedy batching, where the images that
arrived while the previous batch ran form the next one),
and runs the batch in the model's own worker thread, so the event loop never blocks and the next batch
fills while this one runs. Admission is bounded (``QueueFullError`` beyond ``max_queue`` waiting images),
and a failing batch fails only the callers in it. A caller that gives up cancels its ``submit``
(``service/scoring.py`` does so at the request's deadline and when its client disconnects): that cancels
its images' futures, and the collector drops cancelled images when it forms a batch, so they are never
computed (an image already in a running batch is computed, and its result dropped).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

RunFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class QueueFullError(Exception):
    """Too many images are already waiting for this model."""


class BatchFailedError(Exception):
    """Inference raised for the batch this request was in."""


class BatcherClosedError(Exception):
    """The model was unloaded before this request ran."""


@dataclass(frozen=True)
class ImageResult:
    score: float
    heatmap: np.ndarray  # [H, W]
    queue_s: float  # enqueue to batch start
    inference_s: float
    batch_size: int


class BatchObserver(Protocol):
    def queue_depth(self, depth: int) -> None: ...

    def batch_done(self, size: int, inference_s: float, queue_waits: list[float]) -> None: ...


@dataclass
class _Item:
    image: np.ndarray
    future: asyncio.Future
    enqueued: float


class DynamicBatcher:
    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        observer: BatchObserver | None = None,
        name: str = "model",
    ) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._observer = observer
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._waiting = 0  # admitted, not yet handed to inference (queued or being collected)
        self._busy = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the collector task; call from the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._collect_forever())

    @property
    def depth(self) -> int:
        return self._waiting

    async def submit(self, images: Sequence[np.ndarray]) -> list[ImageResult]:
        """Queue N images, each [C, H, W] (a list, or an [N, C, H, W] array), as N items; all-or-nothing
        admission so a request is never split."""
        if self._task is None or self._task.done():
            raise BatcherClosedError("model is not running")
        if self._waiting + len(images) > self.max_queue:
            raise QueueFullError(f"{self._waiting} images already waiting (limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        now = time.perf_counter()
        for image, future in zip(images, futures):
            self._queue.put_nowait(_Item(image, future, now))
        self._set_waiting(self._waiting + len(images))
        results = await asyncio.gather(*futures, return_exceptions=True)  # retrieve every failure once
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    async def close(self, drain_timeout_s: float = 5.0) -> None:
        """Let admitted work finish (bounded), then stop and fail whatever is left."""
        deadline = time.perf_counter() + drain_timeout_s
        while (self._waiting or self._busy) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(BatcherClosedError("model was unloaded"))
        self._executor.shutdown(wait=False)

    def _set_waiting(self, n: int) -> None:
        self._waiting = n
        if self._observer is not None:
            self._observer.queue_depth(n)

    async def _collect_forever(self) -> None:
        while True:
            items = await self._collect()
            self._set_waiting(self._waiting - len(items))
            live = [item for item in items if not item.future.done()]  # skip callers that gave up
            if live:
                self._busy = True
                try:
                    await self._run_batch(live)
                finally:
                    self._busy = False

    async def _collect(self) -> list[_Item]:
        items = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait_s
        while len(items) < self.max_batch_size:
            if not self._queue.empty():
                items.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return items

    async def _run_batch(self, items: list[_Item]) -> None:
        start = time.perf_counter()
        waits = [start - item.enqueued for item in items]
        try:
            images = [item.image for item in items]
            loop = asyncio.get_running_loop()
            scores, heatmaps = await loop.run_in_executor(self._executor, self._stack_and_run, images)
            if len(scores) != len(items) or len(heatmaps) != len(items):
                raise RuntimeError(f"model returned {len(scores)} scores for a batch of {len(items)}")
        except Exception as exc:
            self._report(len(items), time.perf_counter() - start, waits)
            error = BatchFailedError(f"{type(exc).__name__}: {exc}")
            for item in items:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        inference_s = time.perf_counter() - start
        self._report(len(items), inference_s, waits)
        for k, item in enumerate(items):
            if not item.future.done():
                result = ImageResult(float(scores[k]), heatmaps[k, 0], waits[k], inference_s, len(items))
                item.future.set_result(result)

    def _stack_and_run(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Runs in the inference thread: stacking large images is a copy the event loop need not wait on.
        A lone image (the usual case at low load) runs as a view, without a copy."""
        batch = images[0][np.newaxis] if len(images) == 1 else np.stack(images)
        return self._run(batch)

    def _report(self, size: int, inference_s: float, waits: list[float]) -> None:
        if self._observer is not None:
            self._observer.batch_done(size, inference_s, waits)
