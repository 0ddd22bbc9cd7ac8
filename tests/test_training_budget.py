"""What a user of `mnemo train --data DIR` relies on: the default recipe, channels from the images, a time
budget and Ctrl-C that both finish the run properly, and a learning-rate schedule that follows them."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mnemo.training import config as run_config
from mnemo.training.datasets import image_channels
from mnemo.training.trainer import StopRequest, TrainState, set_cosine_lr
from tests.test_training import mnemo

# The default recipe shrunk to 32 px so it trains in seconds; everything else is the recipe's.
TINY_RESTORE = [
    "model_config.image_size=32",
    "model_config.widths=[8,16,16]",
    "model_config.head_widths=[8,16]",
    "model_config.memory_size=10",
    "model_config.score_pool=5",
    "optim.batch_size=8",
]
FINISHED_RUN = ("model.pt", "calibration.json", "report.json", "history.json", "plots/roc.png")


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("budget") / "data"
    mnemo(
        "data", "synth", str(data), "--size", "32", "--train", "40", "--test-good", "6", "--test-defect", "2"
    )
    return data


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def test_default_recipe_trains_end_to_end_and_is_visible_in_the_config(synth_data, tmp_path):
    run = tmp_path / "run"
    mnemo("train", "--data", str(synth_data), "--out", str(run), "--epochs", "2", "--no-progress",
          *_sets(TINY_RESTORE))  # fmt: skip
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"] == run_config.DEFAULT_RECIPE == "restore"
    assert config["model_config"]["in_channels"] == 1  # the synthetic set is grayscale PNG
    assert config["data"]["flips"] is True  # from the recipe file
    report = json.loads((run / "report.json").read_text())
    assert report["epochs"] == 2 and report["stop_reason"] == "max epochs"
    assert 0.0 <= report["test"]["image"]["auroc"] <= 1.0
    bundle = tmp_path / "bundle"
    mnemo("export", str(run), "--out", str(bundle))  # verified against PyTorch within 1e-4
    assert (bundle / "model.onnx").is_file()


@pytest.mark.parametrize("recipe", run_config.list_recipes())
def test_every_shipped_recipe_builds_its_model_and_trains_a_step_at_its_own_size(recipe):
    """A recipe is a file of field names: a typo, or sizes its model cannot take, fails here, not after a
    user's 15 minutes of training."""
    from mnemo import models

    cfg = run_config.load(run_config.recipe_path(recipe))
    assert cfg.data.path == "" and cfg.optim.max_epochs >= 1
    model = models.create(cfg.model, **{**cfg.model_config, "in_channels": 1, "mean": (0.5,), "std": (0.5,)})
    size = model.config.image_size
    x = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    loss = model.train().loss(x)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    with torch.inference_mode():
        score, heatmap = model.eval().score(x)
    assert score.shape == (2,) and heatmap.shape[-2:] == (size, size)


def test_max_minutes_stops_training_and_finishes_the_run(synth_data, tmp_path):
    run = tmp_path / "run"
    started = time.monotonic()
    mnemo("train", "--data", str(synth_data), "--out", str(run), "--epochs", "10000", "--max-minutes", "0.05",
          "--no-progress", *_sets([*TINY_RESTORE, "optim.patience=10000"]))  # fmt: skip
    assert time.monotonic() - started < 120
    report = json.loads((run / "report.json").read_text())
    assert report["stop_reason"] == "time budget" and 1 <= report["epochs"] < 10000
    assert report["train_seconds"] >= 3.0
    for name in FINISHED_RUN:
        assert (run / name).is_file(), name


def test_ctrl_c_once_finishes_the_run_with_a_model_and_a_report(synth_data, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--data", str(synth_data), "--out", str(run), "--epochs", "10000", "--no-progress",
            *_sets([*TINY_RESTORE, "optim.patience=10000"])]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnemo", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("epoch 1:"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Ctrl-C" in out + err
    report = json.loads((run / "report.json").read_text())
    assert report["stop_reason"] == "interrupted"
    for name in FINISHED_RUN:
        assert (run / name).is_file(), name


def test_a_second_ctrl_c_aborts():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a job started in the background
    with StopRequest(0) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.reason == "interrupted"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # the old handler is back


def test_a_callers_own_ctrl_c_handler_is_left_in_place():
    """``mnemo bench accuracy`` wants Ctrl-C to abort at once rather than finish a cut-short run."""

    def own(signum, frame):
        raise KeyboardInterrupt("the caller's")

    before = signal.signal(signal.SIGINT, own)
    try:
        with StopRequest(0) as stop:
            assert signal.getsignal(signal.SIGINT) is own
            with pytest.raises(KeyboardInterrupt, match="the caller's"):
                os.kill(os.getpid(), signal.SIGINT)
            assert not stop.requested
        assert signal.getsignal(signal.SIGINT) is own
    finally:
        signal.signal(signal.SIGINT, before)


def test_ctrl_c_waits_while_a_checkpoint_pair_is_written():
    """An abort between the best and the last checkpoint would resume a run whose state does not know its
    best weights."""
    from mnemo.training.trainer import ctrl_c_held

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    written = []
    try:
        with pytest.raises(KeyboardInterrupt), ctrl_c_held():
            os.kill(os.getpid(), signal.SIGINT)
            written.append("best")
            written.append("last")
        assert written == ["best", "last"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_the_time_budget_is_a_stop_request_and_a_progress_measure():
    stop = StopRequest(max_minutes=1e-4)  # 6 ms
    assert 0.0 <= stop.progress(0.0) < 1.0
    time.sleep(0.02)
    assert stop.requested and stop.reason == "time budget" and stop.progress(0.0) >= 1.0
    assert StopRequest(0).progress(0.25) == 0.25 and not StopRequest(0).requested


def test_the_step_cap_is_a_stop_request_and_a_progress_measure():
    state = TrainState(steps=2)
    stop = StopRequest(0, max_steps=8, state=state)
    assert stop.progress(0.1) == 0.25 and not stop.requested
    state.steps = 8
    assert stop.requested and stop.reason == "max steps" and stop.progress(0.1) == 1.0


def test_max_steps_counts_steps_over_resumes_and_finishes_the_run(synth_data, tmp_path):
    run = tmp_path / "run"
    common = ("--data", str(synth_data), "--out", str(run), "--epochs", "10000", "--no-progress",
              "--threads", "1", *_sets([*TINY_RESTORE, "optim.patience=10000"]))  # fmt: skip
    mnemo("train", *common, "--max-steps", "7")  # 40 images, 4 for validation, batch 8: 5 steps an epoch
    report = json.loads((run / "report.json").read_text())
    assert (report["steps"], report["epochs"], report["stop_reason"]) == (7, 2, "max steps")
    history = json.loads((run / "history.json").read_text())
    assert [e["steps"] for e in history] == [5, 2]
    mnemo("train", *common, "--max-steps", "12", "--resume")
    report = json.loads((run / "report.json").read_text())
    assert (report["steps"], report["stop_reason"]) == (12, "max steps")
    for name in FINISHED_RUN:
        assert (run / name).is_file(), name


def test_cosine_schedule_anneals_from_the_initial_rate_to_zero():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    rates = []
    for progress in (0.0, 0.5, 1.0, 2.0):
        set_cosine_lr([opt], progress)
        rates.append(opt.param_groups[0]["lr"])
    assert rates[0] == pytest.approx(0.01) and rates[1] == pytest.approx(0.005)
    assert rates[2] == pytest.approx(0.0, abs=1e-12) and rates[3] == rates[2]
    with pytest.raises(ValueError, match="schedule"):
        run_config.OptimConfig(schedule="linear")


def _write(folder: Path, mode: str, count: int = 3) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        shape = (16, 16, 3) if mode == "RGB" else (16, 16)
        Image.fromarray(rng.integers(0, 255, shape, np.uint8), mode).save(folder / f"{i}.png")
    return folder


def test_channels_come_from_the_images(tmp_path):
    assert image_channels(_write(tmp_path / "gray", "L")) == 1
    assert image_channels(_write(tmp_path / "rgb", "RGB")) == 3
    mvtec = tmp_path / "mvtec"
    _write(mvtec / "train" / "good", "RGB")
    assert image_channels(mvtec) == 3


def test_an_rgb_folder_trains_a_three_channel_model(tmp_path):
    data = _write(tmp_path / "rgb", "RGB", count=12)
    run = tmp_path / "run"
    mnemo("train", "--data", str(data), "--out", str(run), "--epochs", "1", "--no-progress",
          *_sets(TINY_RESTORE))  # fmt: skip
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model_config"]["in_channels"] == 3
    assert math.isfinite(json.loads((run / "history.json").read_text())[0]["val_loss"])
