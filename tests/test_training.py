"""The training loop, run configs, and the offline pipeline end to end (train → export → ONNX scores)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from mnemo import models
from mnemo.calibration import Calibration
from mnemo.training import config as run_config
from mnemo.training.run import summary_line
from mnemo.training.trainer import fit
from tests.conftest import TINY_CONFIGS, batch_for, tiny_model


def objective(logs: dict[str, float]) -> float:
    """What should fall: reconstruction where the loss has one (DAAD+'s adversarial part may rise)."""
    return logs.get("reconstruction", logs["loss"])


def test_a_few_training_steps_lower_the_loss(model_name):
    torch.manual_seed(0)
    model = tiny_model(model_name).train()
    x = batch_for(model, 8)
    cfg = run_config.resolve_optim(run_config.OptimConfig(lr=3e-3), model.config)
    optimizers = model.configure_optimizers(cfg)
    losses = [objective(model.training_step(x, optimizers)) for _ in range(25)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, f"{model_name}: loss went {first:.4g} → {last:.4g}"


def _loaders(n: int = 32):
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(n, 1, 28, 28, generator=gen))
    return DataLoader(data, batch_size=8, shuffle=True, generator=gen), DataLoader(data, batch_size=8)


def test_fit_checkpoints_stops_early_and_resumes(tmp_path):
    model = tiny_model("ae")
    train, val = _loaders()
    cfg = run_config.OptimConfig(lr=1e-3, batch_size=8, max_epochs=3, patience=10)
    state = fit(model, train, val, cfg, torch.device("cpu"), tmp_path, {}, progress=False)
    assert state.epoch == 3 and len(state.history) == 3
    assert (tmp_path / "best.pt").exists() and (tmp_path / "last.pt").exists()
    # resuming with a larger budget continues from epoch 3 rather than starting over
    more = run_config.OptimConfig(lr=1e-3, batch_size=8, max_epochs=5, patience=10)
    state = fit(
        tiny_model("ae"), train, val, more, torch.device("cpu"), tmp_path, {}, resume=True, progress=False
    )
    assert state.epoch == 5 and [h["epoch"] for h in state.history] == [1, 2, 3, 4, 5]


def test_early_stopping_counts_epochs_without_a_better_validation_loss(tmp_path, monkeypatch):
    val_losses = iter([3.0, 2.0, 2.5, 2.1, 2.2, 0.1])  # best at epoch 2, then three worse epochs
    monkeypatch.setattr("mnemo.training.trainer.validation_loss", lambda *a: next(val_losses))
    train, val = _loaders()
    cfg = run_config.OptimConfig(lr=1e-3, batch_size=8, max_epochs=50, patience=3)
    state = fit(tiny_model("ae"), train, val, cfg, torch.device("cpu"), tmp_path, {}, progress=False)
    assert state.epoch == 5 and state.best_epoch == 2 and state.best_val == 2.0


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    train, val = _loaders()
    cfg = run_config.OptimConfig(lr=1e-3, batch_size=8, max_epochs=1, patience=5)
    fit(tiny_model("ae"), train, val, cfg, torch.device("cpu"), tmp_path, {}, progress=False)
    with pytest.raises(ValueError, match="cannot resume"):
        fit(
            tiny_model("memae"),
            train,
            val,
            cfg,
            torch.device("cpu"),
            tmp_path,
            {},
            resume=True,
            progress=False,
        )


def test_resume_refuses_a_checkpoint_of_another_config_with_the_same_weights(tmp_path):
    """λ is not in the state dict: only the config comparison can tell the runs apart."""
    train, val = _loaders()
    cfg = run_config.OptimConfig(lr=1e-3, batch_size=8, max_epochs=1, patience=5)
    tiny = TINY_CONFIGS.get("memae", {})
    fit(models.create("memae", **tiny), train, val, cfg, torch.device("cpu"), tmp_path, {}, progress=False)
    other = models.create("memae", **tiny, shrink_threshold=0.0025)
    other.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=False)["model"])  # weights fit
    hint = re.escape("shrink_threshold: None -> 0.0025); to continue it as it was trained, add --set ")
    hint += re.escape("'model_config.shrink_threshold=null'")
    with pytest.raises(ValueError, match=hint):
        fit(other, train, val, cfg, torch.device("cpu"), tmp_path, {}, resume=True, progress=False)


def test_run_config_files_overrides_and_errors(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "rftm"\n[optim]\nlr = 0.0005\n[model_config]\nhippocampus = [50, 15, 0.1]\n')
    cfg = run_config.load(toml, ["optim.batch_size=64", "data.kind=idx"])
    assert (
        cfg.model == "rftm" and cfg.optim.lr == 5e-4 and cfg.optim.batch_size == 64 and cfg.data.kind == "idx"
    )
    run_config.save(cfg, tmp_path / "saved.yaml")
    assert run_config.load(tmp_path / "saved.yaml") == cfg
    assert run_config.load(None, ["optim.lr=1e-4"]).optim.lr == 1e-4  # YAML reads 1e-4 as text
    with pytest.raises(ValueError, match="unknown key"):
        run_config.load(None, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="must be float"):
        run_config.load(None, ["optim.lr=fast"])
    with pytest.raises(FileNotFoundError):
        run_config.load(tmp_path / "missing.yaml")


def test_paper_optimiser_defaults_fill_only_unset_fields():
    daad = tiny_model("daad").config
    assert run_config.resolve_optim(run_config.OptimConfig(), daad).lr == 1e-4
    assert run_config.resolve_optim(run_config.OptimConfig(), daad).batch_size == 8
    assert run_config.resolve_optim(run_config.OptimConfig(lr=0.01), daad).lr == 0.01
    assert run_config.resolve_optim(run_config.OptimConfig(), tiny_model("ae").config).lr == 1e-3


def mnemo(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "mnemo", *args], capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"mnemo {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data, run = root / "data", root / "run"
    mnemo(
        "data", "synth", str(data), "--size", "32", "--train", "40", "--test-good", "8", "--test-defect", "3"
    )
    overrides = ["model_config.image_size=32", "model_config.hidden_dims=[64,32,16]", "optim.batch_size=16"]
    args = [
        "train",
        "--model",
        "memae",
        "--data",
        str(data),
        "--out",
        str(run),
        "--epochs",
        "2",
        "--no-progress",
    ]
    mnemo(*args, *[a for o in overrides for a in ("--set", o)])
    return root, data, run


def test_train_writes_a_complete_run_directory(trained_run):
    _, _, run = trained_run
    for name in ("config.yaml", "best.pt", "model.pt", "samples.pt", "history.json", "calibration.json"):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    assert report["epochs"] == 2 and report["data"]["counts"]["test_anomalous"] == 15
    config = yaml.safe_load((run / "config.yaml").read_text())
    resolved = report["model_config"]  # every field, also those config.yaml leaves to the defaults
    assert set(config["model_config"]) < set(resolved)
    assert all(resolved[k] == v for k, v in config["model_config"].items())
    image = report["test"]["image"]
    assert 0 <= image["auroc"] <= 1 and 0 <= image["auprc"] <= 1 and 0 <= image["f1"] <= 1
    assert 0 <= report["test"]["pixel"]["pro"] <= 1
    for plot in ("roc.png", "pr.png", "scores.png", "examples.png"):
        assert (run / "plots" / plot).stat().st_size > 1000
    calibration = json.loads((run / "calibration.json").read_text())
    assert calibration["method"] == "false_alarm_rate" and calibration["n"] == 4  # 10 % of 40 held out
    assert "calibrated on 4 good images" in report["calibration_warning"]  # 4 cannot resolve 1 %


def test_exported_bundle_scores_like_pytorch_in_onnxruntime_without_torch(trained_run):
    root, data, run = trained_run
    bundle = root / "bundle"
    mnemo("export", str(run), "--out", str(bundle), "--name", "brick", "--version", "7")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["name"] == "brick" and manifest["version"] == "7" and manifest["architecture"] == "memae"
    assert set(manifest["files"]) == {"model.onnx", "model.ts", "reconstruction.onnx"}  # MemAE reconstructs

    images = sorted((data / "test").rglob("*.png"))[:6]
    # Offline: the run's PyTorch model through the training data pipeline.
    from mnemo.imaging import Preprocessing, preprocess_batch
    from mnemo.training.run import load_model

    prep = Preprocessing.from_dict(manifest["preprocessing"])
    with torch.no_grad():
        expected = load_model(run).score(torch.from_numpy(preprocess_batch(images, prep)))[0].numpy()
    # Served: a fresh interpreter that must never import torch.
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np, onnxruntime as ort
        from mnemo.bundle import read_manifest
        from mnemo.imaging import Preprocessing, preprocess_batch
        m = read_manifest({str(bundle)!r})
        x = preprocess_batch({[str(p) for p in images]!r}, Preprocessing.from_dict(m.preprocessing))
        s = ort.InferenceSession({str(bundle / "model.onnx")!r}, providers=["CPUExecutionProvider"])
        score, heat = s.run(None, {{"image": x}})
        assert "torch" not in sys.modules, "the ONNX path imported torch"
        print(json.dumps({{"score": score.tolist(), "heat": list(heat.shape)}}))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    served = json.loads(out.stdout)
    assert served["heat"] == [6, 1, 32, 32]
    torch.testing.assert_close(
        torch.tensor(served["score"]), torch.from_numpy(expected), atol=1e-4, rtol=1e-4
    )


def test_export_can_ship_the_best_f1_or_a_manual_threshold(trained_run):
    root, _, run = trained_run
    calibration = json.loads((run / "calibration.json").read_text())
    mnemo("export", str(run), "--out", str(root / "f1"), "--threshold", "best_f1")
    shipped = json.loads((root / "f1" / "manifest.json").read_text())["calibration"]
    assert shipped["method"] == "best_f1" and shipped["threshold"] == calibration["best_f1_threshold"]
    mnemo("export", str(run), "--out", str(root / "manual"), "--threshold", "0.25")
    shipped = json.loads((root / "manual" / "manifest.json").read_text())["calibration"]
    assert shipped == {**calibration, "threshold": 0.25, "method": "manual"}
    bad = mnemo("export", str(run), "--out", str(root / "bad"), "--threshold", "loose", check=False)
    assert bad.returncode == 2 and "--threshold must be" in bad.stderr


def test_export_of_a_missing_run_is_a_clear_error(tmp_path):
    result = mnemo("export", str(tmp_path / "nope"), "--out", str(tmp_path / "b"), check=False)
    assert result.returncode == 2 and "model.pt" in result.stderr and "Traceback" not in result.stderr


def test_train_on_a_missing_directory_is_a_clear_error(tmp_path):
    out = str(tmp_path / "r")
    result = mnemo("train", "--model", "ae", "--data", str(tmp_path / "nowhere"), "--out", out, check=False)
    assert result.returncode == 2
    assert "nowhere" in result.stderr and "Traceback" not in result.stderr


def test_unknown_model_on_the_command_line_lists_the_known_ones(tmp_path):
    result = mnemo("train", "--model", "memea", "--data", str(tmp_path), check=False)
    assert result.returncode == 2 and "unknown model 'memea'" in result.stderr and "memae" in result.stderr


def test_a_bundle_exports_again_with_its_calibration_and_the_same_scores(trained_run):
    root, _, run = trained_run
    old, new = root / "old-bundle", root / "new-bundle"
    mnemo("export", str(run), "--out", str(old), "--version", "1")
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "reconstruction.onnx").unlink()  # as bundles were before reconstructions were exported
    del manifest["files"]["reconstruction.onnx"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    mnemo("export", str(old), "--out", str(new), "--version", "2")
    again = json.loads((new / "manifest.json").read_text())
    assert again["calibration"] == manifest["calibration"] and again["training"]["exported_again_from"] == "1"
    assert set(again["files"]) == {"model.onnx", "model.ts", "reconstruction.onnx"}
    x = np.random.default_rng(0).normal(size=(3, 1, 32, 32)).astype(np.float32)
    before, after = (ort.InferenceSession(str(b / "model.onnx")).run(None, {"image": x}) for b in (old, new))
    assert all(np.array_equal(u, v) for u, v in zip(before, after))
    refused = mnemo("export", str(old), "--out", str(root / "x"), "--threshold", "best_f1", check=False)
    assert refused.returncode == 2 and "keeps its calibration" in refused.stderr


@pytest.mark.parametrize(
    ("test", "expected"),
    [
        ({}, "done: no test "),
        (
            {
                "n_images": 3,
                "n_anomalous": 3,
                "at_threshold": {"false_alarm_rate": None, "detection_rate": 1 / 3},
            },
            "done: no AUROC: the test split has no good images (add test/good); 33% of its 3 anomalous ones",
        ),
        (
            {
                "n_images": 4,
                "n_anomalous": 0,
                "at_threshold": {"false_alarm_rate": 0.25, "detection_rate": None},
            },
            "done: no AUROC: the test split has no anomalous images (add test/<defect>); 25% of its 4 good",
        ),
    ],
    ids=["no-test", "no-good-images", "no-anomalous-images"],
)
def test_the_summary_says_why_a_test_split_has_no_metrics(test, expected):
    calibration = Calibration(threshold=0.5, method="false_alarm_rate", target=0.01, quantiles=(0.5,), n=1)
    assert summary_line({"test": test}, calibration).startswith(expected)
