"""The training loop: Adam, early stopping on validation loss, checkpoints and resume.

Kept nanoGPT-short on purpose: the model builds its own optimisers (``configure_optimizers``) and takes
its own steps (``training_step``), so a model that trains differently (DAAD+'s D step then G step) needs
nothing here (``models/base.py``).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mnemo.models.base import AnomalyModel
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
    history: list[dict[str, float]] = field(default_factory=list)


@torch.no_grad()
def validation_loss(model: AnomalyModel, loader: DataLoader, device: torch.device) -> float:
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


def save_checkpoint(path: Path, model, optimizers, state: TrainState, run_config: dict) -> None:
    torch.save(
        {
            "model_name": model.model_name,
            "model_config": dataclasses.asdict(model.config),
            "model": model.state_dict(),
            "optimizers": [o.state_dict() for o in optimizers],
            "state": state.__dict__,
            "run_config": run_config,
        },
        path,
    )


def fit(
    model: AnomalyModel,
    train_loader: DataLoader,
    val_loader: DataLoader,
    cfg: OptimConfig,
    device: torch.device,
    out_dir: Path,
    run_config: dict,
    resume: bool = False,
    progress: bool = True,
) -> TrainState:
    """Train until ``max_epochs`` or early stopping; leaves the best weights loaded in ``model``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    optimizers = model.configure_optimizers(cfg)
    state = TrainState()
    if resume and (out_dir / CHECKPOINT_LAST).exists():
        state = load_training_state(out_dir / CHECKPOINT_LAST, model, optimizers, device)
    while state.epoch < cfg.max_epochs and state.bad_epochs < cfg.patience:
        model.train()
        desc = f"epoch {state.epoch + 1}/{cfg.max_epochs}"
        bar = tqdm(train_loader, desc=desc, disable=not progress, leave=False)
        sums: dict[str, float] = {}
        steps = 0
        for steps, batch in enumerate(bar, start=1):
            logs = model.training_step(images_of(batch).to(device), optimizers)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{logs['loss']:.4g}")
            if cfg.max_steps_per_epoch and steps >= cfg.max_steps_per_epoch:
                break
        val = validation_loss(model, val_loader, device)
        state.epoch += 1
        record = {"epoch": state.epoch, "val_loss": val, **{k: v / max(steps, 1) for k, v in sums.items()}}
        state.history.append(record)
        if val < state.best_val:
            state.best_val, state.best_epoch, state.bad_epochs = val, state.epoch, 0
            save_checkpoint(out_dir / CHECKPOINT_BEST, model, optimizers, state, run_config)
        else:
            state.bad_epochs += 1
        save_checkpoint(out_dir / CHECKPOINT_LAST, model, optimizers, state, run_config)
        tqdm.write(f"epoch {state.epoch}: train loss {record.get('loss', math.nan):.5g}  val loss {val:.5g}")
    best = torch.load(out_dir / CHECKPOINT_BEST, map_location=device, weights_only=False)
    model.load_state_dict(best["model"])
    return state


def load_training_state(path: Path, model, optimizers, device) -> TrainState:
    ckpt = torch.load(path, map_location=device, weights_only=False)
    if ckpt["model_name"] != model.model_name:
        raise ValueError(
            f"cannot resume: {path} holds a {ckpt['model_name']!r}, this run builds {model.model_name!r}"
        )
    # Non-weight settings (a memory's λ, its rounds) do not show in the state dict: compare configs too.
    saved, built = ckpt.get("model_config", {}), dataclasses.asdict(model.config)
    changed = {k: (saved.get(k), v) for k, v in built.items() if saved.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        raise ValueError(f"cannot resume: {path} was trained with another model config ({detail})")
    model.load_state_dict(ckpt["model"])
    for opt, sd in zip(optimizers, ckpt["optimizers"]):
        opt.load_state_dict(sd)
    return TrainState(**ckpt["state"])
