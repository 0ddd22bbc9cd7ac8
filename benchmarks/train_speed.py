"""``mnemo bench train``: optimizer steps per second of ``mnemo train``'s loop against a bare PyTorch loop
(issue 16), per architecture at its paper configuration, with a profile of where the time goes.

Three loops train the same model (same weights to start, same batch size), side by side in one process:

* ``bare``: the limit on this machine, ``model.training_step`` on batches already sliced in memory;
* ``mnemo``: ``training.trainer.train_epoch`` over ``training.run.batches``, exactly what ``mnemo train``
  runs (the in-memory ``TensorBatches`` for IDX arrays and cached folders; flips, shuffles, the progress
  bar's bookkeeping, the learning-rate schedule, the logs);
* ``dataloader``: the same loop over the per-item ``DataLoader`` it used before (``__getitem__`` and
  collation per image), to show what the in-memory path bought.

Each round times ``steps`` steps of each loop in turn (after one warm-up step), and the median over
``rounds`` rounds is reported, so a noisy neighbour slows all three alike; the ratios are what to read.
The profile instruments one more round of the ``mnemo`` and ``dataloader`` loops: time waiting for the
batch (decode, per-item Python, collation), each top-level submodule's forward (the memory module on its
own), the optimizer's step, the rest of ``training_step`` (loss and backward), and the loop's own overhead.

Cases (``CASES``): AE, MemAE, Memorizer, RFTM on MNIST ROCO (28 px, batch 256), DAAD on one-class MNIST
(32 px, batch 8, paper 003's optimiser), AnoMem on textures (64 px, batch 16), restore (the default
recipe) on textures at 64 px: the same configurations as ``mnemo bench accuracy``.
A benchmark, not a test: timings depend on the machine (recorded in the results).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from mnemo.benchmarks.accuracy import git_commit, machine, run_config
from mnemo.benchmarks.accuracy_plan import Cell
from mnemo.training.datasets import images_tensor
from mnemo.training.run import batches, load_splits, loader, preprocessing_of, with_image_channels
from mnemo.training.trainer import StopRequest, TrainState, pick_device, seed_everything, train_epoch

REPO = Path(__file__).resolve().parents[1]
CASES: dict[str, tuple[str, str]] = {  # model -> (dataset, protocol), class 0, seed 2022
    "ae": ("mnist", "roco"),
    "memae": ("mnist", "roco"),
    "memorizer": ("mnist", "roco"),
    "rftm": ("mnist", "roco"),
    "daad": ("mnist", "one_class"),
    "anomem": ("textures", "synthetic"),
    "restore": ("textures", "synthetic"),
}
LOOPS = ("bare", "mnemo", "dataloader")


@dataclasses.dataclass
class Setup:
    """One case built as ``train_run`` builds it: the model, its optimisers, the split, the loaders."""

    model: Any
    optimizers: list
    optim: Any
    device: torch.device
    loaders: dict[str, Iterable]
    in_memory: torch.Tensor


def build(model_name: str, data_root: Path, work: Path, device: str) -> Setup:
    from mnemo import models
    from mnemo.training import config as run_cfg

    dataset, protocol = CASES[model_name]
    cfg = run_config(Cell(dataset, protocol, model_name, 0, 2022), data_root, work, 10, device)
    seed_everything(cfg.seed)
    cfg = with_image_channels(cfg)
    model = models.create(cfg.model, **cfg.model_config)
    splits = load_splits(cfg.data, preprocessing_of(model, cfg.data.resize))
    optim = run_cfg.resolve_optim(cfg.optim, model.config)
    dev = pick_device(cfg.device)
    model.to(dev).train()
    images = images_tensor(splits.train)
    if images is None:
        raise ValueError(f"{model_name}: the training split does not fit in memory; nothing to compare")
    bs = optim.batch_size
    loaders = {
        "bare": [images[i : i + bs].to(dev) for i in range(0, len(images), bs)],
        "mnemo": batches(splits.train, bs, 0, train=True, seed=cfg.seed),
        "dataloader": loader(splits.train, bs, 0, shuffle=True, seed=cfg.seed),
    }
    return Setup(model, model.configure_optimizers(optim), optim, dev, loaders, images)


def cycle(loader_: Iterable) -> Iterator:
    while True:
        yield from loader_


def bare_steps(setup: Setup, steps: int) -> float:
    """Seconds for ``steps`` of ``training_step`` on in-memory batches: the machine's limit."""
    source = cycle(setup.loaders["bare"])
    started = time.perf_counter()
    for _ in range(steps):
        setup.model.training_step(next(source), setup.optimizers)
    return time.perf_counter() - started


def trainer_steps(setup: Setup, name: str, steps: int) -> float:
    """Seconds for ``steps`` of ``mnemo train``'s epoch loop (``train_epoch``, capped at ``steps``)."""
    state = TrainState()
    started = time.perf_counter()
    with StopRequest(0, 0, state) as stop:
        while state.steps < steps:  # an epoch shorter than ``steps`` simply runs again
            cap = dataclasses.replace(setup.optim, max_steps_per_epoch=steps - state.steps, max_epochs=10**6)
            train_epoch(
                setup.model, setup.loaders[name], setup.optimizers, cap, state, setup.device, stop, False
            )
    return time.perf_counter() - started


def timed(setup: Setup, loop: str, steps: int) -> float:
    return bare_steps(setup, steps) if loop == "bare" else trainer_steps(setup, loop, steps)


# ---------------------------------------------------------------------------------------------- profile


class Profile:
    """Seconds per category while one loop runs: hooks on the model's top-level submodules and its
    optimisers, and a wrapper around the loader and ``training_step``."""

    def __init__(self, setup: Setup) -> None:
        self.setup, self.seconds = setup, defaultdict(float)
        self.handles: list = []

    def add(self, key: str, since: float) -> None:
        self.seconds[key] += time.perf_counter() - since

    def __enter__(self) -> Profile:
        starts: dict[str, float] = {}
        for name, module in self.setup.model.named_children():
            key = f"forward: {name} ({type(module).__name__})"

            def pre(_m, _i, key=key):
                starts[key] = time.perf_counter()

            def post(_m, _i, _o, key=key):
                self.add(key, starts[key])

            self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        for optimizer in self.setup.optimizers:
            self.handles += [
                optimizer.register_step_pre_hook(
                    lambda *_: starts.__setitem__("optimizer", time.perf_counter())
                ),
                optimizer.register_step_post_hook(lambda *_: self.add("optimizer step", starts["optimizer"])),
            ]
        self._step = self.setup.model.training_step
        self.setup.model.training_step = self._timed_step
        return self

    def _timed_step(self, x, optimizers):
        started = time.perf_counter()
        try:
            return self._step(x, optimizers)
        finally:
            self.add("training_step", started)

    def timed_batches(self, source: Iterable) -> Iterator:
        iterator = iter(source)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.add("batches (decode, per-item Python, collation, flips)", started)
            yield batch

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.setup.model.training_step = self._step

    def shares(self, total: float) -> dict[str, float]:
        """Each category's share of ``total``; the step's rest is loss + backward, the remainder the loop."""
        s = dict(self.seconds)
        step = s.pop("training_step", 0.0)
        inside_step = sum(v for k, v in s.items() if not k.startswith("batches"))
        waiting = sum(v for k, v in s.items() if k.startswith("batches"))
        parts = {**s, "loss and backward": step - inside_step}
        parts["loop (progress bar, schedule, logs)"] = total - step - waiting
        return {k: round(v / total, 4) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}


def profile(setup: Setup, loop: str, steps: int) -> dict[str, float]:
    original = setup.loaders[loop]
    with Profile(setup) as prof:

        class Timed:
            def __iter__(self):
                return prof.timed_batches(original)

            def __len__(self):
                return len(original)

        setup.loaders[loop] = Timed()
        try:
            total = trainer_steps(setup, loop, steps)
        finally:
            setup.loaders[loop] = original
    return prof.shares(total)


# ------------------------------------------------------------------------------------------------ run


def measure(model_name: str, data_root: Path, work: Path, steps: int, rounds: int, device: str) -> dict:
    setup = build(model_name, data_root, work, device)
    for loop in LOOPS:
        timed(setup, loop, 1)  # warm-up: allocator, first-call costs
    seconds: dict[str, list[float]] = {loop: [] for loop in LOOPS}
    for _ in range(rounds):
        for loop in LOOPS:
            seconds[loop].append(timed(setup, loop, steps))
    rate = {loop: steps / statistics.median(s) for loop, s in seconds.items()}
    dataset, protocol = CASES[model_name]
    return {
        "model": model_name,
        "dataset": dataset,
        "protocol": protocol,
        "batch_size": setup.optim.batch_size,
        "image_shape": list(setup.in_memory.shape[1:]),
        "train_images": len(setup.in_memory),
        "parameters": sum(p.numel() for p in setup.model.parameters()),
        "steps_per_second": {k: round(v, 2) for k, v in rate.items()},
        "mnemo_over_bare": round(rate["mnemo"] / rate["bare"], 3),
        "dataloader_over_bare": round(rate["dataloader"] / rate["bare"], 3),
        "profile": {loop: profile(setup, loop, steps) for loop in ("mnemo", "dataloader")},
        "steps": steps,
        "rounds": rounds,
        "device": str(setup.device),
    }


def run(
    models: list[str],
    data_root: Path,
    work: Path,
    results: Path,
    steps: int,
    rounds: int,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    records = []
    for name in models:
        if name not in CASES:
            raise ValueError(f"unknown model {name!r}; bench train knows {', '.join(CASES)}")
        record = measure(name, data_root, work, steps, rounds, device)
        log(
            f"{name}: {record['steps_per_second']} steps/s; mnemo/bare {record['mnemo_over_bare']}, "
            f"dataloader/bare {record['dataloader_over_bare']}"
        )
        records.append(record)
    report = {
        "records": records,
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "commit": git_commit(REPO),
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / "train-speed.json").write_text(json.dumps(report, indent=1))
    (results / "train-speed.md").write_text(markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Training throughput: `mnemo train`'s loop against a bare loop",
        "",
        f"{m['cpu']}, {m['cores']} cores, {report['threads']} torch threads, torch {m['torch']}, "
        f"commit {report['commit'][:10]}. Median of the rounds, each loop timed in turn "
        "(`mnemo bench train`, benchmarks/train_speed.py).",
        "",
        "| model | data | batch | bare steps/s | mnemo steps/s | mnemo / bare | old DataLoader / bare |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["records"]:
        rate = r["steps_per_second"]
        lines.append(
            f"| {r['model']} | {r['dataset']} {r['protocol']} {'×'.join(map(str, r['image_shape']))} | "
            f"{r['batch_size']} | {rate['bare']} | {rate['mnemo']} | **{r['mnemo_over_bare']}** | "
            f"{r['dataloader_over_bare']} |"
        )
    lines += ["", "## Where the time goes (share of the loop's wall time)", ""]
    for r in report["records"]:
        for loop, shares in r["profile"].items():
            parts = ", ".join(f"{k} {100 * v:.1f} %" for k, v in shares.items() if abs(v) >= 0.005)
            lines.append(f"* **{r['model']}**, {loop}: {parts}")
    return "\n".join(lines) + "\n"
