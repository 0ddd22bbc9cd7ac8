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
    a_k = blur(cue_k(x))                              for each cue k of ``score_maps``
    z_k = (a_k − μ_k) / (σ_k + ε);  z_k ← (|z_k| − √(2/π)) / √(1 − 2/π)  for a two-sided cue
    heatmap = Σ_k z_k;  score = max of its ``score_pool``-wide local mean (DRAEM §3.4)

The cues (``score_maps``) are ``segment`` (σ(S(x ⊕ G(x))), the discriminative head), ``ssim``
(1 − SSIM(x, x̂), Bergmann et al. 2019), ``l2`` (squared error, as the papers' models) and ``intensity``
(the image's local brightness, G_s ∗ (x − mean x), two-sided); the default uses all but ``l2``.
``intensity`` looks at the input alone: a restorer copies a soft stain or a discoloured area through its
skips, so its errors miss them, while the local brightness at that place stands out from the good images'
(textures, pixel AUROC of stains 86-91 → 94-95; benchmarks/results/real-defects-study.md, sixth round).
It is folded (|z|, rescaled to the half-normal's mean and spread) so a darker and a brighter area both
count. μ_k and σ_k are each cue's mean and standard deviation *at every pixel position*,
measured on the training images once training is done (``after_fit``; ``standardize``), so a map counts
how unusual a pixel's error is *at that place*. Why: a restoration is never perfect, and where it is
worst on good parts (a fixture's edges, a solar cell's busbars and corners, the image border) is the same
on every part; raw, those places outshine a real crack, standardised they are quiet (elpv-mono, one
trained model: 1 − SSIM 75.2 raw → 90.5 standardised image AUROC, head 88.1 → 88.7; textures: the same
on every texture, benchmarks/results/real-defects-study.md). Summing z-scores weighs the cues equally
without a learned weight (nothing labels real defects to learn one from). PaDiM (Defard et al. 2021)
keeps per-position statistics the same way, of features rather than of restoration errors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from mnemo.models.anomaly_synthesis import MATERIALS, check_materials, synthesize
from mnemo.models.backbones import conv_block, deconv_block
from mnemo.models.base import AnomalyModel, ModelConfig
from mnemo.models.daad import DAADConfig, MemoryUNet, check_stages
from mnemo.models.heatmap import GaussianBlur
from mnemo.models.registry import register_model
from mnemo.models.structural import SSIMMap

SCORE_MAPS = ("segment", "ssim", "l2", "intensity")
TWO_SIDED = ("intensity",)  # cues whose deviation counts both ways (folded z)
HALF_NORMAL_MEAN, HALF_NORMAL_STD = math.sqrt(2 / math.pi), math.sqrt(1 - 2 / math.pi)  # of |z|, z ~ N(0, 1)
STD_FLOOR = 1e-3  # ε: keeps a position whose cue never varied on good images (a constant border) finite
# Per-position variances are shrunk toward the cue's average variance as if that average had been seen on
# this many extra images (a moderated variance, Smyth 2004): it steadies σ on small training sets (20 images:
# about 45 % prior) and is negligible on large ones (423 elpv-mono cells: 4 %).
PRIOR_IMAGES = 16


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
    score_maps: tuple[str, ...] = ("segment", "ssim", "intensity")  # cues summed into the heatmap
    standardize: bool = True  # z-score every cue per pixel position with training-image statistics
    intensity_sigma: float = 6.0  # pixels: the neighbourhood whose brightness the ``intensity`` cue reads
    synth_share: float = 0.5  # share of training images that get a synthetic anomaly
    synth_materials: tuple[str, ...] = MATERIALS  # what synthetic blotches are made of (anomaly_synthesis)
    ssim_weight: float = 1.0  # λ_ssim in L_rec
    focal_gamma: float = 2.0
    score_pool: int = 5  # side of the local mean whose maximum is the image score (odd, pixels)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.score_maps) - set(SCORE_MAPS))
        if not self.score_maps or unknown or len(set(self.score_maps)) < len(self.score_maps):
            raise ValueError(
                f"score_maps must be distinct names from {SCORE_MAPS}, got {list(self.score_maps)}"
            )
        if set(TWO_SIDED) & set(self.score_maps) and not self.standardize:
            raise ValueError(
                f"score_maps {list(TWO_SIDED)} need standardize: true (a raw brightness is no score); "
                "with standardize: false set score_maps to the others, e.g. [segment, ssim]"
            )
        check_materials(self.synth_materials, "synth_materials")
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


def folded(z: torch.Tensor) -> torch.Tensor:
    """|z| rescaled to zero mean and unit spread when z ~ N(0, 1): a two-sided cue on the others' scale."""
    return (z.abs() - HALF_NORMAL_MEAN) / HALF_NORMAL_STD


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
            if "segment" in config.score_maps
            else None
        )
        self.blur = GaussianBlur(config.heatmap_sigma)
        self.intensity_blur = GaussianBlur(config.intensity_sigma)
        self.ssim = SSIMMap(config.in_channels)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, -1, 1, 1), persistent=False)
        shape = (1, len(config.score_maps), config.image_size, config.image_size)
        self.register_buffer("map_mean", torch.zeros(shape))  # μ_k per position (identity until fitted)
        self.register_buffer("map_std", torch.ones(shape) - STD_FLOOR)  # σ_k per position
        self.register_buffer("map_stats_images", torch.tensor(0))  # how many images μ, σ came from
        self._synth_generator: torch.Generator | None = None

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model input → pixel values in [0, 1] (SSIM and the synthesis work on pixels)."""
        return x * self.std + self.mean

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
        corrupted, mask = synthesize(
            clean.detach().cpu(), rng, share=cfg.synth_share, materials=cfg.synth_materials
        )
        x_in = (corrupted.to(x.device) - self.mean) / self.std
        x_hat = self.generator(x_in)
        ssim = 1 - self.ssim(self.pixels(x_hat), clean).mean()
        losses = {"restoration": torch.mean((x_hat - x) ** 2) + cfg.ssim_weight * ssim, "ssim": ssim}
        if self.head is not None:
            logits = self.head(torch.cat([x_in, x_hat], dim=1))
            losses["segmentation"] = focal_loss(logits, mask.to(x.device), cfg.focal_gamma)
        losses["loss"] = losses["restoration"] + losses.get("segmentation", torch.zeros_like(ssim))
        return losses

    def cue(self, name: str, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """One cue's per-pixel map [B, 1, H, W], before smoothing."""
        if name == "segment":
            return torch.sigmoid(self.head(torch.cat([x, x_hat], dim=1)))
        if name == "ssim":
            return 1 - self.ssim(self.pixels(x_hat), self.pixels(x))
        if name == "intensity":  # centred, so a lamp a little brighter today is no defect
            brightness = self.pixels(x).mean(dim=1, keepdim=True)
            return self.intensity_blur(brightness - brightness.mean(dim=(2, 3), keepdim=True))
        return ((x - x_hat) ** 2).mean(dim=1, keepdim=True)

    def cue_maps(self, x: torch.Tensor) -> torch.Tensor:
        """a_k of the module docstring: every cue of ``score_maps``, blurred, [B, K, H, W]."""
        x_hat = self.generator(x)
        return torch.cat([self.blur(self.cue(name, x, x_hat)) for name in self.config.score_maps], dim=1)

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.cue_maps(x)
        if self.config.standardize:
            maps = (maps - self.map_mean) / (self.map_std + STD_FLOOR)
        cues = [
            folded(z) if name in TWO_SIDED else z
            for z, name in zip(maps.split(1, dim=1), self.config.score_maps)
        ]
        heat = torch.cat(cues, dim=1).sum(dim=1, keepdim=True)
        pool = self.config.score_pool
        local = F.avg_pool2d(heat, pool, stride=1, padding=pool // 2, count_include_pad=False)
        return local.amax(dim=(1, 2, 3)), heat

    @torch.no_grad()
    def fit_map_statistics(self, batches: Iterable[torch.Tensor]) -> int:
        """μ_k, σ_k per position from good images (as the data has them: no flips); returns their count.

        σ_k² is moderated toward the cue's mean variance over positions (``PRIOR_IMAGES``). Sums run in
        float64, so the variance of thousands of images does not cancel away. Runs in eval mode (the
        scoring forward) and restores the previous mode.
        """
        was_training = self.training
        self.eval()
        device = self.map_mean.device
        total = torch.zeros(self.map_mean.shape, dtype=torch.float64, device=device)
        squares, count = torch.zeros_like(total), 0
        for batch in batches:
            maps = self.cue_maps(batch.to(device)).double()
            total += maps.sum(dim=0, keepdim=True)
            squares += (maps**2).sum(dim=0, keepdim=True)
            count += len(maps)
        self.train(was_training)
        if count < 2:
            raise ValueError(f"{self.model_name}: map statistics need at least 2 good images, got {count}")
        mean = total / count
        var = ((squares - count * mean**2) / (count - 1)).clamp_min(0)
        pooled = var.mean(dim=(2, 3), keepdim=True)
        var = ((count - 1) * var + PRIOR_IMAGES * pooled) / (count - 1 + PRIOR_IMAGES)
        self.map_mean.copy_(mean.float())
        self.map_std.copy_(var.sqrt().float())
        self.map_stats_images.fill_(count)
        return count

    def after_fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Standardised maps need the trained model's per-position statistics on its training images."""
        if self.config.standardize:
            self.fit_map_statistics(batches)

    def export_facts(self) -> dict[str, float] | None:
        """How many images the baked-in map statistics came from; refuses an unfitted standardised model
        (its heatmap would silently sum unstandardised cues)."""
        if not self.config.standardize:
            return None
        if int(self.map_stats_images) == 0:
            raise ValueError(
                f"{self.model_name}: map statistics are not fitted on training data; refusing to export"
            )
        return {"map_stats_images": float(self.map_stats_images)}

    def example_reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        """The restoration x̂ = G(x): the memory's idea of this part without its defects."""
        return self.generator(x)


@register_model(
    "restore",
    RestorationConfig,
    "memory UNet trained to remove synthetic anomalies + a segmentation head (DRAEM-style; real defects)",
)
def restore(config: RestorationConfig) -> RestoringMemoryUNet:
    return RestoringMemoryUNet(config)
