"""The one scoring contract every Mnemo model follows.

* ``score(x) -> (score[B], heatmap[B, 1, H, W])``: ``x`` is a float batch ``[B, C, H, W]`` already in the
  model's declared normalisation (``config.mean`` / ``config.std`` on pixels scaled to [0, 1]); higher
  scores are more anomalous; the heatmap is at input resolution. ``forward`` *is* ``score`` so that
  TorchScript tracing and ONNX export capture exactly what the service runs.
* ``loss(x) -> dict`` is the separate training-time forward; ``"loss"`` is the total to minimise and the
  other entries are its parts, for logging.

The trainer, the run workflow and the export know a model only through the hooks below, each with a
default that fits a plain autoencoder (as nanoGPT's ``configure_optimizers``), so a model that trains or
exports differently (DAAD+: two optimisers, score scaling fitted after training) overrides a hook instead
of being recognised by its attributes:

* ``configure_optimizers(optim) -> [Optimizer]``: one Adam over every parameter;
* ``training_step(x, optimizers) -> {name: float}``: one step on ``loss(x)["loss"]``;
* ``after_fit(batches)``: once the best weights are back, a pass over the training images; nothing;
* ``export_facts() -> dict | None``: constants the exported graph bakes in, for the manifest; None
  (raises ``ValueError`` when the model is not ready to export);
* ``example_reconstruction(x) -> x̂ | None``: what the example plots show beside the input; None.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn

from mnemo.models.heatmap import GaussianBlur


def adam(params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam with its fused kernel (CPU and CUDA): one pass over every parameter instead of torch's
    per-tensor Python loop, the default on CPU. The same update to rounding; a one-class DAAD step (29 M
    memory weights) 1.2–1.3× faster on one thread (docs/training.md)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)


@dataclass(frozen=True)
class ModelConfig:
    """Fields every model shares; architecture configs extend it.

    ``mean``/``std`` declare the normalisation the data pipeline applies: ``(pixel/255 - mean) / std``
    per channel (one value broadcasts to all channels). ``heatmap_sigma`` is the Gaussian smoothing of
    per-pixel errors, in input pixels (0 turns it off).
    """

    in_channels: int = 1
    image_size: int = 28
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    heatmap_sigma: float = 1.0


class OptimSettings(Protocol):
    """What ``configure_optimizers`` reads of a run's optimiser settings (``training.config.OptimConfig``)."""

    lr: float
    weight_decay: float


class AnomalyModel(nn.Module):
    """Base class: holds the config, routes ``forward`` to ``score``, and gives the hooks their defaults."""

    model_name: str = "?"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.score(x)

    def configure_optimizers(self, optim: OptimSettings) -> list[torch.optim.Optimizer]:
        """One Adam over every parameter (papers 000/001 §4)."""
        return [adam(self.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)]

    def training_step(self, x: torch.Tensor, optimizers: list[torch.optim.Optimizer]) -> dict[str, float]:
        """One step on ``loss(x)["loss"]`` with the single optimiser; returns every loss part, for logging."""
        (optimizer,) = optimizers
        losses = self.loss(x)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        return {k: v.item() for k, v in losses.items()}

    def after_fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Called once after training with the training images, batch by batch; nothing to do by default
        (the iterable is then never read)."""

    def export_facts(self) -> dict[str, float] | None:
        """Constants the exported scoring graph bakes in, recorded in the bundle manifest; None when there
        are none. Raises ``ValueError`` when the model is not ready to export."""
        return None

    def example_reconstruction(self, x: torch.Tensor) -> torch.Tensor | None:
        """x̂ to show beside ``x`` in the example plots; None for a model that does not reconstruct."""
        return None


class ReconstructionModel(AnomalyModel):
    """Scores by reconstruction error, as MemAE, Memorizer, RFTM and DAAD do.

    Subclasses implement ``reconstruct(x) -> (x_hat, aux_losses)``; the training loss is the squared L2
    reconstruction error (paper 001 eq. 2) plus any auxiliary terms (MemAE's entropy loss).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.blur = GaussianBlur(config.heatmap_sigma)

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x_hat, aux = self.reconstruct(x)
        rec = torch.mean((x_hat - x) ** 2)
        return {"loss": rec + sum(aux.values(), torch.zeros_like(rec)), "reconstruction": rec, **aux}

    def error_map(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel squared error averaged over channels, [B, 1, H, W]."""
        x_hat, _ = self.reconstruct(x)
        return ((x - x_hat) ** 2).mean(dim=1, keepdim=True)

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        err = self.error_map(x)
        return err.mean(dim=(1, 2, 3)), self.blur(err)

    def example_reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)[0]
