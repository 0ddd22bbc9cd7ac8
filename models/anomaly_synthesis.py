"""Synthetic anomalies painted on good training images, batched in torch, with exact pixel masks.

A model trained to *restore* the clean image from a corrupted one learns to remove anomalies instead of
copying them (DRAEM, Zavrtanik et al. 2021; the "anomaly-synthesis training" of docs/models.md). No
outside image set is used, so nothing here knows what the test defects look like:

* ``blotch``  — Perlin-noise regions (DRAEM's masks) filled with a *material* (``MATERIALS``), blended
  with opacity β;
* ``stain``   — Perlin-noise regions whose brightness is shifted up or down (a local intensity change);
* ``scratch`` — thin random polylines, darker or brighter than the surface (cracks, scratches).

A blotch's material is, per image, one of ``materials``:

* ``image``    — a flipped, transposed copy of *another* good image of the batch (cut-paste from good parts);
* ``rescaled`` — that copy zoomed in 2× or out 2× (the surface at a wrong scale);
* ``noise``    — fractal Perlin noise (4 octaves) of random brightness and contrast: foreign material, the
  role DRAEM gives to the DTD texture set, generated instead of downloaded.

Why three: with only ``image``, a blotch looks like the surface itself and the segmenter learns seams
rather than foreign matter. Measured on the synthetic textures (20 epochs, three seeds): grass pixel
AUROC 88.8 → 89.5 (its cut-paste patches 78.4 → 80.1), gravel 92.3 → 92.4, elpv-mono unchanged
(benchmarks/results/real-defects-study.md): a small gain, kept because it is DRAEM's principle.

Every draw comes from a ``torch.Generator``, so a batch corrupts identically for the same seed, and the
returned mask marks exactly the pixels that were changed by at least ``min_change``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("blotch", "stain", "scratch")
MATERIALS = ("image", "rescaled", "noise")


def perlin_noise(batch: int, size: int, cells: int, generator: torch.Generator) -> torch.Tensor:
    """2-D gradient noise [B, size, size], roughly in [-1, 1]: random unit gradients on a lattice of
    ``cells``² cells, blended with the quintic fade 6t⁵ − 15t⁴ + 10t³ (Perlin 2002)."""
    angles = torch.rand(batch, cells + 1, cells + 1, generator=generator) * (2 * math.pi)
    grad_x, grad_y = torch.cos(angles), torch.sin(angles)
    t = torch.arange(size, dtype=torch.float32) * (cells / size)
    i, f = t.long(), t - t.floor()
    fy, fx = f[:, None], f[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        # each pixel's cell corner, rows then columns: two index_selects, ~3x faster than a 2-D gather
        rows, cols = i + dy, i + dx
        gx = grad_x.index_select(1, rows).index_select(2, cols)
        gy = grad_y.index_select(1, rows).index_select(2, cols)
        return gx * (fx - dx) + gy * (fy - dy)

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
    share = 0.02 + 0.13 * torch.rand(batch, generator=generator)
    rank = ((1.0 - share) * (noise.shape[1] - 1)).long()
    # the rank-th smallest value per image (kthvalue counts from 1): a selection, not a full sort
    cut = torch.stack([row.kthvalue(int(k) + 1).values for row, k in zip(noise, rank)])
    return (noise > cut[:, None]).float().view(batch, 1, size, size)


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


def rescaled(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image zoomed in 2× (a random crop) or out 2× (four mirrored half-size copies), same size."""
    batch, _, size, _ = images.shape
    offset = int(torch.randint(0, size + 1, (1,), generator=generator).item())
    zoom_in = F.interpolate(images, scale_factor=2.0, mode="bilinear", align_corners=False)
    zoom_in = zoom_in[..., offset : offset + size, offset : offset + size]
    half = F.interpolate(images, scale_factor=0.5, mode="bilinear", align_corners=False)
    zoom_out = torch.cat(
        [torch.cat([half, half.flip(-1)], -1), torch.cat([half.flip(-2), half.flip(-1, -2)], -1)], -2
    )
    return torch.where(torch.rand(batch, 1, 1, 1, generator=generator) < 0.5, zoom_in, zoom_out)


def fractal_noise(batch: int, channels: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """[B, C, size, size] in [0, 1]: Perlin octaves of 4..32 cells (amplitude 1/octave), rescaled to a random
    floor (0-0.6) and contrast."""
    noise = sum(perlin_noise(batch, size, c, generator) / (i + 1) for i, c in enumerate((4, 8, 16, 32)))
    low, high = noise.amin((1, 2), keepdim=True), noise.amax((1, 2), keepdim=True)
    noise = ((noise - low) / (high - low))[:, None]
    floor = 0.6 * torch.rand(batch, 1, 1, 1, generator=generator)
    contrast = torch.rand(batch, 1, 1, 1, generator=generator)
    return (floor + (1 - floor) * contrast * noise).clamp(0, 1).expand(batch, channels, size, size)


def check_materials(materials: tuple[str, ...], name: str = "materials") -> None:
    """Refuses an empty list or a name outside ``MATERIALS`` (a typo would silently train without it)."""
    if not materials or set(materials) - set(MATERIALS):
        raise ValueError(f"{name} must be names from {MATERIALS}, got {list(materials)}")


def blotch_material(
    other: torch.Tensor, generator: torch.Generator, materials: tuple[str, ...]
) -> torch.Tensor:
    """Per image, one of ``materials`` (module docstring) made from ``other`` (other good images); each
    material is made only for the images that drew it."""
    check_materials(materials)
    batch, channels, size, _ = other.shape
    choice = torch.randint(0, len(materials), (batch,), generator=generator)
    out = other.clone()  # ``image`` keeps ``other`` where it was chosen
    for i, name in enumerate(materials):
        rows = (choice == i).nonzero().flatten()
        if name == "image" or not len(rows):
            continue
        if name == "rescaled":
            out[rows] = rescaled(other[rows], generator)
        else:
            out[rows] = fractal_noise(len(rows), channels, size, generator)
    return out


def synthesize(
    x: torch.Tensor,
    generator: torch.Generator,
    share: float = 0.5,
    min_change: float = 0.02,
    materials: tuple[str, ...] = MATERIALS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt about ``share`` of a batch of good images ``x`` [B, C, H, W] (pixels in [0, 1]).

    Returns ``(x_corrupted, mask)``, mask [B, 1, H, W] in {0, 1}: the pixels whose value changed by at
    least ``min_change`` (so an invisible draw leaves an all-zero mask, never a false label).

    Regions and materials are drawn only for the images that get them (a stroke for a third of the
    painted ones, fractal noise for a ninth...): at 128 px about 4 % of a restore training step instead
    of a quarter of it (``docs/models.md``).
    """
    batch, _, size, _ = x.shape
    kind = torch.randint(0, len(KINDS), (batch,), generator=generator)
    painted = torch.rand(batch, generator=generator) < share
    beta = 0.3 + 0.7 * torch.rand(batch, 1, 1, 1, generator=generator)  # opacity of the anomaly
    sign = torch.where(torch.rand(batch, 1, 1, 1, generator=generator) < 0.5, 1.0, -1.0)
    shift = sign * (0.15 + 0.35 * torch.rand(batch, 1, 1, 1, generator=generator))
    target = (x + shift).clamp(0, 1)  # stains and strokes shift brightness; blotches get a material
    region = x.new_zeros(batch, 1, size, size)

    perlin = (painted & (kind < 2)).nonzero().flatten()  # blotches and stains: Perlin-noise regions
    strokes = (painted & (kind == 2)).nonzero().flatten()
    blotches = (painted & (kind == 0)).nonzero().flatten()
    if len(perlin):
        region[perlin] = perlin_masks(len(perlin), size, generator)
    if len(strokes):
        region[strokes] = polyline_masks(len(strokes), size, generator)
    if len(blotches):
        target[blotches] = blotch_material(another_image(x, blotches, generator), generator, materials)
    out = torch.lerp(x, target, beta * region)
    mask = ((out - x).abs().amax(dim=1, keepdim=True) >= min_change).float() * region
    return out, mask


def another_image(x: torch.Tensor, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each of ``rows``, the batch's previous good image, flipped and flipped or transposed (one draw
    per batch), so a pasted blotch never lines up with the surface it covers."""
    other = x[(rows - 1) % len(x)]
    if torch.rand(1, generator=generator).item() < 0.5:
        other = other.flip(-1)
    return other.transpose(-1, -2) if torch.rand(1, generator=generator).item() < 0.5 else other.flip(-2)
