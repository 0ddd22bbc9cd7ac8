"""Synthetic anomalies painted on good training images, batched in torch, with exact pixel masks.

A model trained to *restore* the clean image from a corrupted one learns to remove anomalies instead of
copying them (DRAEM, Zavrtanik et al. 2021; the "anomaly-synthesis training" of docs/models.md). Only
the training images themselves are used as material, never an outside texture set, so nothing here
knows what the test defects look like:

* ``blotch``  — Perlin-noise regions (DRAEM's masks) filled with a flipped, shifted copy of *another*
  good image of the batch, blended with opacity β (cut-paste from good images);
* ``stain``   — Perlin-noise regions whose brightness is shifted up or down (a local intensity change);
* ``scratch`` — thin random polylines, darker or brighter than the surface (cracks, scratches).

Every draw comes from a ``torch.Generator``, so a batch corrupts identically for the same seed, and the
returned mask marks exactly the pixels that were changed by at least ``min_change``.
"""

from __future__ import annotations

import math

import torch

KINDS = ("blotch", "stain", "scratch")


def perlin_noise(batch: int, size: int, cells: int, generator: torch.Generator) -> torch.Tensor:
    """2-D gradient noise [B, size, size], roughly in [-1, 1]: random unit gradients on a lattice of
    ``cells``² cells, blended with the quintic fade 6t⁵ − 15t⁴ + 10t³ (Perlin 2002)."""
    angles = torch.rand(batch, cells + 1, cells + 1, generator=generator) * (2 * math.pi)
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    t = torch.arange(size, dtype=torch.float32) * (cells / size)
    i, f = t.long(), t - t.floor()
    fy, fx = f[:, None], f[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = grads[:, i[:, None] + dy, i[None, :] + dx]  # [B, size, size, 2]
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)

    def fade(v: torch.Tensor) -> torch.Tensor:
        return v * v * v * (v * (6 * v - 15) + 10)

    uy, ux = fade(fy), fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), ux)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), ux)
    return torch.lerp(top, bottom, uy) * math.sqrt(2.0)


def perlin_masks(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Blotch masks [B, 1, size, size] in {0, 1}: Perlin noise at a random scale (2..16 cells), cut at a
    random quantile so each covers 2-15 % of the image."""
    cells = int(2 ** torch.randint(1, 5, (1,), generator=generator).item())
    noise = perlin_noise(batch, size, cells, generator).flatten(1)
    share = 0.02 + 0.13 * torch.rand(batch, 1, generator=generator)
    rank = ((1.0 - share) * (noise.shape[1] - 1)).long()
    cut = noise.sort(dim=1).values.gather(1, rank)
    return (noise > cut).float().view(batch, 1, size, size)


def polyline_masks(batch: int, size: int, generator: torch.Generator, segments: int = 4) -> torch.Tensor:
    """Thin polylines [B, 1, size, size]: ``segments`` joined strokes of 10-60 % of the side, 1-3 px wide."""
    steps = torch.rand(batch, segments, 2, generator=generator)
    angle, length = steps[..., 0] * 2 * math.pi, (0.1 + 0.5 * steps[..., 1]) * size
    start = (0.1 + 0.8 * torch.rand(batch, 1, 2, generator=generator)) * size
    moves = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1) * length[..., None]
    points = torch.cat([start, start + moves.cumsum(1)], dim=1).clamp(0, size - 1)  # [B, S+1, 2]
    a, b = points[:, :-1, None, None, :], points[:, 1:, None, None, :]  # [B, S, 1, 1, 2]
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    p = torch.stack([xx, yy], dim=-1)  # [H, W, 2] as (x, y)
    ab = b - a
    t = (((p - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-6)).clamp(0, 1)
    dist = (p - (a + t[..., None] * ab)).norm(dim=-1).amin(dim=1)  # [B, H, W] to the nearest stroke
    width = 0.3 + 1.2 * torch.rand(batch, 1, 1, generator=generator)
    return (dist <= width).float().unsqueeze(1)


def _pick(batch: int, generator: torch.Generator, p: float) -> torch.Tensor:
    return (torch.rand(batch, 1, 1, 1, generator=generator) < p).float()


def synthesize(
    x: torch.Tensor, generator: torch.Generator, share: float = 0.5, min_change: float = 0.02
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt about ``share`` of a batch of good images ``x`` [B, C, H, W] (pixels in [0, 1]).

    Returns ``(x_corrupted, mask)``, mask [B, 1, H, W] in {0, 1}: the pixels whose value changed by at
    least ``min_change`` (so an invisible draw leaves an all-zero mask, never a false label).
    """
    batch, _, size, _ = x.shape
    kind = torch.randint(0, len(KINDS), (batch, 1, 1, 1), generator=generator)
    beta = 0.3 + 0.7 * torch.rand(batch, 1, 1, 1, generator=generator)  # opacity of the anomaly
    blotch = perlin_masks(batch, size, generator)

    other = torch.roll(x, shifts=1, dims=0)  # another good image of the batch as material
    if torch.rand(1, generator=generator).item() < 0.5:
        other = other.flip(-1)
    other = other.transpose(-1, -2) if torch.rand(1, generator=generator).item() < 0.5 else other.flip(-2)
    sign = torch.where(_pick(batch, generator, 0.5) > 0, 1.0, -1.0)
    shift = sign * (0.15 + 0.35 * torch.rand(batch, 1, 1, 1, generator=generator))

    target = torch.where(kind == 0, other, (x + shift).clamp(0, 1))  # stains and strokes shift brightness
    region = torch.where(kind == 2, polyline_masks(batch, size, generator), blotch)
    region = region * _pick(batch, generator, share)
    out = torch.lerp(x, target.expand_as(x), beta * region)
    mask = ((out - x).abs().amax(dim=1, keepdim=True) >= min_change).float() * region
    return out, mask
