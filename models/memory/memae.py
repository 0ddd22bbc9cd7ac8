"""MemAE's memory (Gong et al., ICCV 2019, §3.3): attention over N learned prototypes with hard shrinkage.

    w_i = softmax_i(d(z, m_i))                                    (Gong eq. 5)
    ŵ_i = relu(w_i − λ) · w_i / (|w_i − λ| + ε)                    (Gong eq. 7, continuous hard shrinkage)
    ŵ  ← ŵ / ‖ŵ‖₁,    ẑ = ŵ M                                       (Gong eq. 3)
    E(ŵ) = Σ_i −ŵ_i log ŵ_i                                         (Gong eq. 9, entropy loss, weight 2e-4)

The paper defines d as cosine similarity and suggests λ ∈ [1/N, 3/N]; the authors' released code uses a plain
dot product with λ = 0.0025. We follow the paper: cosine, λ = 1/N by default. The two must not be mixed:
cosine logits lie in [−1, 1], so over N = 100 slots every softmax weight is ≥ e⁻²/N ≈ 0.0014 and about
1/N on average; λ = 0.0025 then zeroes next to nothing and ẑ is a near-uniform blend of all slots (MNIST
ROCO class 3, 5 epochs: AUROC 61.5 with that mix, 85.2 with λ = 1/N, 86.2 with the code's dot + 0.0025;
Gong-as-reported in paper 000: 82.1). Nothing is written to the memory at inference (unlike MNAD's
test-time updates), so scores do not depend on batch mates.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def cosine_similarity(z: torch.Tensor, memory: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """cos(z_j, m_i) for every query and memory row, [n, N] (Gong eq. 5's d; paper 001's S).

    The rows' norms divide the [n, N] product instead of normalising the [N, D] memory: the same numbers
    to rounding (``F.normalize``'s eps included) without writing, and back-propagating through, a
    normalised copy of the whole memory every step. With a large memory and a small batch (one-class
    DAAD: N = 500 rows of 32 768, batch 8) that copy took a third of a training step (docs/training.md)."""
    return (F.normalize(z, dim=-1) @ memory.t()) / memory.norm(dim=-1).clamp_min(eps)


def hard_shrink_relu(w: torch.Tensor, threshold: float, eps: float = 1e-12) -> torch.Tensor:
    """Gong eq. 7: zero weights below ``threshold``, keep the rest (almost) unchanged, differentiably."""
    return F.relu(w - threshold) * w / (torch.abs(w - threshold) + eps)


def attention_entropy(w: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Gong eq. 9, averaged over query vectors."""
    return (-w * torch.log(w + eps)).sum(dim=-1).mean()


class MemAEMemory(nn.Module):
    def __init__(
        self, num_slots: int, dim: int, shrink_threshold: float | None = None, similarity: str = "cosine"
    ) -> None:
        """``shrink_threshold`` is λ; None means 1/N, the low end of the paper's range."""
        super().__init__()
        if similarity not in ("cosine", "dot"):
            raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")
        bound = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(num_slots, dim).uniform_(-bound, bound))
        self.shrink_threshold = 1.0 / num_slots if shrink_threshold is None else shrink_threshold
        self.similarity = similarity

    def address(self, z: torch.Tensor) -> torch.Tensor:
        """Sparse, L1-normalised addressing weights ŵ, [n, N]."""
        cosine = self.similarity == "cosine"
        logits = cosine_similarity(z, self.weight) if cosine else z @ self.weight.t()
        w = torch.softmax(logits, dim=-1)
        if self.shrink_threshold > 0:
            w = hard_shrink_relu(w, self.shrink_threshold)
            w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return w

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.address(z)
        return w @ self.weight, w
