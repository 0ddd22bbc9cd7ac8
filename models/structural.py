"""Structural similarity (Wang et al. 2004) as a per-pixel map, for losses and structural error maps.

Squared error treats a one-pixel shift of a fine grid line like a defect; SSIM compares local means,
contrasts and correlations, so it rates texture and edges rather than exact intensities (AE-SSIM,
Bergmann et al. 2019). A module with its window as a buffer, so it traces to TorchScript and exports to
ONNX with known kernel shapes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mnemo.models.heatmap import gaussian_kernel

C1, C2 = 0.01**2, 0.03**2  # Wang et al.'s constants for a data range of 1


class SSIMMap(nn.Module):
    """SSIM of two batches [B, C, H, W] with pixels in [0, 1] → [B, 1, H, W], averaged over channels.

    The Gaussian window (σ = 1.5, radius 5: an 11-pixel window) is Wang et al.'s; borders reflect.
    """

    def __init__(self, channels: int, sigma: float = 1.5) -> None:
        super().__init__()
        k = gaussian_kernel(sigma)
        self.radius = (k.numel() - 1) // 2
        self.channels = channels
        self.register_buffer("k_h", k.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), persistent=False)
        self.register_buffer("k_v", k.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), persistent=False)

    def local_mean(self, x: torch.Tensor) -> torch.Tensor:
        r = self.radius
        x = F.conv2d(F.pad(x, (r, r, r, r), mode="reflect"), self.k_h, groups=self.channels)
        return F.conv2d(x, self.k_v, groups=self.channels)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mu_a, mu_b = self.local_mean(a), self.local_mean(b)
        var_a = self.local_mean(a * a) - mu_a**2
        var_b = self.local_mean(b * b) - mu_b**2
        cov = self.local_mean(a * b) - mu_a * mu_b
        num = (2 * mu_a * mu_b + C1) * (2 * cov + C2)
        den = (mu_a**2 + mu_b**2 + C1) * (var_a + var_b + C2)
        return (num / den).mean(dim=1, keepdim=True)
