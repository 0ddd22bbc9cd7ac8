"""DAAD's block-wise memory (paper 003 §3.1.2): divide a feature map into blocks, address, reassemble.

A map f of size H×W×C is divided evenly into Q = r_h × r_w × r_c blocks of (H/r_h)×(W/r_w)×(C/r_c); each
block, flattened, is one query q^k ∈ R^D. Every query reads from the scale's own bank M ∈ R^{N×D}:

    w_i = softmax_i(cos(q^k, m_i))                                        (eq. 1)
    q̂^k = w M,  with weights below 1/N dropped and w renormalised          (eq. 2 and the text below it)

and the read-out blocks are put back where they came from to form f̂. Addressing is MemAE's
(``MemAEMemory`` with cosine similarity and threshold λ = 1/N), so the drop uses the same continuous hard
shrinkage (``hard_shrink_relu``) and has the same gradient behaviour.

Decisions where the paper is silent:
* A side smaller than its division rate (e.g. a 4×4 map with r_h = r_w = 8) is divided into as many
  blocks as it has positions, i.e. the rate is clamped to the side: blocks become single positions,
  MemAE's pixel-wise memory, which is the finest division the map allows. A side the (clamped) rate
  does not divide evenly is an error, as the paper divides "evenly".
* Each block is flattened channel-major (c, h, w); the order only fixes the layout of the learned items.
* Memory items are initialised uniform ±1/√D (MemAE's initialisation; the paper gives none).

Note that cosine logits lie in [−1, 1], so the softmax of eq. 1 is flat (every w_i within a factor e² of
1/N): the 1/N cut typically keeps a large share of the items (one-class MNIST, N = 500: 210–290 kept at
every scale, ``benchmarks/memory_addressing.py``), not the "small number" the paper's text expects. That
is the paper's rule, kept as written; ``similarity="dot"`` swaps in the MemAE authors' dot product, which
can address single items but did not stop one-class AUROC falling with training (docs/models.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from mnemo.models.memory.memae import MemAEMemory


def effective_rates(shape: tuple[int, int, int], rates: tuple[int, int, int]) -> tuple[int, int, int]:
    """Division rates (r_c, r_h, r_w) for a C×H×W map, each clamped to its side; checks even division.

    ``rates`` is given in the paper's order (r_h, r_w, r_c).
    """
    r_h, r_w, r_c = rates
    if min(rates) < 1:
        raise ValueError(f"division rates must be >= 1, got {rates}")
    clamped = tuple(min(r, side) for r, side in zip((r_c, r_h, r_w), shape))
    for side, r, axis in zip(shape, clamped, ("channels", "height", "width")):
        if side % r:
            raise ValueError(f"{axis} {side} cannot be divided evenly into {r} blocks")
    return clamped


class BlockwiseMemory(nn.Module):
    """One scale's memory: ``[B, C, H, W] -> (f̂ [B, C, H, W], weights [B, Q, N])``."""

    def __init__(
        self,
        num_slots: int,
        channels: int,
        height: int,
        width: int,
        rates: tuple[int, int, int] = (8, 8, 1),
        similarity: str = "cosine",
    ) -> None:
        super().__init__()
        self.shape = (channels, height, width)
        self.rates = effective_rates(self.shape, rates)  # (r_c, r_h, r_w)
        self.block = tuple(side // r for side, r in zip(self.shape, self.rates))  # (C/r_c, H/r_h, W/r_w)
        self.num_blocks = math.prod(self.rates)  # Q
        self.memory = MemAEMemory(num_slots, math.prod(self.block), 1.0 / num_slots, similarity)

    def divide(self, f: torch.Tensor) -> torch.Tensor:
        """Blocks of ``f`` as query rows ``[B·Q, D]``, ordered (image, c-block, h-block, w-block)."""
        (rc, rh, rw), (bc, bh, bw) = self.rates, self.block
        blocks = f.reshape(-1, rc, bc, rh, bh, rw, bw).permute(0, 1, 3, 5, 2, 4, 6)
        return blocks.reshape(-1, bc * bh * bw)

    def assemble(self, q: torch.Tensor) -> torch.Tensor:
        """Inverse of ``divide``: query rows ``[B·Q, D]`` back to a ``[B, C, H, W]`` map."""
        (rc, rh, rw), (bc, bh, bw) = self.rates, self.block
        blocks = q.reshape(-1, rc, rh, rw, bc, bh, bw).permute(0, 1, 4, 2, 5, 3, 6)
        return blocks.reshape(-1, *self.shape)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        read, w = self.memory(self.divide(f))  # eqs. 1-2 per block
        return self.assemble(read), w.reshape(-1, self.num_blocks, w.shape[-1])
