"""A second memory, of examples: the encoder latents of normal training images (our extension, issue 16).

Papers 000/001 score by reconstruction error alone, and on ROCO it fails two ways
(benchmarks/results/roco-scores.md): a held-out class with less ink than the normal ones (MNIST's 1s)
scores *below* normal however badly it is rebuilt, and a held-out class that looks like a normal one
(Fashion-MNIST's T-shirts among shirts) is rebuilt well. Its encoder still places such images away from
every normal image. The bank keeps the latents z = f_e(x) of up to ``size`` training images and scores a
test image by its distance to the nearest, as Euclidean and as cosine distance:

    d_euc(z) = min_j ‖z − b_j‖₂          d_cos(z) = min_j ‖z/‖z‖ − b_j/‖b_j‖‖₂
    s(x) = Σ_c (c(x) − μ_c) / σ_c,  c ∈ {e, d_euc, d_cos}

with e the image's mean squared reconstruction error (the papers' score), and μ_c, σ_c each cue's mean
and spread over up to ``STAT_PROBES`` kept training images, each scored against the others: left out of
the bank, an image's distances are what a new normal image's are (its error, from weights trained on it,
runs a little lower than a new image's). The sum keeps the papers' score as one of three equal cues
rather than replacing it: measured on 10-epoch Memorizer runs, either distance alone or the error alone
is beaten by the sum on MNIST and Fashion-MNIST alike (benchmarks/results/roco-scores.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

STAT_PROBES = 2048  # bank entries scored leave-one-out for μ_c, σ_c
CHUNK = 256  # probes per distance block while fitting: CHUNK × size floats at a time
MAX_VALUES = 64 * 2**20  # size × latent dimension: 256 MB of float32 at most
SPREAD_FLOOR = 1e-3  # × a cue's mean: near-identical training images must not make its spread vanish


class LatentBank(nn.Module):
    """Up to ``size`` normal latents of dimension ``dim`` and the cue statistics; empty until ``fit``."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 2:
            raise ValueError(f"latent_bank must be 0 (off) or at least 2, got {size}")
        if size * dim > MAX_VALUES:
            raise ValueError(
                f"latent_bank {size} × latent dimension {dim} = {size * dim:,} values, over {MAX_VALUES:,}:"
                " lower latent_bank"
            )
        self.size = size
        # the entries b_j as unit columns b_j/‖b_j‖ of a [dim, size] matrix (the distances' operand as it
        # is stored, so an export folds no second or transposed copy of the bank) and their norms ‖b_j‖
        self.register_buffer("unit_columns", torch.zeros(dim, 0))
        self.register_buffer("norms", torch.zeros(0))
        self.register_buffer("stats", torch.tensor([[0.0, 1.0]] * 3))  # (μ, σ) of e, d_euc, d_cos

    @property
    def fitted(self) -> bool:
        return len(self.norms) > 0

    @property
    def dim(self) -> int:
        return self.unit_columns.shape[0]

    @property
    def items(self) -> torch.Tensor:
        """The kept latents b_j, [n, dim], rebuilt from the unit columns and norms."""
        return self.entries(torch.arange(len(self.norms), device=self.norms.device))

    def entries(self, index: torch.Tensor) -> torch.Tensor:
        """b_j for each j in ``index``, [len(index), dim]: only the entries asked for are rebuilt."""
        return self.unit_columns[:, index].t() * self.norms[index, None]

    def fit(self, latents: torch.Tensor, errors: torch.Tensor) -> None:
        """Keep ``latents`` [n, dim] (n ≤ size, in random order) and fit each cue's μ, σ on the first
        ``STAT_PROBES`` of them, each against the others (``errors``: their reconstruction errors)."""
        if len(latents) < 2:
            raise ValueError(f"the latent bank needs at least 2 training images, got {len(latents)}")
        latents = latents.detach().float()
        self._keep(latents)
        probes = min(STAT_PROBES, len(latents))
        starts = range(0, probes, CHUNK)
        blocks = [self.distances(latents[i : min(i + CHUNK, probes)], skip=i) for i in starts]
        euc, cos = (torch.cat(cue) for cue in zip(*blocks))
        cues = torch.stack([errors[:probes].float(), euc, cos])
        mean = cues.mean(dim=1)
        spread = cues.std(dim=1).maximum(SPREAD_FLOOR * mean.abs()).clamp_min(1e-12)
        self.stats = torch.stack([mean, spread], dim=1)

    def distances(self, z: torch.Tensor, skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(d_euc, d_cos) of each row of ``z`` [B, dim] to its nearest entry. ``skip`` (fitting only): row
        i is entry ``skip`` + i itself, left out. One [B, size] product p_j = z·b_j/‖b_j‖ ranks the
        entries for both cues (‖z − b_j‖² = ‖z‖² − 2‖b_j‖ p_j + ‖b_j‖², and the cosine orders as p_j):
        scoring one image streams the bank once, and the export holds one copy of it. The nearest entry's
        distances are then taken directly: the expansion cancels near zero, where a float32 rounding apart
        becomes a large standardised one."""
        product = z @ self.unit_columns
        squared = self.norms * (self.norms - 2 * product)  # ‖z‖² is the same for every entry
        if skip is not None:
            own = torch.arange(len(z), device=z.device)
            squared[own, own + skip] = float("inf")
            product[own, own + skip] = -float("inf")
        euc = (z - self.entries(squared.argmin(dim=1))).norm(dim=1)
        cos = (F.normalize(z, dim=1) - self.unit_columns[:, product.argmax(dim=1)].t()).norm(dim=1)
        return euc, cos

    def score(self, z: torch.Tensor, errors: torch.Tensor) -> torch.Tensor:
        """s(x): the three cues standardised and summed, [B]."""
        if not self.fitted:
            raise ValueError("the latent bank is not filled yet: the model's after_fit fills it")
        cues = torch.stack([errors, *self.distances(z)], dim=1)
        return ((cues - self.stats[:, 0]) / self.stats[:, 1]).sum(dim=1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """A fitted bank holds as many entries as it kept: take the saved shape before loading. A bank
        saved before the unit columns were stored (its latents as ``items`` [n, dim]) loads too."""
        columns, norms = prefix + "unit_columns", prefix + "norms"
        if (key := prefix + "items") in state_dict:
            items = state_dict.pop(key)
            self._refuse_unless_fits(items.shape, latents_axis=0)
            state_dict[columns] = F.normalize(items.float(), dim=1).t().contiguous()
            state_dict[norms] = items.float().norm(dim=1)
        if (columns in state_dict) != (norms in state_dict):
            raise ValueError("a saved latent bank needs both its unit columns and their norms")
        if columns in state_dict:
            self._refuse_unless_fits(state_dict[columns].shape, latents_axis=1)
            kept = state_dict[columns].shape[1]
            self.unit_columns = self.unit_columns.new_empty(self.dim, kept)
            self.norms = self.norms.new_empty(kept)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _refuse_unless_fits(self, shape: torch.Size, latents_axis: int) -> None:
        """A saved bank of another latent dimension, or of more latents than ``size``, cannot load."""
        if len(shape) != 2 or shape[1 - latents_axis] != self.dim or shape[latents_axis] > self.size:
            layout = "latents × dimension" if latents_axis == 0 else "dimension × latents"
            raise ValueError(
                f"a saved latent bank of shape {tuple(shape)} ({layout}) does not fit this model's "
                f"(at most {self.size} latents of {self.dim})"
            )

    def _keep(self, latents: torch.Tensor) -> None:
        """Store ``latents`` [n, dim] as unit columns and norms."""
        self.norms = latents.norm(dim=1)
        self.unit_columns = F.normalize(latents, dim=1).t().contiguous()
