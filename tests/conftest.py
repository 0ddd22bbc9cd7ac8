"""Shared fixtures: tiny configurations that keep every model's tests fast on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

from mnemo import models

# Small but structurally complete versions of every registered model (same code paths as the defaults).
TINY_CONFIGS: dict[str, dict] = {
    "ae": dict(hidden_dims=(64, 32, 16)),
    "memae": dict(hidden_dims=(64, 32, 16), memory_size=20),
    "memorizer": dict(hidden_dims=(64, 32, 16), memory_size=8, rounds=3),
    "rftm": dict(hidden_dims=(64, 32, 16), hippocampus=(20, 5, 0.1), cortex=(40, 3, 0.5)),
    "daad": dict(image_size=32, widths=(8, 16, 16), memory_size=10),
    "daad_plus": dict(image_size=32, widths=(8, 16, 16), memory_size=10, disc_widths=(8, 16)),
    "restore": dict(image_size=32, widths=(8, 16, 16), memory_size=10, head_widths=(8, 16), score_pool=5),
    "anomem": dict(
        image_size=32,
        stage_widths=(8, 16, 16, 32),
        stage_depths=(1, 1, 1, 1),
        memory_sizes=(16, 8),
        oe_hidden=16,
    ),
}


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.create(name, **TINY_CONFIGS.get(name, {}))


def batch_for(model: torch.nn.Module, batch: int = 4, seed: int = 1) -> torch.Tensor:
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


@pytest.fixture(params=models.list_models())
def model_name(request) -> str:
    return request.param
