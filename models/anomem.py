"""AnoMem (paper 002 §3): multi-scale normal prototypes in Hopfield memories, learned contrastively.

Stage 1 (``loss``) trains the encoder f = f^(S)∘…∘f^(1) and one Hopfield memory HF^(s) per memory scale:

    Mem(z, y) = y·HF(z) + (1 − y)·z                                                        (eq. 1)
    L_COM(z, z', y) = 1/2B Σ_k ℓ_NTX(Mem(z_k, y_k), z'_k) + ℓ_NTX(z'_k, Mem(z_k, y_k))      (eq. 2)
    L_V(z, y) = −1/Σ_k y_k Σ_k y_k √Var[Mem(z_k, y_k)]                                      (eq. 3)
    L_COM-MS = 1/Σ_s|Ω^(s)| Σ_s Σ_{(i,j)∈Ω^(s)} λ^(s) [L_COM(z_ij, z'_ij, y) + λ_V L_V(z_ij, y)]   (eq. 4)

Scoring uses the deviation from the memory, applied at every position, Δ^(s) = z^(s) − HF^(s)(z^(s)) (eq. 5):
one-class s^(s) = ‖Δ^(s)‖₂ (eq. 6), or with a few labelled anomalies s^(s) = g^(s)∘φ(Δ^(s)) (eq. 7),
trained with the double hinge (eq. 8); scales are merged as Σ_s λ^(s) s^(s) / Σ_s λ^(s) (eq. 9).
The heatmap is the per-position ‖Δ^(s)_ij‖₂, upsampled and merged with the same λ^(s).

Interpretations and deviations (reasons in parentheses):
* Backbone: a BasicBlock ResNet (``models/backbones.py``; ResNet-18 sized by default, the paper's is
  ResNet-50) with a 3×3 stem and no max-pool. 64 px inputs with a stride-2 stem give the paper's CIFAR
  feature geometry (8×8 after stage 3, 4×4 after stage 4) at about CIFAR cost on CPU, with twice the
  pixels for the heatmap. Stages after the last memory stage are not built (nothing reads them). No
  projection head (the paper contrasts encoder features directly).
* Hopfield layer: one update, plain dot product (see ``models/memory/hopfield.py``). With
  ``hopfield_normalize`` the deviation is taken on the unit sphere, Δ = z/‖z‖ − HF(z).
* Eq. 4 literally: at each sampled position (i, j), NT-Xent contrasts the B images' vectors at (i, j),
  so negatives are the other images at the same position. Ω^(s) is one draw per step shared by the batch
  and both views; ⌊H W r⌋ is at least 1.
* Eq. 3's Var is read as VICReg's: per-dimension variance over the batch's normal retrieved vectors
  (at one position), √(Var + 1e-4) averaged over dimensions (the variance of one vector's own components
  would not stop all prototypes collapsing to one point, which is what the loss is for).
* Views: SimCLR-like tensor augmentations (appendix B), see ``models/contrastive.py`` for the differences.
  In eval mode ``loss`` uses no augmentation and every position, so validation loss is deterministic.
* Labels in this API are 0 normal / 1 anomalous (the paper's y is 1 for normal), converted on entry.
  ``loss(x)`` is stage 1 on normal images; ``contrastive_memory_loss(x, labels)`` is eq. 1 for mixed batches.
* Eq. 6 is the L2 norm of the whole map (so it grows with √(H W)), merged by eq. 9 as written.
* OE head: φ = average pooling to ``oe_pool``², MLP Linear–ReLU–Linear with ``oe_hidden`` units, raw
  scalar output (the paper gives no sizes or output constraint). Stage 2 trains only the heads: Δ comes
  from the frozen stage-1 encoder and memories (no gradient, BatchNorm statistics untouched).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mnemo.models.backbones import ResNetEncoder
from mnemo.models.base import AnomalyModel, ModelConfig
from mnemo.models.contrastive import ContrastiveViews, nt_xent
from mnemo.models.heatmap import GaussianBlur, to_input_size
from mnemo.models.memory import HopfieldMemory
from mnemo.models.registry import register_model

SCORING_MODES = ("one_class", "outlier_exposure")


@dataclass(frozen=True)
class AnoMemConfig(ModelConfig):
    # 64 px: the paper's CIFAR feature geometry behind a stride-2 stem, affordable on CPU (module docstring).
    in_channels: int = 3
    image_size: int = 64
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # ImageNet statistics: only centre the input,
    std: tuple[float, ...] = (0.229, 0.224, 0.225)  # the encoder is trained from scratch
    stage_widths: tuple[int, ...] = (64, 128, 256, 512)  # ResNet-18 widths
    stage_depths: tuple[int, ...] = (2, 2, 2, 2)  # BasicBlocks per stage (ResNet-18)
    stem_stride: int = 2
    memory_stages: tuple[int, ...] = (3, 4)  # 1-based stages followed by a memory (paper: third and last)
    memory_sizes: tuple[int, ...] = (512, 256)  # N_Mem per memory scale
    beta: float = 2.0  # Hopfield inverse temperature
    hopfield_steps: int = 1  # fixed number of Hopfield updates
    hopfield_normalize: bool = False  # L2-normalise queries and patterns (the paper does not)
    temperature: float = 0.1  # τ of NT-Xent
    variance_weight: float = 0.05  # λ_V
    sampling_ratios: tuple[float, ...] = (0.3, 1.0)  # r^(s): fraction of positions in the loss per scale
    scale_weights: tuple[float, ...] = ()  # λ^(s); () means the paper's 2^(s−1)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # area range of the random resized crop
    jitter: float = 0.4  # brightness / contrast / saturation strength
    blur_sigma: float = 1.0  # Gaussian blur of the views, in pixels, applied with probability 1/2
    noise_std: float = 0.02  # additive Gaussian noise on [0, 1] pixels
    oe_pool: int = 2  # φ pools Δ^(s) to oe_pool × oe_pool
    oe_hidden: int = 128  # hidden width of g^(s)
    margin: float = 2.0  # M of the double hinge
    scoring: str = "one_class"  # "one_class" (eq. 6) or "outlier_exposure" (eq. 7)


# --- losses ------------------------------------------------------------------------------------------


def variance_loss(recalled: torch.Tensor, normal: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Eq. 3 per position: −√Var over the normal samples, averaged over dimensions.

    ``recalled``: ``[P, B, D]``; ``normal``: ``[B]`` (1 for normal). Returns ``[P]`` (zeros when fewer
    than two normal samples make the variance undefined).
    """
    kept = recalled[:, normal > 0.5]
    if kept.shape[1] < 2:
        return recalled.new_zeros(recalled.shape[0])
    return -torch.sqrt(kept.var(dim=1) + eps).mean(dim=-1)


def double_hinge(d: torch.Tensor, normal: torch.Tensor, margin: float) -> torch.Tensor:
    """ℓ_dist (§3.2): normal distances below 1/M, anomalous ones above M; ``normal`` is 1 for normal."""
    return normal * F.relu(d - 1 / margin) + (1 - normal) * F.relu(margin - d)


def sample_positions(count: int, ratio: float, device: torch.device) -> torch.Tensor:
    """Ω^(s): ⌊count · r⌋ (at least 1) positions without replacement; every position in order when r ≥ 1."""
    k = max(1, math.floor(count * ratio))
    if k >= count:
        return torch.arange(count, device=device)
    return torch.randperm(count, device=device)[:k]


# --- the model ---------------------------------------------------------------------------------------


def outlier_head(channels: int, pool: int, hidden: int) -> nn.Sequential:
    """g^(s)∘φ (eq. 7): average pooling, then a two-layer MLP with one scalar output."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(pool),
        nn.Flatten(),
        nn.Linear(channels * pool * pool, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 1),
    )


def channels_last(z: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, H, W, C]: every position becomes one query (eq. 5's (HF(z))_ij = HF(z_ij))."""
    return z.permute(0, 2, 3, 1)


class AnoMem(AnomalyModel):
    def __init__(self, config: AnoMemConfig) -> None:
        super().__init__(config)
        check_config(config)
        last = max(config.memory_stages)
        widths, depths = config.stage_widths[:last], config.stage_depths[:last]
        self.encoder = ResNetEncoder(config.in_channels, widths, depths, config.stem_stride)
        self.taps = tuple(s - 1 for s in config.memory_stages)
        channels = [widths[t] for t in self.taps]
        self.memories = nn.ModuleList(
            HopfieldMemory(n, c, config.beta, config.hopfield_steps, config.hopfield_normalize)
            for n, c in zip(config.memory_sizes, channels)
        )
        sides = [self.encoder.sides(config.image_size)[t] for t in self.taps]
        self.oe_heads = nn.ModuleList(
            outlier_head(c, pool_side(side, config.oe_pool), config.oe_hidden)
            for c, side in zip(channels, sides)
        )
        self.lambdas = config.scale_weights or tuple(2.0**s for s in range(len(self.taps)))  # λ^(s) = 2^(s−1)
        merge = torch.tensor(self.lambdas) / sum(self.lambdas)  # eq. 9's λ^(s) / Σ λ^(s)
        self.register_buffer("merge_weights", merge, persistent=False)
        self.views = ContrastiveViews(
            config.mean,
            config.std,
            crop_scale=config.crop_scale,
            jitter=config.jitter,
            blur_sigma=config.blur_sigma,
            noise_std=config.noise_std,
        )
        self.blur = GaussianBlur(config.heatmap_sigma)

    # scoring (the exported path) ----------------------------------------------------------------------

    def deviations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Δ^(s) = z^(s) − HF^(s)(z^(s)) per position (eq. 5), each [B, C^(s), H^(s), W^(s)]."""
        out = []
        for z, memory in zip(self.encoder(x, self.taps), self.memories):
            q = channels_last(z)
            recalled, _ = memory(q)
            out.append((memory.state(q) - recalled).permute(0, 3, 1, 2))
        return out

    def scale_scores(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        """s_a^(s) for every scale, [B, S]: ‖Δ^(s)‖₂ (eq. 6) or g^(s)∘φ(Δ^(s)) (eq. 7)."""
        if self.config.scoring == "outlier_exposure":
            return torch.cat([head(d) for head, d in zip(self.oe_heads, deltas)], dim=1)
        return torch.stack([d.pow(2).sum(dim=(1, 2, 3)).sqrt() for d in deltas], dim=1)

    def deviation_map(self, deltas: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """‖Δ^(s)_ij‖₂ per position, resized to the input and merged with the weights of eq. 9."""
        maps = [to_input_size(d.pow(2).sum(dim=1, keepdim=True).sqrt(), size) for d in deltas]
        return sum(w * m for w, m in zip(self.merge_weights, maps))

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        deltas = self.deviations(x)
        merged = self.scale_scores(deltas) @ self.merge_weights  # eq. 9
        return merged, self.blur(self.deviation_map(deltas, (x.shape[-2], x.shape[-1])))

    # stage 1: contrasted multi-scale memory -----------------------------------------------------------

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage 1 on normal images (eq. 4 with y = 1)."""
        return self.contrastive_memory_loss(x)

    def contrastive_memory_loss(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """L_COM-MS (eq. 4); ``labels`` 1 marks anomalies, which skip the memory (eq. 1)."""
        normal = torch.ones(x.shape[0], device=x.device) if labels is None else 1.0 - labels.float()
        views = torch.cat([self.views(x), self.views(x)]) if self.training else torch.cat([x, x])
        contrastive, variance, count = x.new_zeros(()), x.new_zeros(()), 0
        for s, z in enumerate(self.encoder(views, self.taps)):
            q, q_other = self.sampled_queries(z, self.config.sampling_ratios[s])
            recalled = self.recall(s, q, normal)
            com = nt_xent(recalled, q_other, self.config.temperature)  # L_COM per position, [P]
            contrastive = contrastive + self.lambdas[s] * com.sum()
            variance = variance + self.lambdas[s] * variance_loss(recalled, normal).sum()
            count += q.shape[0]  # |Ω^(s)|
        contrastive, variance = contrastive / count, self.config.variance_weight * variance / count
        return {"loss": contrastive + variance, "contrastive": contrastive, "variance": variance}

    def sampled_queries(self, z: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectors at the positions Ω^(s) of both views, each [P, B, C] (all positions in eval mode)."""
        flat = z.flatten(2)  # [2B, C, HW]
        if self.training:
            flat = flat[:, :, sample_positions(flat.shape[-1], ratio, z.device)]
        first, second = flat.permute(2, 0, 1).chunk(2, dim=1)
        return first, second

    def recall(self, s: int, q: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
        """Mem(z, y) (eq. 1): the memory's read-out for normal samples, the features themselves otherwise."""
        recalled, _ = self.memories[s](q)
        y = normal.view(1, -1, 1)
        return y * recalled + (1 - y) * q

    # stage 2: outlier exposure ------------------------------------------------------------------------

    def outlier_exposure_loss(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """L_SUP (eq. 8) for the heads g^(s); ``labels`` 0 normal / 1 anomalous."""
        with self.frozen_features():
            deltas = self.deviations(x)
        distances = torch.cat([head(d) for head, d in zip(self.oe_heads, deltas)], dim=1)  # [B, S]
        normal = (1.0 - labels.float()).view(-1, 1)
        per_term = double_hinge(distances, normal, self.config.margin) / distances.numel()  # 1/(S·B)
        normal_part, anomalous_part = (per_term * normal).sum(), (per_term * (1 - normal)).sum()
        return {"loss": normal_part + anomalous_part, "normal": normal_part, "anomalous": anomalous_part}

    @contextmanager
    def frozen_features(self) -> Iterator[None]:
        """Stage 2 reads the stage-1 encoder and memories as fixed: no gradient, BatchNorm in eval mode."""
        modes = [m.training for m in (self.encoder, self.memories)]
        self.encoder.eval()
        self.memories.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.encoder.train(modes[0])
            self.memories.train(modes[1])


def pool_side(side: int, wanted: int) -> int:
    """φ's output side: ``wanted`` capped at the map, and dividing it (adaptive pooling exports to ONNX
    only as a plain average pool)."""
    pool = min(wanted, side)
    if side % pool:
        raise ValueError(f"oe_pool={wanted} must divide the {side}×{side} feature map")
    return pool


def check_config(config: AnoMemConfig) -> None:
    n_stages, n_scales = len(config.stage_widths), len(config.memory_stages)
    if len(config.stage_depths) != n_stages:
        raise ValueError("stage_widths and stage_depths must have the same length")
    if list(config.memory_stages) != sorted(set(config.memory_stages)) or not all(
        1 <= s <= n_stages for s in config.memory_stages
    ):
        raise ValueError(f"memory_stages must be increasing stage numbers in 1..{n_stages}")
    for name in ("memory_sizes", "sampling_ratios"):
        if len(getattr(config, name)) != n_scales:
            raise ValueError(f"{name} needs one entry per memory stage ({n_scales})")
    if config.scale_weights and len(config.scale_weights) != n_scales:
        raise ValueError(f"scale_weights needs one entry per memory stage ({n_scales}) or none")
    if config.scoring not in SCORING_MODES:
        raise ValueError(f"scoring must be one of {SCORING_MODES}, got {config.scoring!r}")


@register_model(
    "anomem", AnoMemConfig, "AnoMem (paper 002): multi-scale Hopfield memory, contrastive learning"
)
def anomem(config: AnoMemConfig) -> AnoMem:
    return AnoMem(config)
