"""The training loop: Adam, early stopping on validation loss, a time budget, checkpoints and resume.

Kept nanoGPT-short on purpose: the model builds its own optimisers (``configure_optimizers``) and takes
its own steps (``training_step``), so a model that trains differently (DAAD+'s D step then G step) needs
nothing here (``models/base.py``).

Training ends at ``max_epochs``, at early stopping, at ``max_steps`` optimizer steps, at the time budget
(``max_minutes``) or at the first Ctrl-C; the last three stop after the current step, validate that partial
epoch, and hand the best weights back, so the run still calibrates, evaluates and reports. A second
Ctrl-C aborts at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mnemo.machine import usable_cores
from mnemo.models.base import AnomalyModel
from mnemo.training import distributed
from mnemo.training.config import OptimConfig
from mnemo.training.evaluate import images_of

CHECKPOINT_LAST = "last.pt"
CHECKPOINT_BEST = "best.pt"


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` → the first CUDA device when one is present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def set_threads(threads: int = 0) -> int:
    """torch's intra-op threads: ``threads``, or 0 for every usable core (shared out among the processes
    torchrun starts on this machine). More threads than free cores only spin (several runs side by side
    want one each); returns the count set."""
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = every usable core), got {threads}")
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(threads or max(1, usable_cores() // local_processes))
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    best_val: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    steps: int = 0  # optimizer steps over all resumes
    history: list[dict[str, float]] = field(default_factory=list)
    stop_reason: str = ""  # max epochs, early stopping, max steps, time budget, interrupted
    train_seconds: float = 0.0  # wall time in the training loop, validation included, over all resumes


def _ctrl_c_handled_elsewhere() -> bool:
    """Whether SIGINT has a Python handler other than Python's own (which raises ``KeyboardInterrupt``)."""
    handler = signal.getsignal(signal.SIGINT)
    return callable(handler) and handler is not signal.default_int_handler


class StopRequest:
    """Asks the loop to stop after the current step: at ``max_steps`` (counted in ``state.steps``), at the
    deadline, or on the first Ctrl-C (SIGINT).

    A second Ctrl-C raises ``KeyboardInterrupt`` as usual. The handler is installed only in the main
    thread (Python allows no other) and only when the process has no Ctrl-C handler of its own (a caller
    such as ``mnemo bench accuracy`` that wants Ctrl-C to abort at once, so that a run is never finished
    on a cut-short epoch); the previous one is restored on exit.
    """

    def __init__(self, max_minutes: float, max_steps: int = 0, state: TrainState | None = None) -> None:
        self.budget_s = 60 * max_minutes
        self.deadline = time.monotonic() + self.budget_s if max_minutes > 0 else math.inf
        self.max_steps = max_steps
        self.state = state or TrainState()
        self.reason = ""
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread() and not _ctrl_c_handled_elsewhere():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def progress(self, epoch_share: float) -> float:
        """How far training is, 0…1: the largest of the epoch share, the step share and the time share."""
        shares = [epoch_share]
        if self.max_steps:
            shares.append(self.state.steps / self.max_steps)
        if not math.isinf(self.deadline):
            shares.append(1 - (self.deadline - time.monotonic()) / self.budget_s)
        return max(shares)

    def _on_sigint(self, signum, frame) -> None:
        if self.reason == "interrupted":
            raise KeyboardInterrupt
        self.reason = "interrupted"
        tqdm.write("Ctrl-C: stopping after this step and finishing the run (Ctrl-C again aborts)")

    def agreed(self) -> bool:
        """``requested``, on every rank at once under torchrun (a stop on one stops all after this step)."""
        if distributed.agree(self.requested) and not self.reason:
            self.reason = "stopped on another rank"
        return bool(self.reason)

    @property
    def requested(self) -> bool:
        if not self.reason and self.max_steps and self.state.steps >= self.max_steps:
            self.reason = "max steps"
        if not self.reason and time.monotonic() >= self.deadline:
            self.reason = "time budget"
        return bool(self.reason)


@torch.inference_mode()
def validation_loss(model: AnomalyModel, loader: Iterable, device: torch.device) -> float:
    """Mean objective on held-out good images, in eval mode (no forgetting, no sampling).

    Where the loss has a reconstruction part it alone decides (DAAD+'s adversarial term is a noisy
    early-stopping signal); otherwise the whole training objective does.
    """
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        x = images_of(batch).to(device)
        losses = model.loss(x)
        total += losses.get("reconstruction", losses["loss"]).item() * len(x)
        count += len(x)
    return total / max(count, 1)


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[None]:
    """A Ctrl-C during the block reaches its handler when the block ends (main thread only; elsewhere
    Python delivers no signal). For a handler that aborts at once, as ``mnemo bench accuracy``'s does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        for frame in held if callable(previous) else ():
            previous(signal.SIGINT, frame)  # each in turn: the trainer's second Ctrl-C aborts
        if held and previous == signal.SIG_DFL:
            raise KeyboardInterrupt


def save_checkpoint(path: Path, model, optimizers, state: TrainState, run_config: dict) -> None:
    """Written beside ``path`` and renamed over it: a run killed mid-save (a one-class DAAD checkpoint is
    a few hundred MB) keeps its previous checkpoint whole, so it can still be resumed."""
    partial = path.with_name(path.name + ".partial")
    torch.save(
        {
            "model_name": model.model_name,
            "model_config": dataclasses.asdict(model.config),
            "model": model.state_dict(),
            "optimizers": [o.state_dict() for o in optimizers],
            "state": state.__dict__,
            "run_config": run_config,
        },
        partial,
    )
    os.replace(partial, path)


def fit(
    model: AnomalyModel,
    train_loader: Iterable,
    val_loader: Iterable,
    cfg: OptimConfig,
    device: torch.device,
    out_dir: Path,
    run_config: dict,
    resume: bool = False,
    progress: bool = True,
) -> TrainState:
    """Train until a stop (module docstring); leaves the best weights loaded in ``model``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    optimizers = model.configure_optimizers(cfg)
    state = TrainState()
    if resume and (out_dir / CHECKPOINT_LAST).exists():
        state = load_training_state(out_dir / CHECKPOINT_LAST, model, optimizers, device)
    distributed.broadcast_state(model)  # under torchrun: rank 0's weights everywhere (distributed.py)
    distributed.average_gradients_before_steps(optimizers)
    main = distributed.is_main()
    progress = progress and main
    started = time.monotonic() - state.train_seconds
    with StopRequest(cfg.max_minutes, cfg.max_steps, state) as stop:
        while state.epoch < cfg.max_epochs and state.bad_epochs < cfg.patience and not stop.agreed():
            epoch_started = time.monotonic()
            record = train_epoch(model, train_loader, optimizers, cfg, state, device, stop, progress)
            distributed.broadcast_state(model, buffers_only=True)  # one set of BatchNorm statistics
            record["val_loss"] = val = distributed.mean(validation_loss(model, val_loader, device))
            record["seconds"] = round(time.monotonic() - epoch_started, 2)  # training and validation
            state.history.append(record)
            improved = val < state.best_val
            if improved:
                state.best_val, state.best_epoch, state.bad_epochs = val, state.epoch, 0
            else:
                state.bad_epochs += 1
            state.train_seconds = time.monotonic() - started
            if main:
                with ctrl_c_held():  # best and last as a pair: a resumed run's state knows its best weights
                    if improved:
                        save_checkpoint(out_dir / CHECKPOINT_BEST, model, optimizers, state, run_config)
                    save_checkpoint(out_dir / CHECKPOINT_LAST, model, optimizers, state, run_config)
                loss, took = record.get("loss", math.nan), record["seconds"]
                tqdm.write(f"epoch {state.epoch}: train loss {loss:.5g}  val loss {val:.5g}  ({took:.0f} s)")
        state.train_seconds = time.monotonic() - started  # a stop seen between epochs ends here too
        state.stop_reason = stop.reason or (
            "early stopping" if state.bad_epochs >= cfg.patience else "max epochs"
        )
    if main:
        tqdm.write(f"training stopped ({state.stop_reason}); best epoch {state.best_epoch}")
        best = torch.load(out_dir / CHECKPOINT_BEST, map_location=device, weights_only=False)
        model.load_state_dict(best["model"])
    return state


def train_epoch(model, loader, optimizers, cfg, state, device, stop: StopRequest, progress: bool) -> dict:
    """One pass over ``loader`` (or less: ``max_steps_per_epoch``, a stop request); mean logs."""
    model.train()
    bar = tqdm(loader, desc=f"epoch {state.epoch + 1}/{cfg.max_epochs}", disable=not progress, leave=False)
    sums: dict[str, float] = {}
    steps = 0
    if hasattr(getattr(loader, "sampler", None), "set_epoch"):  # a DistributedSampler reshuffles per epoch
        loader.sampler.set_epoch(state.epoch)
    for steps, batch in enumerate(bar, start=1):
        if cfg.schedule == "cosine":
            set_cosine_lr(optimizers, stop.progress((state.epoch + steps / len(loader)) / cfg.max_epochs))
        logs = model.training_step(images_of(batch).to(device), optimizers)
        state.steps += 1
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{logs['loss']:.4g}")
        if (cfg.max_steps_per_epoch and steps >= cfg.max_steps_per_epoch) or stop.agreed():
            break
    bar.close()
    state.epoch += 1
    return {"epoch": state.epoch, "steps": steps, **{k: v / max(steps, 1) for k, v in sums.items()}}


def set_cosine_lr(optimizers: list[torch.optim.Optimizer], progress: float) -> None:
    """lr = lr₀ · ½(1 + cos(π · progress)) (SGDR without restarts, Loshchilov & Hutter 2017): the
    weights settle at the end of the budget instead of stopping mid-stride."""
    factor = 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    for opt in optimizers:
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * factor


class ResumeMismatch(ValueError):
    """The checkpoint to resume from was trained as another model or configuration: continuing it would
    mix two runs, so the caller starts over or says how to continue it as it was."""


def read_checkpoint(path: Path, device: torch.device | str = "cpu", mmap: bool = False) -> dict:
    """A training checkpoint; ``ResumeMismatch`` when it cannot be read (truncated, not a checkpoint).
    ``mmap``: tensors are read only when touched, for a caller that wants the settings, not the weights."""
    try:
        return torch.load(path, map_location=device, weights_only=False, mmap=mmap)
    except Exception as exc:  # torch.load raises whatever unpickling a damaged file hits
        raise ResumeMismatch(f"cannot resume: {path} is unreadable ({type(exc).__name__}: {exc})") from exc


def load_training_state(path: Path, model, optimizers, device) -> TrainState:
    ckpt = read_checkpoint(path, device)
    if ckpt["model_name"] != model.model_name:
        raise ResumeMismatch(
            f"cannot resume: {path} holds a {ckpt['model_name']!r}, this run builds {model.model_name!r}"
        )
    # Non-weight settings (a memory's λ, its rounds) do not show in the state dict: compare configs too.
    # Only fields the checkpoint records are compared: one added to the config since cannot be checked.
    saved, built = ckpt.get("model_config", {}), dataclasses.asdict(model.config)
    changed = {k: (saved[k], v) for k, v in built.items() if k in saved and saved[k] != v}
    if changed:
        detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        keep = " ".join(f"--set 'model_config.{k}={json.dumps(v)}'" for k, (v, _) in sorted(changed.items()))
        raise ResumeMismatch(
            f"cannot resume: {path} was trained with another model config ({detail}); "
            f"to continue it as it was trained, add {keep}"
        )
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:  # same config, other parameters: the architecture changed since
        raise ResumeMismatch(f"cannot resume: {path} does not fit this model's parameters: {exc}") from exc
    for opt, sd in zip(optimizers, ckpt["optimizers"]):
        opt.load_state_dict(sd)
        for group in opt.param_groups:  # the kernel is this build's choice, not the checkpoint's
            group.update({flag: opt.defaults[flag] for flag in ("fused", "foreach") if flag in opt.defaults})
    return TrainState(**ckpt["state"])
