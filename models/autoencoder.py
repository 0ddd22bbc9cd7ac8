"""AE, MemAE, Memorizer and RFTM: one autoencoder backbone with a swappable memory at the bottleneck.

All four share the backbone (the papers' "principle of absolute fair comparison"), so they differ only in
the memory between ``encode`` and ``decode`` and in MemAE's entropy term.

How the latent is addressed (``memory_granularity``):
* ``sample``: the flattened latent of each image is one query (papers 000/001: F = W·H·C);
* ``position``: every spatial position of a conv latent is one C-dim query (MemAE's form for images).
``auto`` picks ``sample`` for the FC backbone and ``position`` for the conv backbone. Flattening a 256×256
image's conv latent (512×16×16) per sample would make Memorizer's W_S 131072², hence the deviation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from mnemo.models.backbones import ConvAutoencoder, FCAutoencoder
from mnemo.models.base import ModelConfig, ReconstructionModel
from mnemo.models.memory import MemAEMemory, MultiRoundMemory, TwinMemory
from mnemo.models.memory.latent_bank import LatentBank
from mnemo.models.memory.memae import attention_entropy
from mnemo.models.registry import register_model


@dataclass(frozen=True)
class AutoencoderConfig(ModelConfig):
    backbone: str = "fc"  # "fc" (papers 000/001, MNIST-sized) or "conv" (paper 001 §4.2, RGB / larger)
    hidden_dims: tuple[int, ...] = (512, 256, 128)  # fc: FC1..FC3 widths, mirrored by the decoder
    conv_widths: tuple[int, ...] = (64, 128, 256, 512)  # conv: Conv1..Conv4 channels
    memory_granularity: str = "auto"  # "sample", "position" or "auto" (see module docstring)
    # Training latents kept to score by (models/memory/latent_bank.py; our extension, off = the papers'
    # reconstruction score): the error plus the distances to the nearest kept latent, standardised.
    latent_bank: int = 0


@dataclass(frozen=True)
class MemAEConfig(AutoencoderConfig):
    memory_size: int = 100  # N; Gong et al. use 100 on MNIST
    shrink_threshold: float | None = None  # λ; None = 1/N (paper: λ ∈ [1/N, 3/N]; authors' code: 0.0025)
    entropy_weight: float = 0.0002  # α of the entropy loss
    similarity: str = "cosine"  # "cosine" (paper) or "dot" (authors' code)


@dataclass(frozen=True)
class MemorizerConfig(AutoencoderConfig):
    memory_size: int = 10  # N (paper 000: 8 on MNIST, 10 on Fashion-MNIST and KMNIST)
    rounds: int = 8  # R


@dataclass(frozen=True)
class RFTMConfig(AutoencoderConfig):
    hippocampus: tuple[int, int, float] = (50, 15, 0.1)  # {N, k, ν}
    cortex: tuple[int, int, float] = (1000, 5, 0.5)  # {N, k, ν}


class MemoryAutoencoder(ReconstructionModel):
    """Backbone + optional memory on the latent; ``memory=None`` is the plain AE."""

    def __init__(self, config: AutoencoderConfig, memory_factory=None, entropy_weight: float = 0.0) -> None:
        super().__init__(config)
        if config.backbone == "fc":
            self.backbone = FCAutoencoder(config.in_channels, config.image_size, config.hidden_dims)
        elif config.backbone == "conv":
            self.backbone = ConvAutoencoder(config.in_channels, config.image_size, config.conv_widths)
        else:
            raise ValueError(f"backbone must be 'fc' or 'conv', got {config.backbone!r}")
        granularity = config.memory_granularity
        if granularity == "auto":
            granularity = "sample" if config.backbone == "fc" else "position"
        if granularity not in ("sample", "position"):
            raise ValueError(f"memory_granularity must be sample/position/auto, got {granularity!r}")
        self.granularity = granularity
        dim = self.backbone.latent_dim
        if granularity == "sample" and config.backbone == "conv":
            dim *= self.backbone.latent_side**2
        self.memory: nn.Module | None = memory_factory(dim) if memory_factory else None
        self.entropy_weight = entropy_weight
        latent_values = self.backbone.latent_dim * (
            self.backbone.latent_side**2 if config.backbone == "conv" else 1
        )  # per image, flattened: the bank keeps whole latents whatever the memory's granularity
        self.bank = LatentBank(config.latent_bank, latent_values) if config.latent_bank else None

    def to_queries(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 2:
            return z
        if self.granularity == "sample":
            return z.flatten(1)
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])

    def from_queries(self, q: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.dim() == 2 or self.granularity == "sample":
            return q.reshape(like.shape)
        b, c, h, w = like.shape
        return q.reshape(b, h, w, c).permute(0, 3, 1, 2)

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.decode(self.backbone.encode(x))

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The latent through the memory (when there is one) and the decoder."""
        aux: dict[str, torch.Tensor] = {}
        if self.memory is not None:
            read, weights = self.memory(self.to_queries(z))
            z = self.from_queries(read, z)
            if self.entropy_weight > 0 and self.training:
                aux["entropy"] = self.entropy_weight * attention_entropy(weights)
        return self.backbone.decode(z), aux

    def latent_and_error_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the flattened latent [B, F], ``error_map(x)``) from one encoder pass: what the bank reads."""
        z = self.backbone.encode(x)
        return z.flatten(1), ((x - self.decode(z)[0]) ** 2).mean(dim=1, keepdim=True)

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The papers' reconstruction score, or with a latent bank its three standardised cues; the
        heatmap is the reconstruction error's either way."""
        if self.bank is None:
            return super().score(x)
        z, err = self.latent_and_error_map(x)
        return self.bank.score(z, err.mean(dim=(1, 2, 3))), self.blur(err)

    def after_fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Fill the latent bank (when configured) from the training images, as the trained model sees them."""
        if self.bank is None:
            return
        was_training = self.training
        self.eval()
        latents, errors = self._sample_latents(batches)
        self.train(was_training)
        device = next(self.parameters()).device
        self.bank.fit(latents.to(device), errors.to(device))

    def _sample_latents(self, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A uniform sample of ``latent_bank`` training latents and their errors, in random order, kept in
        one pass: each image draws a random key and the smallest keys stay (a fixed generator, so a run
        keeps the same sample however its images are batched)."""
        device, generator = next(self.parameters()).device, torch.Generator().manual_seed(0)
        keys, latents, errors = torch.empty(0), torch.empty(0, self.bank.dim), torch.empty(0)
        with torch.inference_mode():
            for batch in batches:
                z, err = self.latent_and_error_map(batch.to(device))
                keys = torch.cat([keys, torch.rand(len(z), generator=generator)])
                latents = torch.cat([latents, z.cpu()])
                errors = torch.cat([errors, err.mean(dim=(1, 2, 3)).cpu()])
                kept = keys.argsort(stable=True)[: self.bank.size]
                keys, latents, errors = keys[kept], latents[kept], errors[kept]
        return latents, errors

    def export_facts(self) -> dict[str, float] | None:
        """How many latents the bank kept; an unfilled bank cannot score, so it refuses to export."""
        if self.bank is None:
            return None
        if not self.bank.fitted:
            raise ValueError(f"{self.model_name}: the latent bank is not filled; refusing to export")
        return {"latent_bank_items": float(len(self.bank.norms))}


@register_model("ae", AutoencoderConfig, "Plain autoencoder: the baselines' backbone (papers 000/001 §4)")
def ae(config: AutoencoderConfig) -> MemoryAutoencoder:
    return MemoryAutoencoder(config)


@register_model("memae", MemAEConfig, "MemAE (Gong et al. 2019): sparse memory addressing + entropy loss")
def memae(config: MemAEConfig) -> MemoryAutoencoder:
    def memory(dim: int) -> MemAEMemory:
        return MemAEMemory(config.memory_size, dim, config.shrink_threshold, config.similarity)

    return MemoryAutoencoder(config, memory, config.entropy_weight)


@register_model("memorizer", MemorizerConfig, "Memorizer (paper 000): multi-round memory, shared mapping W_S")
def memorizer(config: MemorizerConfig) -> MemoryAutoencoder:
    return MemoryAutoencoder(config, lambda dim: MultiRoundMemory(config.memory_size, dim, config.rounds))


@register_model("rftm", RFTMConfig, "RFTM (paper 001): random-forgetting twin memory with top-k sparsity")
def rftm(config: RFTMConfig) -> MemoryAutoencoder:
    return MemoryAutoencoder(config, lambda dim: TwinMemory(dim, config.hippocampus, config.cortex))
