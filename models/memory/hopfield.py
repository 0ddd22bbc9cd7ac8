"""AnoMem's memory: a modern Hopfield layer with learnable patterns (paper 002 §2; Ramsauer et al. 2021).

    ξ^(t+1) = softmax(β ξ^(t) X) Xᵀ,    ξ^(0) = the query,  X ∈ R^{d×N}          (paper 002 §2)

``patterns`` holds Xᵀ (one stored pattern per row), so in code the update is softmax(β ξ Pᵀ) P, P = Xᵀ.
Every read-out is a convex combination of the stored patterns; with a large β it snaps to the most
similar one. Queries may have any leading shape ``[..., d]``, which is how AnoMem applies one memory to
every spatial position of a feature map (eq. 5's ``(HF(z))_{i,j} = HF(z_{i,j})``).

Decisions where the paper is silent (also in AnoMem's module docstring):
* ``steps`` fixed updates (default 1) instead of "until convergence": a data-dependent loop would not
  trace or export, and Ramsauer et al. show one update usually converges.
* No normalisation by default: the paper writes the plain dot product. ``normalize=True`` L2-normalises
  queries and patterns (retrieval on the unit sphere, as cosine-based memories such as MemAE do); then
  ``state(z)`` is the normalised query, the vector a read-out should be compared with.
* Patterns are initialised uniform ±1/√d (MemAE's initialisation; the paper gives none).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class HopfieldMemory(nn.Module):
    def __init__(
        self, num_slots: int, dim: int, beta: float = 2.0, steps: int = 1, normalize: bool = False
    ) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        bound = 1.0 / math.sqrt(dim)
        self.patterns = nn.Parameter(torch.empty(num_slots, dim).uniform_(-bound, bound))
        self.beta = float(beta)
        self.steps = steps
        self.normalize = normalize

    def state(self, z: torch.Tensor) -> torch.Tensor:
        """The query in the space the memory retrieves in (unit sphere when ``normalize``)."""
        return F.normalize(z, dim=-1) if self.normalize else z

    def stored(self) -> torch.Tensor:
        return F.normalize(self.patterns, dim=-1) if self.normalize else self.patterns

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Read-out HF(z) ``[..., d]`` and the last update's weights ``[..., N]``."""
        patterns = self.stored()
        xi, weights = self.update(self.state(z), patterns)
        for _ in range(self.steps - 1):  # a fixed count, so it unrolls when traced
            xi, weights = self.update(xi, patterns)
        return xi, weights

    def update(self, xi: torch.Tensor, patterns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step ξ ← softmax(β ξ X) Xᵀ."""
        weights = torch.softmax(self.beta * (xi @ patterns.t()), dim=-1)
        return weights @ patterns, weights
