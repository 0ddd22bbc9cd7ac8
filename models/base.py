"""The one scoring contract every Mnemo model follows.

* ``score(x) -> (score[B], heatmap[B, 1, H, W])``: ``x`` is a float batch ``[B, C, H, W]`` already in the
  model's declared normalisation (``config.mean`` / ``config.std`` on pixels scaled to [0, 1]); higher
  scores are more anomalous; the heatmap is at input resolution. ``forward`` *is* ``score`` so that
  TorchScript tracing and ONNX export capture exactly what the service runs.
* ``loss(x) -> dict`` is the separate training-time forward; ``"loss"`` is the total to minimise and the
  other entries are its parts, for logging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from mnemo.models.heatmap import GaussianBlur


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


class AnomalyModel(nn.Module):
    """Base class: holds the config and routes ``forward`` to ``score``."""

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
