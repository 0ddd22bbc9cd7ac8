"""``torchrun --nproc_per_node 2 -m mnemo train``: two CPU processes (gloo) train one model: the same
weights on both ranks after every step, half the steps each, and rank 0 finishes the run and its bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_training import mnemo
from tests.test_training_budget import TINY_RESTORE, _sets


def torchrun(*args: str, tmp: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    # --standalone: a rendezvous on a port torchrun picks itself (no race with other tests for one);
    # TMPDIR: torchrun leaves a torchelastic_* log folder in the temp dir, so it goes to the test's own
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "TMPDIR": str(tmp)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp") / "data"
    mnemo(
        "data", "synth", str(root), "--size", "32", "--train", "40", "--test-good", "6", "--test-defect", "2"
    )
    return root


def test_gradients_are_averaged_so_both_ranks_hold_the_same_weights(tmp_path):
    script = tmp_path / "train_two.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, pathlib, torch
        from mnemo import models
        from mnemo.training import distributed
        from mnemo.training.batches import TensorBatches
        from mnemo.training.config import OptimConfig
        from mnemo.training.trainer import fit
        world = distributed.init(torch.device("cpu"))
        torch.manual_seed(world.rank)  # different initial weights: the broadcast must make them one
        model = models.create("memae", image_size=28, hidden_dims=(32, 16))
        images = torch.rand(64, 1, 28, 28)
        train = TensorBatches(images, 8, shuffle=True, seed=0, rank=world.rank, world=world.size)
        cfg = OptimConfig(lr=1e-3, batch_size=8, max_epochs=2, patience=10)
        out = pathlib.Path({str(tmp_path)!r})
        state = fit(model, train, TensorBatches(images[:16], 8), cfg, world.device, out, {{}}, progress=False)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        json.dump({{"sum": float(flat.double().sum()), "steps": state.steps, "first": float(flat[0])}},
                  open(out / f"rank{{world.rank}}.json", "w"))
        distributed.barrier()
        distributed.finish()
    """)
    )
    torchrun(str(script), tmp=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # bit for bit: one model trained on two shards
    assert ranks[0]["steps"] == 2 * 4  # 64 images, 32 per rank, batch 8: 4 steps an epoch


def test_torchrun_trains_exports_and_halves_each_ranks_steps(data, tmp_path):
    run = tmp_path / "run"
    args = ["--data", str(data), "--out", str(run), "--epochs", "3", "--no-progress",
            *_sets([*TINY_RESTORE, "optim.patience=100"])]  # fmt: skip
    done = torchrun("-m", "mnemo", "train", *args, tmp=tmp_path)
    assert done.stdout.count("training restore on cpu, 2 processes") == 1  # rank 0 alone speaks
    report = json.loads((run / "report.json").read_text())
    history = json.loads((run / "history.json").read_text())
    assert report["processes"] == 2 and report["epochs"] == 3 and 0 <= report["test"]["image"]["auroc"] <= 1
    assert [e["steps"] for e in history] == [3, 3, 3]  # 36 training images, 18 per rank, batch 8
    assert history[-1]["loss"] < history[0]["loss"]
    mnemo("export", str(run), "--out", str(tmp_path / "bundle"))  # verified against PyTorch
    single = tmp_path / "single"
    mnemo("train", *[a if a != str(run) else str(single) for a in args])
    assert [e["steps"] for e in json.loads((single / "history.json").read_text())] == [5, 5, 5]
