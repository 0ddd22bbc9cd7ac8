"""Smoke tests for ``mnemo bench``: each benchmark runs end to end on a tiny setting so it cannot rot."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from mnemo import models
from mnemo.benchmarks import (
    accuracy,
    accuracy_plan,
    bank_cost,
    memory_addressing,
    one_class_scores,
    roco_scores,
    serve,
)
from mnemo.benchmarks.accuracy_report import render
from mnemo.training import config as run_config
from mnemo.training.datasets import idx_splits
from mnemo.training.run import load_model


def write_idx(directory: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    prefix = {"train": "train", "test": "t10k"}[split]
    header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in images.shape)
    (directory / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    header = (2049).to_bytes(4, "big") + len(labels).to_bytes(4, "big")
    (directory / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.tobytes()))


def write_fake_mnist(root: Path, train: int) -> Path:
    """A tiny MNIST-shaped set: class 0 is a bright square, the others faint noise, so AUROC is defined."""
    (root / "mnist").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", 40)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28), dtype=np.uint8)
        images[labels == 0, 8:20, 8:20] = 250
        write_idx(root / "mnist", split, images, labels)
    return root


@pytest.fixture
def fake_mnist(tmp_path) -> Path:
    return write_fake_mnist(tmp_path / "data", train=120)


def test_plan_applies_each_model_where_its_paper_does():
    cells = accuracy_plan.plan(["mnist", "fashion-mnist"], ["ae", "daad"], [0, 1], [2022, 1997], max_epochs=3)
    assert {(c.dataset, c.model, c.protocol) for c in cells} == {
        ("mnist", "ae", "roco"),
        ("mnist", "ae", "one_class"),  # paper 003 table 2 sets DAAD beside MemAE on one-class MNIST
        ("fashion-mnist", "ae", "roco"),
        ("mnist", "daad", "one_class"),
    }
    only = accuracy_plan.plan(["mnist"], ["ae", "daad"], [0], [2022], protocols=["one_class"])
    assert [(c.model, c.protocol) for c in only] == [("ae", "one_class"), ("daad", "one_class")]
    with pytest.raises(ValueError, match="unknown protocol"):  # a bare string is not a list of protocols
        accuracy_plan.plan(["mnist"], ["ae"], [0], [2022], protocols="roco")
    assert [c.seed for c in cells[: len(cells) // 2]] == [2022] * (len(cells) // 2)  # one seed over all first
    assert accuracy_plan.model_overrides("mnist", "memorizer")["memory_size"] == 8
    assert "memory_size" not in accuracy_plan.model_overrides("fashion-mnist", "memorizer")


def test_plan_runs_every_model_on_the_three_textures_for_at_most_20_epochs():
    cells = accuracy_plan.plan(["textures", "mnist"], ["ae", "daad_plus"], range(10), [2022], max_epochs=100)
    textures = [c for c in cells if c.dataset == "textures"]
    assert {(c.model, c.target_class) for c in textures} == {
        (m, t) for m in ("ae", "daad_plus") for t in range(3)
    }
    assert {c.protocol for c in textures} == {"synthetic"} and {c.max_epochs for c in textures} == {20}
    mnist = {(c.model, c.protocol) for c in cells if c.dataset == "mnist"}
    assert mnist == {("ae", "roco"), ("ae", "one_class"), ("daad_plus", "one_class")}
    assert accuracy_plan.model_overrides("textures", "ae")["backbone"] == "conv"


def test_texture_cell_records_pixel_metrics_and_renders_them(tmp_path, monkeypatch):
    monkeypatch.setitem(accuracy_plan.TEXTURE_SET, "n_train", 20)
    monkeypatch.setitem(accuracy_plan.TEXTURE_SET, "n_test_good", 6)
    monkeypatch.setitem(accuracy_plan.TEXTURE_SET, "n_test_defect", 2)
    results = tmp_path / "accuracy.json"
    cells = accuracy_plan.plan(["textures"], ["daad"], [2], [7], max_epochs=1)
    out = accuracy.run(
        cells, tmp_path / "unused", results, tmp_path / "work", markdown_path=results.with_suffix(".md")
    )
    (record,) = out["records"]
    assert record["key"] == "textures/synthetic/daad/2/7/e1"
    assert 0 <= record["pixel_auroc"] <= 1 and 0 <= record["pro"] <= 1
    assert (tmp_path / "work" / "data" / "gravel" / "dataset.json").is_file()
    text = results.with_suffix(".md").read_text()
    assert "## textures, synthetic — CAPPED at 1 epochs" in text and "### PIXEL AUROC" in text
    assert (
        f"| gravel | {100 * record['pro']:.2f} (n=1) |" in text
        and "paper" not in text.split("## textures")[1]
    )


def test_accuracy_runs_caches_and_renders_beside_the_paper(fake_mnist, tmp_path, monkeypatch):
    results = tmp_path / "results" / "accuracy.json"
    cells = accuracy_plan.plan(["mnist"], ["ae", "memorizer"], [0], [2022], max_epochs=1, protocols=["roco"])
    out = accuracy.run(
        cells, fake_mnist, results, tmp_path / "work", markdown_path=results.with_suffix(".md")
    )
    records = out["records"]
    assert [(r["model"], r["target_class"], r["seed"], r["epochs"]) for r in records] == [
        ("ae", 0, 2022, 1),
        ("memorizer", 0, 2022, 1),
    ]
    for r in records:
        assert all(0.0 <= r[m] <= 1.0 for m in ("auroc", "auprc", "f1"))
        assert r["seconds"] > 0 and r["machine"]["cores"] >= 1 and r["commit"]
    assert records[1]["model_config"] == {"memory_size": 8}
    resolved = records[1]["resolved_model_config"]
    assert (
        resolved["memory_size"] == 8
        and resolved["rounds"] == 8
        and resolved["hidden_dims"] == [512, 256, 128]
    )
    assert json.loads(results.read_text())["records"] == records
    assert not list((tmp_path / "work").iterdir())  # scratch runs are removed unless --keep-runs

    def must_not_train(*args, **kwargs):
        raise AssertionError("a cached cell was trained again")

    monkeypatch.setattr(accuracy, "run_cell", must_not_train)
    again = accuracy.run(cells, fake_mnist, results, tmp_path / "work")
    assert len(again["records"]) == 2

    # the plan changes a cell's configuration: its cached record is trained again and replaced
    retrained = []

    def fake_cell(cell, *args, **kwargs):
        retrained.append(cell.key)
        return {**records[1], "model_config": {"memory_size": 9}, "auroc": 0.25}

    monkeypatch.setattr(accuracy, "run_cell", fake_cell)
    monkeypatch.setitem(accuracy_plan.MODEL_OVERRIDES, ("mnist", "memorizer"), {"memory_size": 9})
    changed = accuracy.run(cells, fake_mnist, results, tmp_path / "work")
    assert retrained == [records[1]["key"]]
    assert [r["auroc"] for r in changed["records"]] == [records[0]["auroc"], 0.25]

    markdown = results.with_suffix(".md").read_text()
    assert "CAPPED at 1 epochs" in markdown
    assert "79.16±0.30" in markdown and "63.20±0.52" in markdown  # paper 000: AE class 0 and average
    assert "97.79±0.64" in markdown  # paper 000: Memorizer class 0
    ours = f"| 0 | {100 * records[0]['auroc']:.2f} (n=1) | 79.16±0.30 |"
    assert ours in markdown


def test_a_bank_cell_trains_its_architecture_as_it_is_and_scores_with_every_training_image(
    fake_mnist, tmp_path, capsys
):
    """``memorizer+bank``: the same training as ``memorizer`` (same seed, same losses), then the latent
    bank of every training image; not in the default model lists. It runs wherever its model runs."""
    assert accuracy_plan.protocols_of("mnist", "memorizer+bank") == ("roco", "one_class")
    assert accuracy_plan.protocols_of("fashion-mnist", "memorizer+bank") == ("roco",)
    assert accuracy_plan.protocols_of("textures", "memorizer+bank") == ("synthetic",)
    assert accuracy_plan.protocols_of("elpv-mono", "memorizer+bank") == ("real",)
    for bankless in ("daad+bank", "restore+bank", "anomem+bank"):
        assert not any(accuracy_plan.protocols_of(d, bankless) for d in ("mnist", "textures", "elpv-mono"))
    textures = accuracy_plan.model_overrides("textures", "memae+bank")
    assert textures == {**accuracy_plan.model_overrides("textures", "memae"), "latent_bank": 1024}
    results, work = tmp_path / "accuracy.json", tmp_path / "work"
    cells = accuracy_plan.plan(
        ["mnist"], ["memorizer", "memorizer+bank"], [0], [2022], max_epochs=2, protocols=["roco"]
    )
    markdown = results.with_suffix(".md")
    _, bank = accuracy.run(cells, fake_mnist, results, work, keep_runs=True, markdown_path=markdown)[
        "records"
    ]
    assert bank["model"] == "memorizer+bank"
    assert bank["model_config"] == {"memory_size": 8, "latent_bank": accuracy_plan.BANK_SIZE}
    runs = [accuracy.run_dir(cell, work) for cell in cells]
    histories = [json.loads((run / "history.json").read_text()) for run in runs]
    assert [h["loss"] for h in histories[0]] == [h["loss"] for h in histories[1]]
    trained = [load_model(run) for run in runs]
    assert trained[0].bank is None and len(trained[1].bank.items) == len(
        idx_splits(fake_mnist / "mnist", "roco", 0).train
    )
    assert "| memorizer ours | memorizer paper | memorizer+bank ours |" in markdown.read_text()
    plain = next(r for r in json.loads(results.read_text())["records"] if r["model"] == "memorizer")
    bank_cost.main([str(runs[1]), "--rounds", "1", "--repeats", "1"])  # the same weights, with and without
    gain = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("test AUROC"))
    assert gain.startswith(f"test AUROC: plain {100 * plain['auroc']:.2f}, bank {100 * bank['auroc']:.2f} (")


def test_jobs_train_cells_side_by_side_with_one_writer_and_their_own_logs(fake_mnist, tmp_path, capsys):
    from mnemo.cli import main

    results, work = tmp_path / "accuracy.json", tmp_path / "work"
    args = [
        "bench",
        "accuracy",
        "--data",
        str(fake_mnist),
        "--datasets",
        "mnist",
        "--protocols",
        "roco",
        "--models",
        "ae,memae",
    ]
    args += ["--classes", "0", "--seeds", "2022", "--max-epochs", "1", "--jobs", "2", "--threads", "1"]
    assert main([*args, "--results", str(results), "--work", str(work)]) == 0
    records = accuracy.load_results(results)["records"]
    assert sorted(r["model"] for r in records) == ["ae", "memae"] and {r["jobs"] for r in records} == {2}
    assert all(0.0 <= r["auroc"] <= 1.0 and r["epochs"] == 1 for r in records)
    for model in ("ae", "memae"):  # each cell's training went to its own log, not to this process's output
        assert f"training {model} on cpu" in (work / f"mnist_roco_{model}_0_2022_e1.log").read_text()
    out = capsys.readouterr().out
    assert "in 2 processes" in out and "[2/2]" in out


def test_jobs_keep_the_cells_that_finish_beside_one_that_fails(fake_mnist, tmp_path):
    results = tmp_path / "accuracy.json"
    good, later = accuracy_plan.plan(["mnist"], ["ae"], [0, 1], [2022], max_epochs=1, protocols=["roco"])
    broken = dataclasses.replace(good, model="no_such_model")
    with pytest.raises(Exception, match="no_such_model"):
        accuracy.run([broken, good, later], fake_mnist, results, tmp_path / "work", jobs=2, threads=1)
    assert [r["key"] for r in accuracy.load_results(results)["records"]] == [good.key]
    assert not (tmp_path / "work" / "mnist_roco_ae_1_2022_e1.log").exists()  # no cell begins after a failure
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        accuracy.run([good], fake_mnist, results, tmp_path / "work", jobs=0)


@pytest.fixture
def fake_mnist_of_steps(tmp_path) -> Path:
    """``fake_mnist`` with 1200 training images: several steps an epoch at the protocol's batch 256."""
    return write_fake_mnist(tmp_path / "steps", train=1200)


def test_ctrl_c_stops_the_cell_mid_epoch_records_nothing_and_a_rerun_continues_its_last_whole_epoch(
    fake_mnist_of_steps, tmp_path, monkeypatch, capsys
):
    """The trainer's own Ctrl-C finishes a run on the epoch it cut short (``mnemo train``'s way); in the
    benchmark that epoch would pass for a whole one, so Ctrl-C aborts there instead."""
    import signal

    import torch

    from mnemo.training import trainer

    results, work = tmp_path / "accuracy.json", tmp_path / "work"
    (cell,) = accuracy_plan.plan(["mnist"], ["ae"], [0], [2022], max_epochs=3, protocols=["roco"])
    real_epoch = trainer.train_epoch

    def ctrl_c_at_step_2_of_epoch_2(model, loader, optimizers, cfg, state, *args):
        if state.epoch == 1:
            step, calls = model.training_step, []

            def stepping(*a, **k):
                calls.append(1)
                if len(calls) == 2:
                    signal.raise_signal(signal.SIGINT)
                return step(*a, **k)

            model.training_step = stepping
        return real_epoch(model, loader, optimizers, cfg, state, *args)

    monkeypatch.setattr(trainer, "train_epoch", ctrl_c_at_step_2_of_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        accuracy.run([cell], fake_mnist_of_steps, results, work)
    assert accuracy.load_results(results)["records"] == []
    assert "stopped by Ctrl-C" in capsys.readouterr().out
    saved = torch.load(accuracy.run_dir(cell, work) / "last.pt", weights_only=False)["state"]
    assert saved["epoch"] == 1 and saved["steps"] == 4  # the last whole epoch: 1080 images, 4 full batches
    monkeypatch.setattr(trainer, "train_epoch", real_epoch)
    (record,) = accuracy.run([cell], fake_mnist_of_steps, results, work, keep_runs=True)["records"]
    history = json.loads((accuracy.run_dir(cell, work) / "history.json").read_text())
    assert record["resumed"] and record["epochs"] == 3 and record["stop_reason"] == "max epochs"
    assert [h["steps"] for h in history] == [4, 4, 4]


@pytest.mark.parametrize("to", ["command", "group"])
def test_jobs_stop_their_cells_on_ctrl_c_or_a_sigint_to_the_command_alone(fake_mnist, tmp_path, to):
    """A terminal's Ctrl-C reaches every process of the group; a SIGINT to the command alone (a
    supervisor's ``kill -INT``) aborts the cells training in its processes too, instead of waiting for them
    to finish unrecorded. Either way each keeps its checkpoint, and nothing prints a traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    results, work = tmp_path / "accuracy.json", tmp_path / "work"
    command = [sys.executable, "-m", "mnemo", "bench", "accuracy", "--data", str(fake_mnist), "--datasets",
               "mnist", "--protocols", "roco", "--models", "ae", "--classes", "0,1", "--seeds", "2022",
               "--max-epochs", "5000", "--patience", "5000", "--jobs", "2", "--results", str(results),
               "--work", str(work)]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    checkpoints = [work / f"mnist_roco_ae_{c}_2022_e5000" / "last.pt" for c in (0, 1)]
    deadline = time.monotonic() + 120
    while not all(c.exists() for c in checkpoints) and time.monotonic() < deadline:
        time.sleep(0.2)
    if to == "group":
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 130, out
    assert all(c.exists() for c in checkpoints) and not results.exists()
    assert "Traceback" not in out, out
    assert "stopped by Ctrl-C; a cell in training keeps its last whole epoch" in out


def test_a_cell_stopped_mid_training_resumes_from_its_last_epoch(fake_mnist, tmp_path, monkeypatch):
    from mnemo.training.run import train_run

    (cell,) = accuracy_plan.plan(["mnist"], ["ae"], [0], [2022], max_epochs=3, protocols=["roco"])
    cfg = accuracy.run_config(cell, fake_mnist, tmp_path / "work", 10, "cpu")
    last = cfg.output_path / "last.pt"

    def stopped_after_one_epoch(**optim) -> None:  # an earlier sitting, in the cell's own run directory
        optim = dataclasses.replace(cfg.optim, max_epochs=1, **optim)
        train_run(dataclasses.replace(cfg, optim=optim), progress=False)

    def run() -> tuple[dict, list[dict]]:
        record = accuracy.run_cell(cell, fake_mnist, tmp_path / "work", 10, "cpu", keep=True)
        return record, json.loads((cfg.output_path / "history.json").read_text())

    stopped_after_one_epoch()
    first_epoch = json.loads((cfg.output_path / "history.json").read_text())[0]
    record, history = run()
    assert record["resumed"] and record["epochs"] == 3
    assert history[0] == first_epoch and [h["epoch"] for h in history] == [1, 2, 3]
    assert all(h["seconds"] > 0 for h in history)
    assert record["seconds"] >= record["train_seconds"]  # the earlier sitting's training counts

    # trained with another patience, or a damaged checkpoint: the cell starts over
    stopped_after_one_epoch(patience=3)
    record, history = run()
    assert not record["resumed"] and len(history) == 3
    stopped_after_one_epoch()
    last.write_bytes(last.read_bytes()[:1000])  # killed while it was written by an older version
    record, history = run()
    assert not record["resumed"] and len(history) == 3

    # the plan changed the cell's model since: its checkpoint is discarded and the cell starts over
    monkeypatch.setitem(accuracy_plan.MODEL_OVERRIDES, ("mnist", "ae"), {"hidden_dims": (64, 32, 16)})
    stopped_after_one_epoch()
    record = accuracy.run_cell(cell, fake_mnist, tmp_path / "work", 10, "cpu", keep=False)
    assert not record["resumed"] and record["epochs"] == 3
    assert record["resolved_model_config"]["hidden_dims"] == [64, 32, 16]


def test_a_cell_under_a_time_budget_never_resumes_and_never_loads_an_earlier_checkpoint(fake_mnist, tmp_path):
    (cell,) = accuracy_plan.plan(["mnist"], ["ae"], [0], [2022], max_epochs=1, protocols=["roco"])
    cfg = accuracy.run_config(cell, fake_mnist, tmp_path / "work", 10, "cpu")
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, max_minutes=5))
    cfg.output_path.mkdir(parents=True)
    for name in ("last.pt", "best.pt"):  # a previous sitting's (here: not even loadable)
        (cfg.output_path / name).write_bytes(b"an earlier sitting")
    out, earlier = accuracy.train_or_resume(cfg)
    assert earlier is None and json.loads((out / "report.json").read_text())["epochs"] == 1


def test_report_average_is_over_seeds_of_class_means():
    records = [
        {"dataset": "mnist", "protocol": "roco", "model": "ae", "target_class": c, "seed": s,
         "max_epochs": 100, "auroc": v, "auprc": v, "f1": v, "epochs": 3, "seconds": 60.0,
         "commit": commit}
        for s, values, commit in ((1, (0.5, 0.7), "a" * 40), (2, (0.7, 0.9), "b" * 40 + "+dirty"))
        for c, v in enumerate(values)
    ]  # fmt: skip
    markdown = render({"records": records, "machine": {}, "commit": "x"})
    assert f"commits `{'a' * 7}`, `{'b' * 7}+dirty`" in markdown  # each record's, not the file's last
    assert "CAPPED" not in markdown
    assert "| 0 | 60.00±14.14 (n=2) | 79.16±0.30 |" in markdown
    assert "70.00±14.14 (n=2) [2 of 10 classes]" in markdown  # seeds' class means: 60 and 80


def test_report_average_leaves_out_a_seed_that_has_not_finished_every_class():
    records = [
        {"dataset": "mnist", "protocol": "roco", "model": "ae", "target_class": c, "seed": s,
         "max_epochs": 100, "auroc": v, "auprc": v, "f1": v, "epochs": 3, "seconds": 60.0,
         "commit": "a" * 40}
        for s, count, v in ((2022, 10, 0.8), (1997, 2, 0.2))
        for c in range(count)
    ]  # fmt: skip
    markdown = render({"records": records, "machine": {}, "commit": "x"})
    assert "| **AVG** | 80.00 (n=1) [seed 1997: 2 of 10 classes, not averaged] |" in markdown


def test_serve_bench_against_raw_onnxruntime(tmp_path):
    from tests.service_helpers import export_tiny_bundle

    bundle = export_tiny_bundle(tmp_path / "bundles", "tiny")
    report = serve.run(
        [str(bundle)], tmp_path / "work", tmp_path / "results", concurrency=[1, 2], duration=0.5,
        requests=12, max_batch_size=4, raw_seconds=0.05, burst=3, spinning=True, no_keep_alive=True,
        workers=2,
    )  # fmt: skip
    (b,) = report["bundles"]
    assert b["raw"]["best_images_per_s"] > 0 and b["raw"]["single_image_ms"]["p50"] > 0
    modes = ["dynamic", "batch1", "dynamic x3", "dynamic spin", "dynamic close", "dynamic 2 workers"]
    assert list(b["service"]) == [*modes, "dynamic 2 workers close"]
    assert b["service"]["dynamic x3"]["images_per_request"] == 3
    spin = [m["ort_spinning"] for m in b["service"].values()]
    assert spin == ["auto", "auto", "auto", True, "auto", "auto", "auto"]
    assert [m["keep_alive"] for m in b["service"].values()] == [True] * 4 + [False, True, False]
    assert [m["workers"] for m in b["service"].values()] == [1] * 5 + [2, 2]
    one, two = (b["service"][m]["memory_after_load_mb"]["rss_mb"] for m in ("dynamic", "dynamic 2 workers"))
    assert two > 1.5 * one  # two whole services (and a small supervisor), counted together
    for mode in b["service"]:
        r = b["service"][mode]
        assert r["cold_start_s"] > 0 and r["memory_after_load_mb"]["rss_mb"] > 10
        assert [p["concurrency"] for p in r["points"]] == [1, 2]
        for p in r["points"]:
            assert p["errors"] == 0 and 0 < p["ok"] <= 12
            assert p["raw_images_per_s"] > 0  # re-timed beside the point, not the sweep's figure
            assert p["ratio_vs_raw"] == pytest.approx(p["images_per_s"] / p["raw_images_per_s"], abs=1e-3)
            assert p["p50_ms"] <= p["p99_ms"] and p["server_cpu_ms_per_image"] > 0
            assert 1 <= p["mean_batch_size"] <= (1 if mode == "batch1" else 4)
    assert b["service"]["batch1"]["max_batch_size"] == 1
    assert json.loads((tmp_path / "results" / "serve.json").read_text())["bundles"][0]["name"] == str(bundle)
    assert "service ÷ raw" in (tmp_path / "results" / "serve.md").read_text()


def test_load_generator_counts_refusals_and_keeps_its_connections(tmp_path):
    """Non-200 answers are errors, not latencies, and the keep-alive connections survive them."""
    from mnemo.benchmarks.loadgen import run_load
    from tests.service_helpers import export_tiny_bundle

    bundle = export_tiny_bundle(tmp_path / "bundles", "tiny")
    server = serve.Server(bundle, max_batch_size=4, max_wait_ms=0)
    try:
        server.start()
        png = serve.sample_png(serve.manifest_of(bundle))
        refused = asyncio.run(run_load(f"{server.url}/v1/models/nope:score", png, 2, duration=5, requests=10))
        served = asyncio.run(run_load(f"{server.url}/v1/models/tiny:score", png, 2, duration=5, requests=10))
    finally:
        server.stop()
    assert (refused.requests, refused.ok, refused.errors, refused.p50_ms) == (10, 0, 10, None)
    assert (served.requests, served.ok, served.errors) == (10, 10, 0)
    assert served.server_p50_ms > 0 and served.p50_ms >= served.server_p50_ms


@pytest.mark.parametrize("keep_alive", [True, False])
def test_load_generator_reuses_or_renews_its_connections(keep_alive):
    """Keep-alive: one connection per worker for the whole run; without: one per request (warm-up too)."""
    from mnemo.benchmarks.loadgen import WARMUP_REQUESTS, run_load

    accepted, answer = [], b'{"timings_ms": {"total_ms": 1.0}}'

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            closing = b"connection: close" in head.lower()
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n"
                % (len(answer), b"connection: close\r\n" * closing)
                + answer
            )
            await writer.drain()
            if closing:
                writer.close()
                return

    async def scenario():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await run_load(f"http://127.0.0.1:{port}/x", b"png", 2, requests=10, keep_alive=keep_alive)

    result = asyncio.run(scenario())
    assert (result.requests, result.ok, result.errors) == (10, 10, 0)
    assert len(accepted) == (2 if keep_alive else 2 + WARMUP_REQUESTS + 10)


@pytest.mark.parametrize("spinning", [False, True])
def test_the_spin_mode_reaches_the_server_process(tmp_path, spinning):
    """The report's ``ort_spinning`` only echoes the bench's flag; this reads the server's environment."""
    from tests.service_helpers import export_tiny_bundle

    server = serve.Server(
        export_tiny_bundle(tmp_path, "tiny"), max_batch_size=4, max_wait_ms=0, spinning=spinning
    )
    try:
        server.start()
        environ = Path(f"/proc/{server.process.pid}/environ").read_bytes().split(b"\0")
    finally:
        server.stop()
    spin = [entry for entry in environ if entry.startswith(b"MNEMO_ORT_SPINNING=")]
    assert spin == ([b"MNEMO_ORT_SPINNING=1"] if spinning else [])  # else the service's default, auto


def test_merge_folds_parallel_runs_into_one_results_file(tmp_path, capsys):
    from mnemo.cli import main

    def record(model: str, target: int, auroc: float) -> dict:
        cell = accuracy_plan.Cell("mnist", "roco", model, target, 2022, 5)
        return {**dataclasses.asdict(cell), "key": cell.key, "auroc": auroc, "auprc": auroc, "f1": auroc,
                "epochs": 5, "seconds": 1.0, "commit": "c" * 40}  # fmt: skip

    main_file, other, third = tmp_path / "accuracy.json", tmp_path / "a.json", tmp_path / "b.json"
    accuracy.save_results(main_file, {"records": [record("ae", 0, 0.5), record("ae", 1, 0.6)]})
    accuracy.save_results(other, {"records": [record("ae", 1, 0.9)]})
    accuracy.save_results(third, {"records": [record("memae", 0, 0.7)]})
    assert main(["bench", "accuracy", "--results", str(main_file), "--merge", f"{other},{third}"]) == 0
    merged = {r["key"]: r["auroc"] for r in accuracy.load_results(main_file)["records"]}
    assert merged == {"mnist/roco/ae/0/2022/e5": 0.5, "mnist/roco/ae/1/2022/e5": 0.9,
                      "mnist/roco/memae/0/2022/e5": 0.7}  # fmt: skip
    assert "| 1 | 90.00 (n=1) |" in main_file.with_suffix(".md").read_text()
    assert "3 records" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no results file"):
        accuracy.merge_results(main_file, [tmp_path / "missing.json"])


def test_real_defect_cells_train_each_recipe_under_the_budget_and_render_the_references(
    tmp_path, monkeypatch, capsys
):
    from mnemo.benchmarks.cli import _dataset_present
    from mnemo.training.synthetic import generate

    assert not _dataset_present("elpv-mono", tmp_path)  # absent: skipped with a message, not an error
    assert "skipping elpv-mono" in capsys.readouterr().out
    generate(tmp_path / "elpv-mono", size=32, n_train=20, n_test_good=4, n_test_defect=1)
    assert _dataset_present("elpv-mono", tmp_path)
    assert set(accuracy_plan.REAL_RECIPES) == set(models.list_models())  # every architecture has a recipe
    cells = accuracy_plan.plan(["elpv-mono"], ["restore", "ae+bank"], range(10), [7], max_epochs=1)
    assert [(c.model, c.protocol, c.target_class) for c in cells] == [
        ("restore", "real", 0), ("ae+bank", "real", 0),
    ]  # fmt: skip
    monkeypatch.setattr(accuracy, "REAL_MINUTES", 5.0)
    results = tmp_path / "real.json"
    out = accuracy.run(cells, tmp_path, results, tmp_path / "work", markdown_path=results.with_suffix(".md"))
    record, banked = out["records"]
    assert record["recipe"] == "restore" and record["stop_reason"] == "max epochs"  # a cap below 100 holds
    ae_recipe = run_config.load(run_config.recipe_path("ae-cpu")).model_config
    assert banked["recipe"] == "ae-cpu"  # the recipe as shipped, and a bank of every training image
    assert {**ae_recipe, "latent_bank": accuracy_plan.IMAGE_BANK_SIZE}.items() <= banked[
        "model_config"
    ].items()
    assert banked["resolved_model_config"]["latent_bank"] == accuracy_plan.IMAGE_BANK_SIZE
    full = accuracy.real_run_config(dataclasses.replace(cells[0], max_epochs=100), tmp_path, tmp_path, "cpu")
    recipe = run_config.load(run_config.recipe_path("restore")).optim
    assert (full.optim.max_epochs, full.optim.max_steps, full.optim.patience) == (
        recipe.max_epochs, recipe.max_steps, recipe.patience,
    )  # fmt: skip  # otherwise the cell is `mnemo train --data DIR --max-minutes 15`: the recipe's own caps
    assert full.optim.max_minutes == accuracy.REAL_MINUTES
    assert record["resolved_model_config"]["in_channels"] == 1 and record["train_seconds"] > 0
    assert 0 <= record["auroc"] <= 1 and 0 <= record["auprc"] <= 1
    text = results.with_suffix(".md").read_text()
    assert (
        "## elpv-mono, real" in text and "| restore | restore |" in text and "40-line plain conv AE" in text
    )

    def must_not_train(*args, **kwargs):
        raise AssertionError("a cached cell was trained again")

    monkeypatch.setattr(accuracy, "run_cell", must_not_train)  # in_channels read from the images: no change
    assert accuracy.run(cells, tmp_path, results, tmp_path / "work")["records"] == out["records"]
    retrained = []

    def fake_cell(cell, *args, **kwargs):
        retrained.append(cell.key)
        return {**banked, "model_config": accuracy.cell_model_config(cell)}

    monkeypatch.setattr(accuracy, "run_cell", fake_cell)
    monkeypatch.setattr(accuracy_plan, "IMAGE_BANK_SIZE", accuracy_plan.IMAGE_BANK_SIZE // 2)
    again = accuracy.run(cells, tmp_path, results, tmp_path / "work")["records"]
    assert retrained == [banked["key"]]  # the bank's size changed: that cell, and only it, is trained again
    halved = accuracy_plan.IMAGE_BANK_SIZE
    assert (
        f"{banked['key']} was trained otherwise (latent_bank {2 * halved} -> {halved})"
        in capsys.readouterr().out
    )
    assert again[1]["model_config"]["latent_bank"] == accuracy_plan.IMAGE_BANK_SIZE


def test_a_cached_record_is_outdated_by_exactly_the_fields_the_plan_now_trains_otherwise(monkeypatch):
    def record(config):
        return {"model_config": json.loads(json.dumps(config))}  # as the results JSON holds it

    changes = accuracy.config_changes
    (real,) = accuracy_plan.plan(["elpv-mono"], ["anomem"], [0], [7])
    planned = accuracy.cell_model_config(real)
    assert "in_channels" not in planned and "mean" not in planned  # the recipe leaves both to the images
    as_trained = {**planned, "in_channels": 1, "mean": (0.485,), "std": (0.229,)}  # a grayscale folder's
    assert changes(record(as_trained), real) == {}
    size = planned["image_size"]
    assert changes(record({**as_trained, "image_size": 2 * size}), real) == {"image_size": (2 * size, size)}

    (idx,) = accuracy_plan.plan(["mnist"], ["memorizer"], [0], [7], protocols=["roco"])
    plain = accuracy.cell_model_config(idx)
    assert changes(record(plain), idx) == {}
    assert set(changes(record({**plain, "in_channels": 3}), idx)) == {"in_channels"}  # IDX runs fill nothing
    as_resolved = accuracy.resolved("memorizer", plain)
    assert changes({"resolved_model_config": {**as_resolved, "gone": 1}}, idx) == {}  # a field since removed
    changed_default = {**as_resolved, "rounds": as_resolved["rounds"] + 1}  # trained before a default changed
    assert set(changes({"model_config": plain, "resolved_model_config": changed_default}, idx)) == {"rounds"}
    assert set(changes(record({**plain, "no_such_field": 1}), idx)) == {"memory_size", "no_such_field"}

    (texture,) = accuracy_plan.plan(["textures"], ["ae+bank"], [0], [7])
    trained_with = accuracy.cell_model_config(texture)
    assert changes(record(trained_with), texture) == {}  # its tuples stored as lists
    monkeypatch.setattr(accuracy_plan, "IMAGE_BANK_SIZE", accuracy_plan.IMAGE_BANK_SIZE // 2)
    assert set(changes(record(trained_with), texture)) == {"latent_bank"}

    # a per-channel mean the plan sets, cut to one value on gray images, is what the plan asked for
    rgb_mean = {**planned, "mean": (0.5, 0.4, 0.3)}
    monkeypatch.setattr(accuracy, "cell_model_config", lambda cell: rgb_mean)
    gray = {**as_trained, **rgb_mean, "mean": (0.5,)}
    assert changes(record(gray), real) == {}
    assert changes(record({**gray, "mean": (0.4,)}), real) == {"mean": ([0.4], [0.5])}


def test_train_speed_bench_times_three_loops_and_profiles_the_memory(fake_mnist, tmp_path):
    from mnemo.benchmarks import train_speed

    report = train_speed.run(["memae", "daad"], fake_mnist, tmp_path / "work", tmp_path / "out", 3, 1, "cpu",
                             log=lambda _: None)  # fmt: skip
    memae, daad = report["records"]
    assert (memae["batch_size"], daad["batch_size"]) == (256, 8)  # each at its paper's batch size
    for record in (memae, daad):
        rate = record["steps_per_second"]
        assert set(rate) == set(train_speed.LOOPS) and min(rate.values()) > 0
        assert record["mnemo_over_bare"] == pytest.approx(rate["mnemo"] / rate["bare"], rel=0.02)
        for shares in record["profile"].values():
            assert sum(shares.values()) == pytest.approx(1.0, abs=0.01)
            assert shares["optimizer step"] > 0 and shares["loss and backward"] > 0
    assert any(k.startswith("forward: memory") for k in memae["profile"]["mnemo"])
    table = (tmp_path / "out" / "train-speed.md").read_text()
    assert "| memae | mnist roco 1×28×28 | 256 |" in table
    assert json.loads((tmp_path / "out" / "train-speed.json").read_text())["records"][0]["model"] == "memae"


def test_highres_bench_trains_both_arms_judges_them_on_the_same_pixels_and_times_them(tmp_path):
    from mnemo.benchmarks import highres

    setup = highres.Setup(
        size=256, defect_size=32, n_train=10, n_test_good=3, n_test_defect=1, tile=32, overlap=8, scale=0.5,
        minutes=0.05,
    )  # fmt: skip
    record = highres.run(setup, tmp_path / "work", tmp_path / "results", progress=False)
    assert record["tiled"]["tiles_per_frame"] == 25  # 128 px working frames: 5 × 5 tiles of 32 px
    for arm in highres.ARMS:
        r = record[arm]
        assert 0 <= r["image_auroc"] <= 1 and 0 <= r["pixel_auroc"] <= 1 and 0 <= r["pro"] <= 1
        assert r["latency"]["frames"] == 8 and 0 < r["latency"]["median_ms"] <= r["latency"]["p95_ms"]
    table = (tmp_path / "results" / "highres.md").read_text()
    assert "| tiled |" in table and "| resized |" in table and "Pixel metrics of both at 128 px" in table


def test_roco_scores_rescore_kept_runs_and_show_what_ink_alone_says(fake_mnist, tmp_path, capsys):
    cells = accuracy_plan.plan(["mnist"], ["ae"], [0], [2022], max_epochs=1, protocols=["roco"])
    out = accuracy.run(cells, fake_mnist, tmp_path / "r.json", tmp_path / "work", keep_runs=True)
    assert roco_scores.main(["--data", str(fake_mnist / "mnist"), "--runs", str(tmp_path / "work")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0 |"))
    model, ink, _, positional, banked = (float(v) for v in row.strip("| ").split(" | ")[1:])
    assert model == pytest.approx(100 * out["records"][0]["auroc"], abs=0.05)  # the model's own score
    assert ink == 100.0  # held-out 0s are the bright squares: ink alone finds them
    assert positional > 90.0  # a bright square errs far beyond any position's spread on faint noise
    assert banked > 90.0  # and lies far from every faint-noise latent
    with pytest.raises(SystemExit):
        roco_scores.main(["--data", str(fake_mnist / "mnist"), "--runs", str(tmp_path / "empty")])


def test_one_class_scores_split_a_runs_auroc_by_anomalous_class(fake_mnist, tmp_path, capsys):
    cells = accuracy_plan.plan(["mnist"], ["daad"], [0], [2022], max_epochs=1)
    out = accuracy.run(cells, fake_mnist, tmp_path / "r.json", tmp_path / "work", keep_runs=True)
    data = str(fake_mnist / "mnist")
    assert one_class_scores.main(["--data", data, "--runs", str(tmp_path / "work")]) == 0
    rows = [line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines() if line[:1] == "|"]
    table = {row[0]: [float(v) for v in row[1:]] for row in rows[2:]}
    assert set(table) == {*map(str, range(1, 10)), "all"} and table["all"][0] == 36  # 4 of each non-0 class
    model, ink, nearest = table["all"][2:]
    assert model == pytest.approx(100 * out["records"][0]["auroc"], abs=0.05)  # the benchmark's own AUROC
    lost = sum(table[str(c)][1] for c in range(1, 10))
    assert lost == pytest.approx(100 - model, abs=0.5)  # the gap to 100, split by class (rows rounded)
    assert ink == 0.0  # the normal 0s are the bright squares: every anomaly draws less
    assert nearest == 100.0  # faint noise lies far from every bright square
    assert memory_addressing.main(["--data", data, "--runs", str(tmp_path / "work")]) == 0
    rows = [line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines() if line[:1] == "|"]
    banks = {row[0]: row[1:] for row in rows[2:]}
    assert set(banks) == {f"generator.memories.{i}.memory" for i in range(3)}  # one per DAAD scale
    for n, kept, effective in banks.values():
        kept_normal, kept_anomalous = (float(v) for v in kept.split(" / "))
        assert n == "500" and 1 <= kept_normal <= 500 and 1 <= kept_anomalous <= 500
        assert float(effective.split(" / ")[0]) <= kept_normal + 0.05
    roco = accuracy_plan.plan(["mnist"], ["ae"], [0], [2022], max_epochs=1, protocols=["roco"])
    accuracy.run(roco, fake_mnist, tmp_path / "roco.json", tmp_path / "roco", keep_runs=True)
    with pytest.raises(SystemExit, match="not a one_class run"):  # refused, not misread
        one_class_scores.main(["--data", data, "--runs", str(tmp_path / "roco")])


def test_daad_plus_trains_a_one_class_cell_at_32_px_beside_its_papers_figure(fake_mnist, tmp_path):
    results = tmp_path / "accuracy.json"
    cells = accuracy_plan.plan(["mnist"], ["daad_plus"], [0], [2022], max_epochs=1)
    markdown = results.with_suffix(".md")
    (record,) = accuracy.run(cells, fake_mnist, results, tmp_path / "work", markdown_path=markdown)["records"]
    assert record["protocol"] == "one_class" and 0.0 <= record["auroc"] <= 1.0
    assert record["resolved_model_config"]["disc_widths"] == [32, 64, 128]  # 32 px down to 4 px
    assert record["resolved_model_config"]["division_rates"] == [1, 1, 1]  # one block per map on digits
    assert "| **AVG** |" in markdown.read_text() and "| 99.0 |" in markdown.read_text()
