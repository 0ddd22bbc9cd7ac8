"""Every knob of the scoring service, read from ``MNEMO_*`` environment variables (or ``mnemo serve`` flags).

Defaults favour a single line camera on a small CPU box: a lone image runs at once, and under load the
images that queued while a batch ran form the next one (up to 16); at most 1024 images, and no more than
about 2 s of the model's work, may wait per model, and a request gives up after 10 s. The limits that
protect the service from its clients (sizes, pixels, slow connections) are listed together in
docs/security.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mnemo.imaging import DEFAULT_MAX_PIXELS

Backend = Literal["auto", "onnxruntime", "torchscript"]
ReadyRequires = Literal["all", "any"]


class Settings(BaseSettings):
    """Service settings; each field is also the env var ``MNEMO_<FIELD>`` (e.g. ``MNEMO_MAX_BATCH_SIZE``)."""

    model_config = SettingsConfigDict(env_prefix="MNEMO_", frozen=True, extra="ignore")

    model_dir: Path = Field(
        Path("bundles"),
        description="directory of model bundles (one per subdirectory), or a single bundle directory",
    )
    host: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0 for all)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    workers: int = Field(
        1,
        ge=1,
        description="service processes sharing the port (service/workers.py): each loads the models and "
        "runs its own HTTP event loop and inference lane, so HTTP parsing and decoding use more than one "
        "core; memory grows with each (brick: ~120 MB a worker)",
    )
    worker_start_timeout_s: float = Field(
        120.0,
        gt=0,
        description="with several workers: how long a new worker of a rolling restart may take to load "
        "and warm its models; one not serving by then is killed and the old one kept",
    )
    grpc_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="also serve the Open Inference Protocol over gRPC on this port (same host); 0 = off; "
        "needs grpcio (pip install 'mnemo[grpc]')",
    )
    backend: Backend = Field(
        "auto", description="auto (= onnxruntime), onnxruntime or torchscript (needs torch installed)"
    )
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime threads per inference call; 0 = auto: one thread for a model that takes "
        "under 5 ms an image on it (the other cores then serve requests), else every core",
    )
    ort_spinning: Literal["auto"] | bool = Field(
        "auto",
        description="let idle ONNX Runtime threads spin between batches (1/0). auto: only for a model that "
        "takes 5 ms an image or more, whose batches keep the cores busy anyway (DAAD 256 on 2 cores: 0.69 -> "
        "0.92 of raw throughput at c=32); a small model's spinning threads would take the CPU its requests "
        "need (brick: -45 % at c=64)",
    )
    max_batch_size: int = Field(16, ge=1, description="most images run together in one inference call")
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        description="longest a queued image waits for batch mates; 0 = greedy: a batch is whatever queued "
        "while the previous one ran (lowest latency when alone, full batches under load)",
    )
    max_queue: int = Field(
        1024, ge=1, description="most images waiting per model; beyond it requests get 503 + Retry-After"
    )
    max_queue_wait_s: float = Field(
        2.0,
        ge=0,
        description="most work waiting per model ahead of a request, in seconds at its measured speed per "
        "image; beyond it requests get 503 + Retry-After; 0 = only MNEMO_MAX_QUEUE counts",
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with a queue-full 503")
    request_timeout_s: float = Field(
        10.0,
        gt=0,
        description="per-request limit for decoding + queue + inference, once the upload is in (504)",
    )
    max_upload_bytes: int = Field(20 * 2**20, ge=1, description="largest request body accepted (413)")
    max_files: int = Field(16, ge=1, description="most images in one multipart request")
    max_image_pixels: int = Field(
        DEFAULT_MAX_PIXELS,
        ge=1,
        description="largest image (width × height as its header declares); more is a bomb (400 too_large)",
    )
    max_request_pixels: int = Field(
        2 * DEFAULT_MAX_PIXELS,
        ge=1,
        description="most pixels one request's images declare together; more is refused before anything "
        "is decoded (400 request_too_large)",
    )
    decode_concurrency: int = Field(
        4,
        ge=1,
        description="images decoded at once; large ones (over 4 MP) get at most this - 1 of the slots, so "
        "small images always find one free",
    )
    max_header_bytes: int = Field(
        32768,
        ge=1024,
        description="longest request line + headers; more is answered 431 and the connection closed",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request's headers must be complete this long after it starts (else 408)"
    )
    body_timeout_s: float = Field(
        10.0, gt=0, description="longest silence while a request body is being received (else 408 and close)"
    )
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="idle kept-alive connections close after this")
    shutdown_timeout_s: float = Field(
        5.0,
        ge=0,
        description="on SIGTERM/SIGINT, longest wait for running requests before they are cancelled",
    )
    ready_requires: ReadyRequires = Field(
        "all",
        description="when /readyz answers 200: all = every bundle in the model directory is served, "
        "any = at least one is",
    )
    heatmap_grid_size: int = Field(32, ge=1, le=256, description="side of the float-grid heatmap format")
    capture_dir: Path | None = Field(
        None,
        description="review capture: save anomalous images (and a share of ok ones) with their answer "
        "here (service/capture.py); off when unset",
    )
    capture_ok_fraction: float = Field(0.0, ge=0.0, le=1.0, description="share of ok images captured too")
    capture_max_mb: float = Field(
        1024.0, gt=0, description="size cap of the capture folder in MiB; the oldest captures go first"
    )
    capture_queue: int = Field(
        64, ge=1, description="captures waiting for the writer; more are dropped, never waited for"
    )
    api_key: SecretStr | None = Field(
        None, description="when set, /v1 requests must send it (off by default)"
    )
    api_key_header: str = Field("X-API-Key", description="header that carries the API key")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="log level"
    )

    @model_validator(mode="after")
    def _queue_fits_a_request(self) -> Settings:
        # Otherwise a full-size multipart request could never be admitted and would always get 503.
        if self.max_queue < self.max_files:
            raise ValueError(f"max_queue ({self.max_queue}) must be >= max_files ({self.max_files})")
        return self

    @model_validator(mode="after")
    def _key_fits_a_header(self) -> Settings:
        # Past ASCII, clients encode a header differently (curl UTF-8; the server decodes Latin-1) and gRPC
        # metadata refuses it: such a key could never match. (A model validator: a field validator's
        # error would echo the key.)
        key = self.api_key.get_secret_value() if self.api_key is not None else ""
        if not (key.isascii() and key.isprintable()):
            raise ValueError("the API key must be printable ASCII: it travels in an HTTP header")
        return self
