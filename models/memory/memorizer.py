"""Memorizer's multi-round memory (paper 000, §3.2–3.3).

    Memory(H, M) = σ(H W_S (M W_S)ᵀ) M                                  (eq. 1)
    H̃_r = Memory(H̃_{r−1} + H, M_r),  H̃_0 = H,  r = 1..R               (eq. 2)

σ is the softmax over the N memory slots. The read-out is always a convex combination of the rows of
M_R, which is what bounds the decoder's input to the learned patterns. Gradients reach H through every
round (eq. 3), and there is no extra loss term.

The paper indexes only M by round, so one mapping W_S is shared by H, M and all R rounds. Memory rows
are initialised uniform ±1/√F (MemAE's initialisation; the paper gives none).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class MultiRoundMemory(nn.Module):
    def __init__(self, num_slots: int, dim: int, rounds: int = 8) -> None:
        super().__init__()
        if rounds < 1:
            raise ValueError("rounds must be >= 1")
        bound = 1.0 / math.sqrt(dim)
        self.memories = nn.Parameter(torch.empty(rounds, num_slots, dim).uniform_(-bound, bound))
        self.shared = nn.Linear(dim, dim, bias=False)  # W_S

    def read(self, h: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 1 for one round: softmax attention in the shared space, read-out from M itself."""
        attn = torch.softmax(self.shared(h) @ self.shared(memory).t(), dim=-1)
        return attn @ memory, attn

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h_tilde, attn = h, h.new_zeros(h.shape[0], self.memories.shape[1])
        for memory in self.memories:  # eq. 2
            h_tilde, attn = self.read(h_tilde + h, memory)
        return h_tilde, attn
