"""Prometheus metrics, on a private ``CollectorRegistry`` per app (so tests and several apps never collide).

Names follow Prometheus conventions: ``mnemo_`` prefix, base units (seconds), ``_total`` on counters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

from mnemo.service.schemas import ModelInfo

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Scores have no common scale across architectures, so the score histogram spans decades; the p-value
# histogram is the scale-free drift signal (uniform on normal data, piling up near 0 under drift).
SCORE_BUCKETS = tuple(m * 10.0**e for e in range(-5, 4) for m in (1.0, 3.0))
P_VALUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
INFO_LABELS = ("model", "version", "architecture", "backend", "device")


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mnemo_requests", "Scoring requests by model and HTTP status", ["model", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "mnemo_request_duration_seconds", "End-to-end scoring request latency", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait_seconds = Histogram(
            "mnemo_queue_wait_seconds", "Time an image waited before its batch ran", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_seconds = Histogram(
            "mnemo_inference_duration_seconds", "Inference time per batch", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "mnemo_batch_size", "Images per inference batch", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "mnemo_queue_depth", "Images waiting for a batch (all workers)", ["model"], registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.images = Counter("mnemo_images_scored", "Images scored", ["model"], registry=r)
        self.verdicts = Counter(
            "mnemo_verdicts", "Verdicts by model and outcome", ["model", "verdict"], registry=r
        )
        self.scores = Histogram(
            "mnemo_anomaly_score", "Anomaly scores (for drift)", ["model"], buckets=SCORE_BUCKETS, registry=r
        )
        self.p_values = Histogram(
            "mnemo_p_value", "Calibrated p-values (for drift)", ["model"], buckets=P_VALUE_BUCKETS, registry=r
        )
        self.model_info = Gauge(
            "mnemo_model_info", "Loaded models (value 1) with their version and runtime",
            INFO_LABELS, registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.model_loaded = Gauge(
            "mnemo_model_loaded_timestamp_seconds", "When the model was loaded", ["model"], registry=r,
            multiprocess_mode="livemax",
        )  # fmt: skip
        self.errors = Counter("mnemo_errors", "Errors by kind", ["kind"], registry=r)
        self.captured = Counter(
            "mnemo_captured", "Images saved for review (MNEMO_CAPTURE_DIR)", ["model", "verdict"], registry=r
        )
        self.capture_dropped = Counter(
            "mnemo_capture_dropped", "Images meant for review but not saved", ["reason"], registry=r
        )
        self.ready = Gauge(
            "mnemo_ready", "1 once models are loaded and warmed (every worker)", registry=r,
            multiprocess_mode="livemin",
        )  # fmt: skip

    def observe_request(self, model: str, status: int, seconds: float) -> None:
        self.requests.labels(model, str(status)).inc()
        self.request_seconds.labels(model).observe(seconds)

    @contextlib.contextmanager
    def counting(self, unknown: str):
        """``with metrics.counting(UNKNOWN) as count:`` counts one scoring request, however it ends:
        by ``count.model`` (``unknown`` until the route names it) and the status (an ``ApiError``'s,
        200 when the body finishes, 500 on anything else)."""
        count = _RequestCount(unknown, time.perf_counter())
        try:
            yield count
            count.status = 200
        except Exception as exc:
            count.status = getattr(exc, "status", 500)
            raise
        finally:
            self.observe_request(count.model, count.status, time.perf_counter() - count.started)

    def for_model(self, model: str) -> ModelMetrics:
        return ModelMetrics(self, model)

    def set_model(self, info: ModelInfo) -> None:
        self.model_loaded.labels(info.name).set(info.loaded_at)
        self.model_info.labels(*_info_labels(info)).set(1)

    def drop_model(self, info: ModelInfo) -> None:
        """Forget an unloaded or replaced version, so ``mnemo_model_info`` lists only what is served. With
        several workers prometheus_client cannot remove a series: it reads 0 until this worker is replaced."""
        if _several_workers():
            self.model_info.labels(*_info_labels(info)).set(0)
            return
        with contextlib.suppress(KeyError):
            self.model_info.remove(*_info_labels(info))

    def close(self) -> None:
        """With several workers: take this worker's gauges out of the combined view as it stops (its
        counters and histograms stay counted)."""
        if _several_workers():
            multiprocess.mark_process_dead(os.getpid())

    def exposition_registry(self) -> CollectorRegistry:
        """What ``/metrics`` shows: this process's registry, or with several workers (prometheus_client's
        multiprocess mode, service/workers.py) every worker's values combined."""
        if not _several_workers():
            return self.registry
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined)
        return combined


def _several_workers() -> bool:
    """Whether this process is one of several workers (service/workers.py), its metrics shared on disk."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def _info_labels(info: ModelInfo) -> tuple[str, ...]:
    """The ``INFO_LABELS`` values, in order, from the facts ``/v1/models`` reports."""
    return info.name, info.version, info.architecture, info.backend, info.device


class ModelMetrics:
    """One model's series, label children bound once at load rather than looked up per image.

    Also the model's batcher observer (``queue_depth``, ``batch_done``).
    """

    def __init__(self, metrics: ServiceMetrics, model: str) -> None:
        self._images = metrics.images.labels(model)
        self._verdicts = {v: metrics.verdicts.labels(model, v) for v in ("ok", "anomalous")}
        self._scores = metrics.scores.labels(model)
        self._p_values = metrics.p_values.labels(model)
        self._depth = metrics.queue_depth.labels(model)
        self._size = metrics.batch_size.labels(model)
        self._inference = metrics.inference_seconds.labels(model)
        self._wait = metrics.queue_wait_seconds.labels(model)

    def queue_depth(self, depth: int) -> None:
        self._depth.set(depth)

    def batch_done(self, size: int, inference_s: float, queue_waits: list[float]) -> None:
        self._size.observe(size)
        self._inference.observe(inference_s)
        for wait in queue_waits:
            self._wait.observe(wait)

    def observe_image(self, score: float, p_value: float, verdict: str) -> None:
        self._images.inc()
        self._verdicts[verdict].inc()
        self._scores.observe(score)
        self._p_values.observe(p_value)


@dataclasses.dataclass
class _RequestCount:
    model: str
    started: float
    status: int = 500
