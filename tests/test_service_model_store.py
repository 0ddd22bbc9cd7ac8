"""Bundle loading: verification, refusal of bad bundles, reload semantics, and both backends."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest

from mnemo.bundle import ONNX_FILE
from mnemo.service import model_store
from mnemo.service.backends import OnnxRunner, TorchScriptRunner
from mnemo.service.metrics import ServiceMetrics
from mnemo.service.model_store import ModelStore, public_reason
from tests.service_helpers import export_tiny_bundle, make_settings

pytest_plugins = ["tests.service_fixtures"]  # the shared fixtures: bundle_dir, server


def in_loop(steps):
    """Run ``steps()`` in one event loop: batchers belong to the loop that started them."""
    return asyncio.run(asyncio.wait_for(steps(), timeout=60))


def copy_bundles(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_manifest(bundle: Path, **changes) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_good_bundles_load_and_bad_ones_are_refused_with_a_clear_log_line(bundle_dir, tmp_path, caplog):
    root = copy_bundles(bundle_dir, tmp_path / "models")
    shutil.copytree(root / "gray", root / "corrupt")
    (root / "corrupt" / ONNX_FILE).write_bytes(b"\0" * 64)  # bytes no longer match the sha256
    shutil.copytree(root / "gray", root / "mismatched")
    edit_manifest(root / "mismatched", name="mismatched", preprocessing={"channels": 1, "size": 32})
    shutil.copytree(root / "gray", root / "twin")  # same manifest name as "gray"
    (root / "not_a_bundle").mkdir()
    (root / ".staging-123").mkdir()  # export_bundle's hidden staging directories are ignored
    store = ModelStore(make_settings(root, max_batch_size=4), ServiceMetrics())

    async def steps():
        report = await store.reload()
        await store.close()
        return report

    with caplog.at_level(logging.ERROR, logger="mnemo.service"):
        report = in_loop(steps)
    assert sorted(report.loaded) == ["color", "gray"]
    reasons = report.failed  # keyed by the folder under the model directory, not the server's path
    assert set(reasons) == {"corrupt", "mismatched", "twin", "not_a_bundle"}
    assert not any(str(tmp_path) in reason for reason in reasons.values()), reasons
    assert reasons["corrupt"].startswith("MNEMO_MODEL_DIR/corrupt: model.onnx is corrupt")
    assert "graph input [1, 28, 28] != manifest preprocessing [1, 32, 32]" in reasons["mismatched"]
    assert reasons["twin"] == "model name 'gray' is already served from MNEMO_MODEL_DIR/gray"
    assert "no manifest.json" in reasons["not_a_bundle"]
    assert sum("refused model bundle" in r.getMessage() for r in caplog.records) == 4


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold", float("nan")),
        ("threshold", float("inf")),
        ("threshold", "0.1"),
        ("quantiles", [0.1, float("nan")]),
    ],
    ids=["nan-threshold", "infinite-threshold", "text-threshold", "nan-quantile"],
)
def test_a_calibration_that_is_no_finite_number_is_refused_at_load(bundle_dir, tmp_path, field, value):
    """Found by a hostile sweep: a NaN threshold loaded and answered every image ok; a text one loaded and
    failed every request with a 500."""
    root = copy_bundles(bundle_dir, tmp_path / "models")
    manifest = json.loads((root / "gray" / "manifest.json").read_text())
    edit_manifest(root / "gray", calibration={**manifest["calibration"], field: value})
    store = ModelStore(make_settings(root), ServiceMetrics())

    async def steps():
        report = await store.reload()
        await store.close()
        return report

    report = in_loop(steps)
    assert report.loaded == ["color"]
    assert "must be finite numbers" in report.failed["gray"]


def test_reload_keeps_old_version_on_failure_replaces_on_success_and_unloads_removed(bundle_dir, tmp_path):
    root = copy_bundles(bundle_dir, tmp_path / "models")
    store = ModelStore(make_settings(root), ServiceMetrics())

    async def steps():
        await store.reload()
        gray, color = store.models["gray"], store.models["color"]
        (root / "gray" / ONNX_FILE).write_bytes(b"broken")
        report = await store.reload()
        assert report.kept == ["gray"] and store.models["gray"] is gray  # old version keeps serving
        assert report.unchanged == ["color"] and store.models["color"] is color  # no needless re-load
        [still] = await gray.batcher.submit(np.zeros((1, 1, 28, 28), np.float32))
        assert np.isfinite(still.score)

        export_tiny_bundle(root, "gray", version="2", seed=3)
        shutil.rmtree(root / "color")
        report = await store.reload()
        assert report.loaded == ["gray"] and store.models["gray"].manifest.version == "2"
        assert report.removed == ["color"] and "color" not in store.models
        assert not gray.batcher.running  # the replaced version's batcher was stopped
        await store.close()

    in_loop(steps)


def test_missing_model_dir_is_a_reported_failure_not_a_crash(tmp_path):
    store = ModelStore(make_settings(tmp_path / "nowhere"), ServiceMetrics())
    report = in_loop(store.reload)
    assert store.models == {} and list(report.failed) == ["."]
    assert report.failed["."] == "model directory MNEMO_MODEL_DIR does not exist"


def test_a_single_bundle_directory_can_be_served_directly(bundle_dir):
    store = ModelStore(make_settings(bundle_dir / "color"), ServiceMetrics())

    async def steps():
        await store.reload()
        names = list(store.models)
        await store.close()
        return names

    assert in_loop(steps) == ["color"]


def test_torchscript_and_onnx_runners_agree(bundle_dir):
    x = np.random.default_rng(0).normal(size=(3, 3, 16, 16)).astype(np.float32)
    onnx = OnnxRunner(bundle_dir / "color" / "model.onnx", device="cpu")
    ts = TorchScriptRunner(bundle_dir / "color" / "model.ts", device="cpu")
    (s1, h1), (s2, h2) = onnx.run(x), ts.run(x)
    assert s1.shape == (3,) and h1.shape == (3, 1, 16, 16) and onnx.input_shape == (3, 16, 16)
    np.testing.assert_allclose(s1, s2, atol=1e-4)
    np.testing.assert_allclose(h1, h2, atol=1e-4)
    assert onnx.device == "cpu" and ts.device == "cpu"


@pytest.mark.parametrize(("env", "expected"), [(None, "0"), ("1", "1"), ("false", "0")])
def test_ort_spinning_follows_its_setting(bundle_dir, monkeypatch, env, expected):
    monkeypatch.delenv("MNEMO_ORT_SPINNING", raising=False)
    if env is not None:
        monkeypatch.setenv("MNEMO_ORT_SPINNING", env)
    store = ModelStore(make_settings(bundle_dir / "color"), ServiceMetrics())

    async def spinning():
        await store.reload()
        options = store.get("color").runner.session.get_session_options()
        await store.close()
        return options.get_session_config_entry("session.intra_op.allow_spinning")

    assert in_loop(spinning) == expected


def test_onnx_provider_choice():
    cpu_only = ["CPUExecutionProvider"]
    with_cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert OnnxRunner._providers(cpu_only, "auto") == ["CPUExecutionProvider"]
    assert OnnxRunner._providers(with_cuda, "cpu") == ["CPUExecutionProvider"]
    assert OnnxRunner._providers(with_cuda, "cuda:1")[0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert OnnxRunner._providers(with_cuda, "auto")[-1] == "CPUExecutionProvider"  # CPU fallback kept
    with pytest.raises(RuntimeError, match="no CUDA provider"):
        OnnxRunner._providers(cpu_only, "cuda")


def test_a_retired_model_is_freed_although_the_store_froze_the_start_up_objects(
    bundle_dir, tmp_path, monkeypatch
):
    root = copy_bundles(bundle_dir, tmp_path / "models")
    store = ModelStore(make_settings(root), ServiceMetrics())

    async def steps():
        await store.load_at_start()  # ends with gc.freeze()
        old = weakref.ref(store.models["gray"].runner)
        export_tiny_bundle(root, "gray", version="2", seed=3)
        await store.reload()  # replaces gray: the old version is retired
        gone_at_once = old() is None
        await store.reload()  # nothing retired: nothing to give back
        await store.close()
        return gone_at_once

    trims = []
    monkeypatch.setattr(model_store, "release_free_memory", lambda: trims.append(1))
    # its ONNX Runtime session is gone when the reload returns, not frozen for good, and its memory goes
    # back to the system (40 brick copies loaded, 39 removed: 259 MB resident without, 106 MB with)
    assert in_loop(steps) and trims == [1]


def test_public_reasons_hide_every_absolute_path(tmp_path):
    """Found in review: ONNX Runtime names a symlinked bundle by its resolved path, and an external-data
    file by wherever it points; neither is the model directory's path."""
    releases = tmp_path / "releases" / "v7"
    releases.mkdir(parents=True)
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    (model_dir / "current").symlink_to(releases)
    reason = f'data "{releases}/weights.bin" missing; resolved "/etc/hostname"; dir {model_dir}'
    shown = public_reason(reason, model_dir, model_dir / "current")
    assert (
        shown == 'data "MNEMO_MODEL_DIR/current/weights.bin" missing; resolved "<path>"; dir MNEMO_MODEL_DIR'
    )
    plain = "ratio 1/N, MNEMO_MODEL_DIR/a and/or b, see https://onnx.ai/x"  # no absolute path: unchanged
    assert public_reason(plain, model_dir) == plain
    itself = public_reason(f"{model_dir}/model.onnx is corrupt", model_dir, model_dir)  # one bundle
    assert itself == "MNEMO_MODEL_DIR/model.onnx is corrupt"
