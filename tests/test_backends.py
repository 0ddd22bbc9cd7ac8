"""Runner choices that depend on the model: the automatic ONNX Runtime thread count."""

from __future__ import annotations

from pathlib import Path

from mnemo.bundle import ONNX_FILE
from mnemo.service import backends
from tests.service_helpers import export_tiny_bundle

pytest_plugins = ["tests.service_fixtures"]


def test_auto_threads_give_a_cheap_model_one_thread_and_a_heavy_one_every_core(bundle_dir, monkeypatch):
    path = Path(bundle_dir) / "gray" / ONNX_FILE
    monkeypatch.setattr(backends, "usable_cores", lambda: 2)
    assert backends.OnnxRunner(path, "cpu").threads == 1  # a tiny AE: far under 5 ms an image
    monkeypatch.setattr(backends, "ONE_THREAD_MS_PER_IMAGE", 0.0)  # as if every model were heavy
    assert backends.OnnxRunner(path, "cpu").threads == 0
    assert backends.OnnxRunner(path, "cpu", threads=3).threads == 3  # an explicit count is kept
    monkeypatch.setattr(backends, "usable_cores", lambda: 1)
    assert backends.OnnxRunner(path, "cpu").threads == 0  # one core: nothing to choose


def test_the_probe_times_a_real_batch(tmp_path):
    runner = backends.OnnxRunner(export_tiny_bundle(tmp_path, "tiny") / ONNX_FILE, "cpu", threads=1)
    assert 0 < runner.ms_per_image() < 1000
