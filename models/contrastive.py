"""Contrastive learning's two pieces, as AnoMem's stage 1 uses them (paper 002 §3.1, appendix B).

* ``ContrastiveViews``: random views t(x) of a batch, SimCLR's augmentations on tensors (no torchvision);
* ``nt_xent``: SimCLR's NT-Xent loss ℓ_NTX over a two-view batch.

Training only: neither is part of the exported scoring graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mnemo.models.heatmap import GaussianBlur


class ContrastiveViews(nn.Module):
    """One random view t(x) per call, on normalised tensors: SimCLR's recipe (paper 002 appendix B), adapted.

    Random resized crop + horizontal flip (one affine resample), brightness, contrast and saturation
    jitter, Gaussian blur and noise, all on [0, 1] pixels. Differences from SimCLR: crops keep ≥ 20 % of
    the area (not 8 %: small inspection images lose their structure), jitter is always applied in a fixed
    order with no hue jitter or random greyscale, and the blur has a fixed σ applied with probability 1/2
    (SimCLR draws σ ∈ [0.1, 2]).
    """

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        crop_scale: tuple[float, float],
        jitter: float,
        blur_sigma: float,
        noise_std: float,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.crop_scale = crop_scale
        self.jitter = jitter
        self.noise_std = noise_std
        self.blur = GaussianBlur(blur_sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x * self.std + self.mean
        u = self.colour(self.crop_and_flip(u))
        u = self.random_blur(u) + self.noise_std * torch.randn_like(u)
        return (u.clamp(0, 1) - self.mean) / self.std

    def uniform(self, x: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.empty(x.shape[0], device=x.device).uniform_(low, high)

    def crop_and_flip(self, u: torch.Tensor) -> torch.Tensor:
        area = self.uniform(u, *self.crop_scale)
        aspect = torch.exp(self.uniform(u, math.log(3 / 4), math.log(4 / 3)))
        sx, sy = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
        tx, ty = (1 - sx) * self.uniform(u, -1, 1), (1 - sy) * self.uniform(u, -1, 1)
        flip = torch.where(torch.rand_like(sx) < 0.5, -1.0, 1.0)
        zero = torch.zeros_like(sx)
        theta = torch.stack([torch.stack([sx * flip, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)
        grid = F.affine_grid(theta, list(u.shape), align_corners=False)
        return F.grid_sample(u, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def colour(self, u: torch.Tensor) -> torch.Tensor:
        j = self.jitter
        u = u * self.uniform(u, 1 - j, 1 + j).view(-1, 1, 1, 1)  # brightness
        grey = u.mean(dim=1, keepdim=True)
        level = grey.mean(dim=(2, 3), keepdim=True)
        u = level + (u - level) * self.uniform(u, 1 - j, 1 + j).view(-1, 1, 1, 1)  # contrast
        grey = u.mean(dim=1, keepdim=True)
        return grey + (u - grey) * self.uniform(u, 1 - j, 1 + j).view(-1, 1, 1, 1)  # saturation

    def random_blur(self, u: torch.Tensor) -> torch.Tensor:
        b, c, h, w = u.shape
        blurred = self.blur(u.reshape(b * c, 1, h, w)).reshape(b, c, h, w)
        return torch.where(torch.rand(b, 1, 1, 1, device=u.device) < 0.5, blurred, u)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 2 without the memory: mean over the 2B anchors of ℓ_NTX, for pairs (a_k, b_k).

    ``a``, ``b``: ``[..., B, D]``; returns ``[...]``. Each anchor's positive is its partner in the other
    view and the denominator runs over every other vector of the 2B multi-view batch (p ≠ anchor).
    """
    n = a.shape[-2]
    z = F.normalize(torch.cat([a, b], dim=-2), dim=-1)
    sim = (z @ z.transpose(-1, -2)) / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    log_p = torch.log_softmax(sim.masked_fill(self_mask, float("-inf")), dim=-1)
    positives = torch.cat(
        [log_p[..., :n, n:].diagonal(dim1=-2, dim2=-1), log_p[..., n:, :n].diagonal(dim1=-2, dim2=-1)], -1
    )
    return -positives.mean(dim=-1)
