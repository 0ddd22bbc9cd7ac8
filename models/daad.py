"""DAAD and DAAD+ (paper 003 §3): a UNet whose every encoder-decoder connection is a block-wise memory.

DAAD (§3.1): the encoder G_E emits f_1..f_L (one per stride-2 stage); each goes through its own
``BlockwiseMemory`` (eqs. 1-2), and the decoder G_D rebuilds x̂ from f̂_L, concatenating f̂_l at every
scale (UNet skips). No path from encoder to decoder bypasses a memory, which is what stops the skips
from learning the identity. Scored like every reconstruction model (mean squared error, blurred map).

DAAD+ (§3.1.3-3.3): DAAD is the generator G; a DCGAN discriminator D judges x against x̂ and provides the
features f_D for alignment:

    L = λ_rec L_rec + λ_adv L_adv + λ_ali L_ali                          (eq. 3), λ = 50, 0.5, 0.5
    L_rec = E‖x − x̂‖₂                                                    (eq. 4)
    L_adv = E[log D(x)] + E[log(1 − D(G(x)))]                              (eq. 5)
    L_ali = E‖f_D(x) − f_D(x̂)‖₂                                          (eq. 6)
    A(x) = γ R̃(x) + (1 − γ) L̃(x),  γ = 0.9                               (eq. 7)

Interpretations and deviations (reasons in parentheses):
* Architecture (the paper gives no layer list): encoder = the repo's Conv(3, stride 2)-BN-LeakyReLU
  blocks, decoder = DeConv blocks with the memory-read skips concatenated (pix2pix / Skip-GANomaly
  style), last layer a bare DeConv + tanh (pixels are in [-1, 1]). Widths 32..256 rather than DCGAN's
  64..512, so a 256×256 forward stays CPU-feasible (per image ~1.8 GMAC for G, ~0.5 for D).
* Eqs. 4 and 6 are taken as mean squared errors (per pixel / per feature), the usual implementation of
  an "L2" loss (λ_rec = 50 only makes sense for a per-pixel mean); R(x) and L(x) are the same quantities
  per image.
* Eq. 5: D minimises BCE(D(x), 1) + BCE(D(x̂), 0), i.e. maximises eq. 5; G minimises the
  non-saturating −log D(G(x)) that the cited GAN paper [15] recommends in place of log(1 − D(G(x))).
* f_D = the output of D's last feature conv block, before the 1-logit classifier conv (the classifier's
  own output is the real/fake logit, not a representation), as in GANomaly/Skip-GANomaly.
* D is DCGAN's: Conv(4, stride 2), BN except on the first layer, LeakyReLU(0.2); the classifier conv's
  kernel is the remaining side (DCGAN's 4×4 "valid" conv when that side is 4).
* R̃, L̃: min-max scaled with constants measured on *training* data (``fit_score_scaling``) and stored
  as buffers, not over the evaluated set, so a score never depends on the other test images. Values
  are not clipped: an image worse than anything in training keeps scoring higher.
* Optimisers: the paper trains DAAD with Adam lr 1e-4 and DAAD+ with lr "increased to 2e-4"; read as
  2e-4 for both G and D (``lr_generator``, ``lr_discriminator``). DAAD+ brings its own
  ``configure_optimizers`` (G's Adam, D's Adam) and ``training_step`` (a D step, then a G step, §3.2).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from mnemo.models.backbones import conv_block, deconv_block
from mnemo.models.base import ModelConfig, OptimSettings, ReconstructionModel, adam
from mnemo.models.memory import BlockwiseMemory
from mnemo.models.registry import register_model

SCALING_BUFFERS = ("rec_min", "rec_max", "ali_min", "ali_max")  # min-max constants of R and L


@dataclass(frozen=True)
class DAADConfig(ModelConfig):
    """Paper defaults: 256×256 RGB scaled to [-1, 1], (r_h, r_w, r_c) = (8, 8, 1), N = 500 per scale.

    The paper trains DAAD with Adam, lr 1e-4, betas (0.9, 0.999), batch 8: ``paper_optim`` hands these to
    the trainer as defaults, and a run's optim config overrides them.
    """

    paper_optim: ClassVar[dict[str, float]] = {"lr": 1e-4, "batch_size": 8}

    in_channels: int = 3
    image_size: int = 256
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # (pixel − 0.5) / 0.5 ∈ [-1, 1]
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    widths: tuple[int, ...] = (32, 64, 128, 256, 256)  # encoder stage channels; one memory per stage
    division_rates: tuple[int, int, int] = (8, 8, 1)  # (r_h, r_w, r_c), the same at every scale
    memory_size: int = 500  # N items in each scale's own bank
    similarity: str = "cosine"  # eq. 1's cosine; "dot": the MemAE authors' code (see BlockwiseMemory)
    tanh_output: bool = True  # for inputs in [-1, 1]; turn off for another normalisation


@dataclass(frozen=True)
class DAADPlusConfig(DAADConfig):
    disc_widths: tuple[int, ...] = (32, 64, 128, 256, 256, 256)  # D's stride-2 stages (256 px → 4×4)
    lambda_rec: float = 50.0
    lambda_adv: float = 0.5
    lambda_ali: float = 0.5
    gamma: float = 0.9  # weight of R̃ in eq. 7
    lr_generator: float = 2e-4  # Adam; the trainer alternates a D step and a G step
    lr_discriminator: float = 2e-4


def check_stages(image_size: int, widths: tuple[int, ...], field: str) -> None:
    """Each width is one stride-2 stage, so the side must halve evenly that many times."""
    if not widths or image_size % 2 ** len(widths):
        raise ValueError(f"image_size {image_size} must divide by 2**len({field}) = {2 ** len(widths)}")


class MemoryUNet(nn.Module):
    """G = G_D ∘ memories ∘ G_E: ``x -> x̂``."""

    def __init__(self, config: DAADConfig) -> None:
        super().__init__()
        widths = config.widths
        check_stages(config.image_size, widths, "widths")
        self.encoder = nn.ModuleList(conv_block(a, b) for a, b in pairwise([config.in_channels, *widths]))
        sides = [config.image_size // 2**level for level in range(1, len(widths) + 1)]
        self.memories = nn.ModuleList(
            BlockwiseMemory(config.memory_size, c, s, s, config.division_rates, config.similarity)
            for c, s in zip(widths, sides)
        )
        self.ups = nn.ModuleList()
        channels = widths[-1]
        for width in reversed(widths[:-1]):
            self.ups.append(deconv_block(channels, width))
            channels = 2 * width  # upsampled map + the memory-read skip
        self.head = nn.ConvTranspose2d(channels, config.in_channels, 3, stride=2, padding=1, output_padding=1)
        self.tanh_output = config.tanh_output

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """f_1..f_L, one per stride-2 stage."""
        feats = []
        for stage in self.encoder:
            x = stage(x)
            feats.append(x)
        return feats

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """x̂ from f̂_L, with f̂_l concatenated after each upsampling (UNet skips)."""
        y = feats[-1]
        for up, skip in zip(self.ups, reversed(feats[:-1])):
            y = torch.cat([up(y), skip], dim=1)
        y = self.head(y)
        return torch.tanh(y) if self.tanh_output else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        read = [memory(f)[0] for memory, f in zip(self.memories, self.encode(x))]
        return self.decode(read)


class DCGANDiscriminator(nn.Module):
    """``x -> (real/fake logit [B], f_D(x))``; f_D is the last feature block's output."""

    def __init__(self, in_channels: int, image_size: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        check_stages(image_size, widths, "disc_widths")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(pairwise([in_channels, *widths])):
            layers.append(nn.Conv2d(a, b, 4, stride=2, padding=1, bias=False))
            if i:  # DCGAN: no BN on the input layer
                layers.append(nn.BatchNorm2d(b))
            layers.append(nn.LeakyReLU(0.2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(widths[-1], 1, image_size // 2 ** len(widths))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.classifier(f).reshape(-1), f


class DAAD(ReconstructionModel):
    """Reconstruction-only DAAD: loss and score are the mean squared error of ``MemoryUNet``."""

    def __init__(self, config: DAADConfig) -> None:
        super().__init__(config)
        self.generator = MemoryUNet(config)

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.generator(x), {}


class DAADPlus(DAAD):
    """DAAD + adversarially learned representation; scores with eq. 7 on training-fitted min-max scales."""

    def __init__(self, config: DAADPlusConfig) -> None:
        super().__init__(config)
        self.discriminator = DCGANDiscriminator(config.in_channels, config.image_size, config.disc_widths)
        for name, value in zip(SCALING_BUFFERS, (0.0, 1.0, 0.0, 1.0)):
            self.register_buffer(name, torch.tensor(value))  # identity scaling until fitted
        self.register_buffer("score_scaling_fitted", torch.tensor(False))

    def generator_parameters(self) -> Iterator[nn.Parameter]:
        return self.generator.parameters()

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        return self.discriminator.parameters()

    def configure_optimizers(self, optim: OptimSettings) -> list[torch.optim.Optimizer]:
        """[G's Adam, D's Adam] at the model's own rates, with Adam's default betas (paper 003: 2e-4 once
        the adversarial losses are on); the run's ``optim`` settings do not apply."""
        return [
            adam(self.generator_parameters(), lr=self.config.lr_generator),
            adam(self.discriminator_parameters(), lr=self.config.lr_discriminator),
        ]

    def training_step(self, x: torch.Tensor, optimizers: list[torch.optim.Optimizer]) -> dict[str, float]:
        """A D step on the current generator's reconstructions, then a G step on eq. 3 (§3.2)."""
        generator_optimizer, discriminator_optimizer = optimizers
        d_loss = self.discriminator_loss(x)
        discriminator_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        discriminator_optimizer.step()
        return {**super().training_step(x, [generator_optimizer]), "d_loss": d_loss.item()}

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The generator step, eq. 3."""
        cfg = self.config
        x_hat = self.generator(x)
        logit_fake, feat_fake = self.discriminator(x_hat)
        _, feat_real = self.discriminator(x)
        rec = torch.mean((x - x_hat) ** 2)  # eq. 4
        adv = F.binary_cross_entropy_with_logits(logit_fake, torch.ones_like(logit_fake))  # eq. 5, G side
        ali = torch.mean((feat_real - feat_fake) ** 2)  # eq. 6
        total = cfg.lambda_rec * rec + cfg.lambda_adv * adv + cfg.lambda_ali * ali
        return {"loss": total, "reconstruction": rec, "adversarial": adv, "alignment": ali}

    def discriminator_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The D step: −(eq. 5) as binary cross-entropy; G gets no gradient."""
        with torch.no_grad():
            x_hat = self.generator(x)
        logit_real, _ = self.discriminator(x)
        logit_fake, _ = self.discriminator(x_hat)
        real = F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
        fake = F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))
        return real + fake

    def score_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unscaled R(x) [B], L(x) [B] and the per-pixel error map [B, 1, H, W]."""
        x_hat = self.generator(x)
        err = ((x - x_hat) ** 2).mean(dim=1, keepdim=True)
        feat_diff = self.discriminator(x)[1] - self.discriminator(x_hat)[1]
        return err.mean(dim=(1, 2, 3)), (feat_diff**2).flatten(1).mean(dim=1), err

    def scaled(self, rec: torch.Tensor, ali: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """R̃ and L̃: min-max scaling with the stored training constants."""
        rec_t = (rec - self.rec_min) / (self.rec_max - self.rec_min).clamp_min(1e-12)
        ali_t = (ali - self.ali_min) / (self.ali_max - self.ali_min).clamp_min(1e-12)
        return rec_t, ali_t

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 7; the heatmap is the reconstruction error (L(x) is image-level)."""
        rec, ali, err = self.score_parts(x)
        rec_t, ali_t = self.scaled(rec, ali)
        gamma = self.config.gamma
        return gamma * rec_t + (1 - gamma) * ali_t, self.blur(err)

    @torch.no_grad()
    def fit_score_scaling(self, batches: Iterable | torch.Tensor) -> dict[str, float]:
        """Set the min-max constants from normal training images; returns them.

        ``batches``: one image tensor [B, C, H, W], or an iterable of them.
        Runs in eval mode (the scoring forward) and restores the previous mode.
        """
        was_training = self.training
        self.eval()
        device = self.rec_min.device
        recs, alis = [], []
        for batch in [batches] if isinstance(batches, torch.Tensor) else batches:
            rec, ali, _ = self.score_parts(batch.to(device))
            recs.append(rec)
            alis.append(ali)
        self.train(was_training)
        if not recs:
            raise ValueError("fit_score_scaling needs at least one batch of training images")
        rec, ali = torch.cat(recs), torch.cat(alis)
        for name, value in zip(SCALING_BUFFERS, (rec.min(), rec.max(), ali.min(), ali.max())):
            getattr(self, name).copy_(value)
        self.score_scaling_fitted.fill_(True)
        return self.score_scaling_constants()

    def score_scaling_constants(self) -> dict[str, float]:
        """The constants baked into the scoring graph (recorded in bundle manifests)."""
        constants = {name: float(getattr(self, name)) for name in SCALING_BUFFERS}
        return {**constants, "gamma": float(self.config.gamma)}

    def after_fit(self, batches: Iterable[torch.Tensor]) -> None:
        """R̃ and L̃ need the min-max constants of the trained model on its training images."""
        self.fit_score_scaling(batches)

    def export_facts(self) -> dict[str, float]:
        """The score-scaling constants; an unfitted model would ship an identity scaling, so it refuses."""
        if not bool(self.score_scaling_fitted):
            raise ValueError(
                f"{self.model_name}: score scaling is not fitted on training data; refusing to export"
            )
        return self.score_scaling_constants()


@register_model("daad", DAADConfig, "DAAD (paper 003 §3.1): UNet with a block-wise memory on every skip")
def daad(config: DAADConfig) -> DAAD:
    return DAAD(config)


@register_model("daad_plus", DAADPlusConfig, "DAAD+ (paper 003 §3.2-3.3): DAAD + adversarial alignment score")
def daad_plus(config: DAADPlusConfig) -> DAADPlus:
    return DAADPlus(config)
