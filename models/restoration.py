"""Restoring memory UNet: a memory autoencoder trained to *remove* synthetic anomalies, plus a segmenter.

Why: trained on good images only, a DAAD-style UNet learns to copy its input, defects included, so its
reconstruction error misses real defects (issue "real defects": 0.735 image AUROC on solar cells). Here
the same memory UNet (DAAD's ``MemoryUNet``: a block-wise memory on every skip, paper 003 eqs. 1-2) sees
good images with synthetic anomalies painted in (``anomaly_synthesis``) and must return the clean image;
a small discriminative UNet then reads (input, restoration) and marks where they disagree in a way that
matters, trained on the synthetic masks. The recipe is DRAEM's (Zavrtanik et al., ICCV 2021) with a
memory in the reconstructive network; it is not one of the four papers, and their models keep their
paper-faithful definitions.

    x̃, m = synthesize(x)                            (anomaly_synthesis; m = changed pixels)
    x̂ = G(x̃)                                        (memory UNet, restores)
    L_rec = ‖x̂ − x‖² + λ_ssim (1 − SSIM(x̂, x))       (DRAEM eq. 1: L2 + SSIM)
    L_seg = Focal(S(x̃ ⊕ x̂), m),  γ = 2              (DRAEM eq. 3)
    heatmap = blur(σ(S(x ⊕ G(x))));  score = max of its ``score_pool``-wide local mean (DRAEM §3.4)

``score_map`` picks what the heatmap is: ``segment`` (the discriminative head, default), ``ssim``
(1 − SSIM(x, x̂), Bergmann et al. 2019, no head) or ``l2`` (squared error, as the papers' models).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from mnemo.models.anomaly_synthesis import synthesize
from mnemo.models.backbones import conv_block, deconv_block
from mnemo.models.base import AnomalyModel, ModelConfig
from mnemo.models.daad import DAADConfig, MemoryUNet, check_stages
from mnemo.models.heatmap import GaussianBlur
from mnemo.models.registry import register_model
from mnemo.models.structural import SSIMMap

SCORE_MAPS = ("segment", "ssim", "l2")


@dataclass(frozen=True)
class RestorationConfig(ModelConfig):
    """CPU-sized defaults: 128 px, widths 16..128; measured in benchmarks/results/real-defects.md."""

    paper_optim: ClassVar[dict[str, float]] = {"lr": 1e-3, "batch_size": 16}

    image_size: int = 128
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    heatmap_sigma: float = 2.0
    widths: tuple[int, ...] = (16, 32, 64, 128)  # memory UNet stages, one block-wise memory each
    division_rates: tuple[int, int, int] = (8, 8, 1)
    memory_size: int = 100
    head_widths: tuple[int, ...] = (16, 32, 64)  # the discriminative UNet's stages
    score_map: str = "segment"  # segment | ssim | l2
    synth_share: float = 0.5  # share of training images that get a synthetic anomaly
    ssim_weight: float = 1.0  # λ_ssim in L_rec
    focal_gamma: float = 2.0
    score_pool: int = 5  # side of the local mean whose maximum is the image score (odd, pixels)

    def __post_init__(self) -> None:
        if self.score_map not in SCORE_MAPS:
            raise ValueError(f"score_map must be one of {SCORE_MAPS}, got {self.score_map!r}")
        if self.score_pool < 1 or self.score_pool % 2 == 0:
            raise ValueError(f"score_pool must be a positive odd number of pixels, got {self.score_pool}")


class SegmentationUNet(nn.Module):
    """S: (x ⊕ x̂) [B, 2C, H, W] → anomaly logits [B, 1, H, W], a plain UNet (skips are not memories)."""

    def __init__(self, in_channels: int, image_size: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        check_stages(image_size, widths, "head_widths")
        self.down = nn.ModuleList(conv_block(a, b) for a, b in pairwise([in_channels, *widths]))
        self.up = nn.ModuleList()
        channels = widths[-1]
        for width in reversed(widths[:-1]):
            self.up.append(deconv_block(channels, width))
            channels = 2 * width
        self.out = nn.Sequential(deconv_block(channels, widths[0]), nn.Conv2d(widths[0], 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for stage in self.down:
            x = stage(x)
            skips.append(x)
        for up, skip in zip(self.up, reversed(skips[:-1])):
            x = torch.cat([up(x), skip], dim=1)
        return self.out(x)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017), mean over pixels: most pixels are easy negatives."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-bce)
    return ((1 - p_t) ** gamma * bce).mean()


class RestoringMemoryUNet(AnomalyModel):
    """The model of the module docstring; follows the scoring contract of ``models.base``."""

    def __init__(self, config: RestorationConfig) -> None:
        super().__init__(config)
        unet = DAADConfig(
            in_channels=config.in_channels,
            image_size=config.image_size,
            mean=config.mean,
            std=config.std,
            widths=config.widths,
            division_rates=config.division_rates,
            memory_size=config.memory_size,
            tanh_output=False,
        )
        self.generator = MemoryUNet(unet)
        self.head = (
            SegmentationUNet(2 * config.in_channels, config.image_size, config.head_widths)
            if config.score_map == "segment"
            else None
        )
        self.blur = GaussianBlur(config.heatmap_sigma)
        self.ssim = SSIMMap(config.in_channels)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, -1, 1, 1), persistent=False)
        self._synth_generator: torch.Generator | None = None

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model input → pixel values in [0, 1] (SSIM and the synthesis work on pixels)."""
        return x * self.std + self.mean

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.generator(x), {}

    def _synthesis_rng(self) -> torch.Generator:
        """Seeded from the global torch seed on first use, so ``--seed`` fixes the corruptions too."""
        if self._synth_generator is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            self._synth_generator = torch.Generator().manual_seed(seed)
        return self._synth_generator

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        clean = self.pixels(x)
        # Validation (eval mode) corrupts with a fixed seed, so epochs compare on the same anomalies and
        # early stopping weighs the head's segmentation as well as the restoration.
        rng = self._synthesis_rng() if self.training else torch.Generator().manual_seed(0)
        corrupted, mask = synthesize(clean.detach().cpu(), rng, share=cfg.synth_share)
        x_in = (corrupted.to(x.device) - self.mean) / self.std
        x_hat = self.generator(x_in)
        ssim = 1 - self.ssim(self.pixels(x_hat), clean).mean()
        losses = {"restoration": torch.mean((x_hat - x) ** 2) + cfg.ssim_weight * ssim, "ssim": ssim}
        if self.head is not None:
            logits = self.head(torch.cat([x_in, x_hat], dim=1))
            losses["segmentation"] = focal_loss(logits, mask.to(x.device), cfg.focal_gamma)
        losses["loss"] = losses["restoration"] + losses.get("segmentation", torch.zeros_like(ssim))
        return losses

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel anomaly [B, 1, H, W] before smoothing, as ``score_map`` says."""
        x_hat = self.generator(x)
        if self.head is not None:
            return torch.sigmoid(self.head(torch.cat([x, x_hat], dim=1)))
        if self.config.score_map == "ssim":
            return 1 - self.ssim(self.pixels(x_hat), self.pixels(x))
        return ((x - x_hat) ** 2).mean(dim=1, keepdim=True)

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heat = self.blur(self.anomaly_map(x))
        pool = self.config.score_pool
        local = F.avg_pool2d(heat, pool, stride=1, padding=pool // 2, count_include_pad=False)
        return local.amax(dim=(1, 2, 3)), heat


@register_model(
    "restore",
    RestorationConfig,
    "memory UNet trained to remove synthetic anomalies + a segmentation head (DRAEM-style; real defects)",
)
def restore(config: RestorationConfig) -> RestoringMemoryUNet:
    return RestoringMemoryUNet(config)
