"""Runner choices that depend on the model: the automatic ONNX Runtime thread count."""

from __future__ import annotations

from pathlib import Path

from mnemo.bundle import ONNX_FILE
from mnemo.service import backends
from tests.service_helpers import export_tiny_bundle

pytest_plugins = ["tests.service_fixtures"]


def spins(runner: backends.OnnxRunner) -> bool:
    options = runner.session.get_session_options()
    return options.get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_auto_settings_give_a_cheap_model_one_quiet_thread_and_a_heavy_one_every_spinning_core(
    bundle_dir, monkeypatch
):
    path = Path(bundle_dir) / "gray" / ONNX_FILE
    monkeypatch.setattr(backends, "usable_cores", lambda: 2)
    cheap = backends.OnnxRunner(path, "cpu")  # a tiny AE: far under 5 ms an image
    assert (cheap.threads, cheap.spinning, spins(cheap)) == (1, False, False)
    monkeypatch.setattr(backends, "ONE_THREAD_MS_PER_IMAGE", 0.0)  # as if every model were heavy
    heavy = backends.OnnxRunner(path, "cpu")
    assert (heavy.threads, heavy.spinning, spins(heavy)) == (0, True, True)
    fixed = backends.OnnxRunner(path, "cpu", threads=3, spinning=False)  # explicit choices are kept
    assert (fixed.threads, fixed.spinning, spins(fixed)) == (3, False, False)
    monkeypatch.setattr(backends, "usable_cores", lambda: 1)
    assert backends.OnnxRunner(path, "cpu").threads == 0  # one core: no thread count to choose


def test_the_probe_times_a_real_batch(tmp_path):
    runner = backends.OnnxRunner(export_tiny_bundle(tmp_path, "tiny") / ONNX_FILE, "cpu", threads=1)
    assert 0 < runner.ms_per_image() < 1000
