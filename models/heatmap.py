"""Turning per-pixel errors into heatmaps: fixed Gaussian smoothing and resizing to the input.

Everything here is plain conv/interpolate so it traces to TorchScript and exports to ONNX.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian with radius ceil(3·sigma)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


class GaussianBlur(nn.Module):
    """Separable Gaussian blur of a one-channel map [B, 1, H, W]; sigma <= 0 is the identity.

    Reconstruction errors are spiky per pixel; smoothing them is how MemAE-style heatmaps are usually
    shown and makes pixel AUROC less noisy. Replicate padding keeps borders from fading.
    """

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = float(sigma)
        kernel = gaussian_kernel(sigma) if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel, persistent=False)
        self.radius = (kernel.numel() - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sigma <= 0:
            return x
        r = self.radius
        kh = self.kernel.view(1, 1, 1, -1)
        kv = self.kernel.view(1, 1, -1, 1)
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kh)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), kv)


def to_input_size(heat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of [B, 1, h, w] to the input's (H, W)."""
    if tuple(heat.shape[-2:]) == tuple(size):
        return heat
    return F.interpolate(heat, size=size, mode="bilinear", align_corners=False)
