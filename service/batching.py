"""Per-model dynamic batching: group queued images into one inference call, in the model's own thread.

Callers ``await submit(images)``; the model's inference thread takes the first waiting image, then keeps
taking more until ``max_batch_size`` images are in hand or ``max_wait_s`` has passed since the first (with
``max_wait_s = 0`` it takes only what is already queued: greedy batching, where the images that arrived
while the previous batch ran form the next one), runs the batch, and hands every result back to the event
loop in one call. The event loop is not on the inference lane (issue 17): collecting a batch needs no
turn of the loop, so under load ONNX Runtime runs batch after batch while the loop parses requests.
Admission is bounded twice (``QueueFullError``): by ``max_queue`` waiting images (memory), and by the
work waiting ahead of a request, ``max_queue_wait_s`` of it at the model's measured seconds per image
(latency). A count alone is wrong both ways: 256 images are 0.15 s of work for a small model, whose
clients were refused while it could have answered them in time, and 7 s for a 256 px DAAD, whose clients
waited only to time out. Only the work *ahead* counts, so a large request (a tiled frame) is admitted
whenever the queue ahead of it is short, as a small one is, and never starved by a stream of small ones.
The speed is the median of the last batches' seconds per image (one slow batch, the first of a fresh
session or a pause, does not shut the door). A failing batch fails only the callers in it. A caller that
gives up cancels its ``submit`` (``service/scoring.py`` does so at the request's deadline and when its
client disconnects): that cancels its images' futures, and the thread drops cancelled images when it
forms a batch, so they are never computed (an image already in a running batch is computed, and its
result dropped).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

RunFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
SPEED_WINDOW = 15  # batches whose median seconds per image is the model's speed
SPEED_MIN_BATCHES = 3  # the wait budget applies from then on (before it, the count alone)


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
        max_queue_wait_s: float = 0.0,
        observer: BatchObserver | None = None,
        name: str = "model",
    ) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.max_queue_wait_s = max_queue_wait_s  # 0: no latency bound, the count alone
        self._recent_image_s: deque[float] = deque(maxlen=SPEED_WINDOW)  # the inference thread's
        self._image_s: float | None = None  # their median, once SPEED_MIN_BATCHES have run
        self._observer = observer
        self._name = name
        self._pending: deque[_Item] = deque()
        self._ready = threading.Condition()  # guards _pending, _waiting, _stopping
        self._waiting = 0  # admitted, not yet handed to inference (queued or being collected)
        self._busy = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the inference thread; call from the running event loop (results are delivered to it)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._serve_forever, name=f"infer-{self._name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._waiting

    @property
    def running(self) -> bool:
        """Whether it accepts work: started, and not closed."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    async def submit(self, images: Sequence[np.ndarray]) -> list[ImageResult]:
        """Queue N images, each [C, H, W] (a list, or an [N, C, H, W] array), as N items; all-or-nothing
        admission so a request is never split."""
        if not self.running:
            raise BatcherClosedError("model is not running")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        now = time.perf_counter()
        with self._ready:
            self._admit(len(images))
            self._pending.extend(_Item(image, future, now) for image, future in zip(images, futures))
            self._waiting += len(images)
            depth = self._waiting
            self._ready.notify()
        self._depth(depth)
        results = await asyncio.gather(*futures, return_exceptions=True)  # retrieve every failure once
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    async def close(self, drain_timeout_s: float = 5.0) -> None:
        """Let admitted work finish (bounded), then stop the thread and fail whatever is left."""
        deadline = time.perf_counter() + drain_timeout_s
        while (self._waiting or self._busy) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        with self._ready:
            self._stopping = True
            left, self._waiting = list(self._pending), 0
            self._pending.clear()
            self._ready.notify_all()
        for item in left:
            if not item.future.done():
                item.future.set_exception(BatcherClosedError("model was unloaded"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, drain_timeout_s)

    def _admit(self, n: int) -> None:
        """Refuse ``n`` more images beyond the count, or beyond the wait budget (under ``_ready``)."""
        if self._waiting + n > self.max_queue:
            raise QueueFullError(f"{self._waiting} images already waiting (limit {self.max_queue})")
        if self.max_queue_wait_s and self._image_s is not None:
            ahead_s = self._waiting * self._image_s
            if ahead_s > self.max_queue_wait_s:
                raise QueueFullError(
                    f"{self._waiting} images already waiting, about {ahead_s:.2f} s of work "
                    f"(limit {self.max_queue_wait_s:g} s)"
                )

    def _depth(self, n: int) -> None:
        if self._observer is not None:
            self._observer.queue_depth(n)

    # ----------------------------------------------------------------------------- inference thread

    def _serve_forever(self) -> None:
        while (items := self._collect()) is not None:
            live = [item for item in items if not item.future.done()]  # skip callers that gave up
            if live:
                self._busy = True
                try:
                    self._run_batch(live)
                finally:
                    self._busy = False

    def _collect(self) -> list[_Item] | None:
        """Block for the first image, then gather more as the batching rule says; None once stopping."""
        with self._ready:
            while not self._pending:
                if self._stopping:
                    return None
                self._ready.wait()
            items = [self._pending.popleft()]
            deadline = time.perf_counter() + self.max_wait_s
            while len(items) < self.max_batch_size:
                if self._pending:
                    items.append(self._pending.popleft())
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._stopping:
                    break
                self._ready.wait(remaining)
            self._waiting -= len(items)
            depth = self._waiting
        self._depth(depth)
        return items

    def _run_batch(self, items: list[_Item]) -> None:
        start = time.perf_counter()
        waits = [start - item.enqueued for item in items]
        try:
            scores, heatmaps = self._stack_and_run([item.image for item in items])
            if len(scores) != len(items) or len(heatmaps) != len(items):
                raise RuntimeError(f"model returned {len(scores)} scores for a batch of {len(items)}")
        except Exception as exc:
            self._report(len(items), time.perf_counter() - start, waits)
            error = BatchFailedError(f"{type(exc).__name__}: {exc}")
            self._loop.call_soon_threadsafe(_fail, items, error)
            return
        inference_s = time.perf_counter() - start
        self._learn_speed(inference_s / len(items))
        self._report(len(items), inference_s, waits)
        results = [
            ImageResult(float(scores[k]), heatmaps[k, 0], waits[k], inference_s, len(items))
            for k in range(len(items))
        ]
        self._loop.call_soon_threadsafe(_deliver, items, results)  # one wake-up of the loop per batch

    def _learn_speed(self, image_s: float) -> None:
        """Seconds per image of the batches as they run. Under load they are full, which is what a queued
        image will cost; at a burst's start the last ones were single images, which cost more per image,
        so the estimate errs towards refusing until the full batches fill the median's window."""
        self._recent_image_s.append(image_s)
        if len(self._recent_image_s) >= SPEED_MIN_BATCHES:
            self._image_s = statistics.median(self._recent_image_s)  # one float: read on the loop as is

    def _stack_and_run(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """A lone image (the usual case at low load) runs as a view, without a copy."""
        batch = images[0][np.newaxis] if len(images) == 1 else np.stack(images)
        return self._run(batch)

    def _report(self, size: int, inference_s: float, waits: list[float]) -> None:
        if self._observer is not None:
            self._observer.batch_done(size, inference_s, waits)


def _deliver(items: list[_Item], results: list[ImageResult]) -> None:
    """On the event loop: complete the batch's futures (those whose callers have not given up)."""
    for item, result in zip(items, results):
        if not item.future.done():
            item.future.set_result(result)


def _fail(items: list[_Item], error: Exception) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(error)
