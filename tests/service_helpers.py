"""Helpers for the service tests: export real tiny bundles, run a real uvicorn server, make test images.

The fixtures built on them live in ``tests/service_fixtures.py`` (loaded with ``pytest_plugins``).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from fastapi import FastAPI

from mnemo import models
from mnemo.imaging import Preprocessing
from mnemo.service.app import create_app
from mnemo.service.server import server_config
from mnemo.service.settings import Settings
from mnemo.training.calibration import calibrate
from mnemo.training.export import export_bundle

# Two tiny models that exercise both channel counts and both resize policies.
BUNDLE_SPECS = {
    "gray": dict(model=dict(hidden_dims=(64, 32, 16)), resize="resize"),
    "color": dict(model=dict(hidden_dims=(32, 16), in_channels=3, image_size=16, mean=(0.5,), std=(0.5,)),
                  resize="center_crop"),
}  # fmt: skip


def smooth_images(n: int, channels: int, size: int, seed: int = 0) -> np.ndarray:
    """'Normal' uint8 images [n, size, size, channels]: gentle gradients plus a little noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    base = 90 + 60 * (ramp[None, :, None] + ramp[:, None, None]) / 2
    noise = rng.normal(0, 4, (n, size, size, channels))
    return np.clip(base[None] + noise, 0, 255).astype(np.uint8)


def defect_image(channels: int, size: int, seed: int = 99) -> np.ndarray:
    """A normal-looking image with a black square blotch: should score higher than normal ones."""
    image = smooth_images(1, channels, size, seed)[0].copy()
    image[size // 4 : size // 2, size // 4 : size // 2] = 0
    return image


def export_tiny_bundle(
    out_dir: Path, name: str, version: str = "1", seed: int = 0, spec: str = "gray"
) -> Path:
    """Export a tiny untrained AE with a calibration computed from its scores and heatmaps on 'normal'
    images (pixel level at 1 % of their pixels, so that a defect surely makes regions)."""
    torch.manual_seed(seed)
    model = models.create("ae", **BUNDLE_SPECS[spec]["model"]).eval()
    cfg = model.config
    pre = Preprocessing.from_model_config(cfg, BUNDLE_SPECS[spec]["resize"])
    normal = smooth_images(64, cfg.in_channels, cfg.image_size, seed=1)
    x = normalised(normal, pre)
    with torch.no_grad():
        scores, heatmaps = (t.numpy() for t in model(torch.from_numpy(x)))
    calibration = calibrate(
        scores, false_alarm_rate=0.05, normal_heatmaps=heatmaps, pixel_false_alarm_rate=0.01
    )
    export_bundle(
        model, out_dir / name, name=name, version=version, preprocessing=pre.to_dict(),
        calibration=calibration.to_dict(), samples=torch.from_numpy(x[:4]),
    )  # fmt: skip
    return out_dir / name


def normalised(images: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """uint8 [n, H, W, C] already at model size → float32 [n, C, H, W] in the model's normalisation."""
    from mnemo.imaging import prepare_pixels

    return np.stack([prepare_pixels(image.astype(np.float32), pre) for image in images])


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def running_server(
    settings: Settings,
    app: FastAPI | None = None,
    timeout_s: float = 20.0,
    ready: bool = True,
    shortcut: bool = True,
) -> Iterator[str]:
    """Serve ``app`` (default ``create_app(settings)``) with uvicorn, configured as ``mnemo serve`` does
    it (``server_config``: the guarded protocol and its limits, the score shortcut unless ``shortcut`` is
    False), on an ephemeral loopback port until it is ready (``ready=False``: until its start-up load has
    finished, ready or not); yields the base URL."""
    app = app or create_app(settings)
    sock = free_socket()
    config = server_config(settings, app, shortcut=shortcut, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + timeout_s
        while not (server.started and (_ready(url) if ready else app.state.store.started)):
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test server did not become ready")
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _ready(url: str) -> bool:
    return httpx.get(f"{url}/readyz", timeout=2).status_code == 200


def make_settings(model_dir: Path, **overrides) -> Settings:
    return Settings(model_dir=model_dir, **overrides)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Read one sample from Prometheus text; 0 when the series does not exist yet."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series, _, label_text = head.partition("{")
        if series != name:
            continue
        found = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if part)
        if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
            return float(value)
    return 0.0
