"""RFTM's random-forgetting twin memory (paper 001, §3.2).

Basic unit (eq. 3):  h_out = σ(τ_0(π(T_k(ρ_ν ⊙ S(h_in, M))))) π(ρ_ν eᵀ ⊙ M)
  S    cosine similarity between the query and every memory row,
  ρ_ν  random forgetting gate over the N rows,
  T_k  keep the k most similar remembered rows, τ_0 keep those with similarity > 0,
  σ    softmax over the kept similarities; the read-out is their weighted sum of memory rows.
Twin memory (eqs. 4–5): hippocampus {N=50, k=15, ν=0.1} → P → cortex {N=1000, k=5, ν=0.5} → P,
with the connector P = BN-LeakyReLU.

Decisions where the paper is ambiguous (also in docs/models.md):
* ν is read as the *forgetting* rate: round(ν·N) rows are forgotten and the rest stay addressable. The
  literal sentence ("νN elements … set to one") would leave 5 rows for a top-15 in the hippocampus, which
  cannot be what the table's settings mean.
* One gate is drawn per forward pass (ρ_ν is a single vector in the paper) and shared by the batch.
* Inference forgets nothing — like dropout, forgetting is a training-time regulariser; this keeps scores
  deterministic and independent of batch mates.
* If no kept row has positive similarity, τ_0 would leave an empty softmax; the single most similar row
  is then kept so the read-out stays defined.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mnemo.models.memory.memae import cosine_similarity


class ForgettingMemory(nn.Module):
    """The basic unit of eq. 3."""

    def __init__(self, num_slots: int, dim: int, top_k: int, forget_rate: float) -> None:
        super().__init__()
        if not 0.0 <= forget_rate < 1.0:
            raise ValueError(f"forget_rate must be in [0, 1), got {forget_rate}")
        self.num_forgotten = round(forget_rate * num_slots)
        if not 1 <= top_k <= num_slots - self.num_forgotten:
            remembered = num_slots - self.num_forgotten
            raise ValueError(f"top_k={top_k} must be in [1, {remembered}] (N minus the forgotten rows)")
        self.weight = nn.Parameter(torch.randn(num_slots, dim))
        self.top_k = top_k

    def forget_gate(self, device: torch.device) -> torch.Tensor:
        """ρ_ν: True for rows that stay addressable in this pass."""
        n = self.weight.shape[0]
        keep = torch.ones(n, dtype=torch.bool, device=device)
        if self.training and self.num_forgotten:
            keep[torch.randperm(n, device=device)[: self.num_forgotten]] = False
        return keep

    def address(self, h: torch.Tensor) -> torch.Tensor:
        """Addressing weights [n, N]: softmax over kept rows, exact zeros elsewhere."""
        s = cosine_similarity(h, self.weight)  # S(h, M)
        very_low = torch.finfo(s.dtype).min
        remembered = s.masked_fill(~self.forget_gate(s.device), very_low)  # ρ_ν ⊙ S, then π
        top = torch.topk(remembered, self.top_k, dim=-1).values  # T_k (a threshold, so it exports to ONNX)
        in_top = remembered >= top[:, -1:]
        keep = in_top & ((s > 0) | (remembered >= top[:, :1]))  # τ_0, never empty
        return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)  # σ

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.address(h)
        return w @ self.weight, w


def connector(dim: int) -> nn.Sequential:
    """P: the BN-LeakyReLU memory connector."""
    return nn.Sequential(nn.BatchNorm1d(dim), nn.LeakyReLU())


class TwinMemory(nn.Module):
    """Eqs. 4–5: hippocampus → P → cortex → P."""

    def __init__(self, dim: int, hippocampus: tuple[int, int, float], cortex: tuple[int, int, float]) -> None:
        super().__init__()
        self.hippocampus = ForgettingMemory(hippocampus[0], dim, hippocampus[1], hippocampus[2])
        self.cortex = ForgettingMemory(cortex[0], dim, cortex[1], cortex[2])
        self.connect_h = connector(dim)
        self.connect_c = connector(dim)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h1, _ = self.hippocampus(h)  # eq. 4
        h3, w = self.cortex(self.connect_h(h1))  # eq. 5, h'' = P(h')
        return self.connect_c(h3), w
