"""A synthetic-defect dataset in the MVTec AD layout, on real textures (scikit-image's brick, grass, gravel).

    <out>/train/good/000.png                 good crops of the texture
    <out>/test/good/000.png
    <out>/test/<defect>/000.png              one folder per defect type (DEFECT_TYPES)
    <out>/ground_truth/<defect>/000_mask.png exact pixel masks, 0 / 255
    <out>/dataset.json                       the summary ``generate`` returns

"Good" images are random crops of the 512×512 texture with flips, brightness/contrast jitter (and 90°
rotations for the isotropic grass and gravel; brick keeps its horizontal courses, as a real line would).
Defects are painted on a good image with their mask: ``scratch`` (thin random polyline), ``hole`` (dark
ellipse with soft edge), ``stain`` (a blotch shifting brightness or colour), ``cut_paste`` (a patch of another
texture, or of the same one at another scale and orientation, pasted in), ``perlin`` (Perlin-noise
blotches whose inside is re-textured). Soft-edged defects take as mask the pixels at ≥ 50 % opacity. Every
defect is redrawn until it is visible: mean |Δ| inside its mask ≥ ``MIN_CONTRAST`` and at least
``MIN_MASK_FRACTION`` of the image. Each image has its own RNG seeded by (seed, split, index), so the set
is deterministic and growing a count never changes the images already there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from skimage import data as skdata

TEXTURES = ("brick", "grass", "gravel")
DEFECT_TYPES = ("scratch", "hole", "stain", "cut_paste", "perlin")
TINTS = {
    "brick": (1.0, 0.62, 0.48),
    "grass": (0.62, 1.0, 0.5),
    "gravel": (0.85, 0.85, 1.0),
}  # RGB multipliers
MIN_CONTRAST = 0.12  # mean absolute change inside a defect mask, on the [0, 1] scale
MIN_MASK_FRACTION = 0.002
MAX_TRIES = 20
_SPLIT_CODES = {"train": 0, "test_good": 1, **{d: 2 + i for i, d in enumerate(DEFECT_TYPES)}}


def load_texture(name: str) -> np.ndarray:
    """The 512×512 texture as float32 in [0, 1]."""
    if name not in TEXTURES:
        raise ValueError(f"unknown texture {name!r}; choose from {TEXTURES}")
    return getattr(skdata, name)().astype(np.float32) / 255.0


# ----------------------------------------------------------------------------------------------- noise


def perlin_noise(shape: tuple[int, int], cells: int, rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise, roughly in [-1, 1]: random unit gradients on a ``cells``×``cells``
    lattice, dot products with the offsets to the four corners, blended by the quintic fade 6t⁵-15t⁴+10t³."""
    h, w = shape
    angles = rng.uniform(0.0, 2.0 * np.pi, (cells + 1, cells + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.linspace(0.0, cells, h, endpoint=False)[:, None] * np.ones((1, w))
    x = np.linspace(0.0, cells, w, endpoint=False)[None, :] * np.ones((h, 1))
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = y - y0, x - x0

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grads[y0 + dy, x0 + dx]
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (6.0 * t - 15.0) + 10.0)

    uy, ux = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return ((top * (1 - uy) + bottom * uy) * np.sqrt(2.0)).astype(np.float32)


# ----------------------------------------------------------------------------------------- good images


def _resize(plane: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(
        Image.fromarray(plane.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR)
    )


def random_crop(texture: np.ndarray, size: int, rng: np.random.Generator, scale: float = 2.0) -> np.ndarray:
    """A ``size``² view of the texture: a crop of side ≈ ``scale``·size (±10 %) resized down."""
    side = int(np.clip(round(scale * size * rng.uniform(0.9, 1.1)), 8, min(texture.shape)))
    top = rng.integers(0, texture.shape[0] - side + 1)
    left = rng.integers(0, texture.shape[1] - side + 1)
    return _resize(texture[top : top + side, left : left + side], size)


def mirrored(texture: np.ndarray, side: int) -> np.ndarray:
    """The texture repeated by mirroring (no seams) to at least ``side`` × ``side``."""
    pad_h, pad_w = max(0, side - texture.shape[0]), max(0, side - texture.shape[1])
    return np.pad(texture, ((0, pad_h), (0, pad_w)), mode="symmetric")


def good_image(
    texture: np.ndarray, name: str, size: int, rng: np.random.Generator, view: float = 2.0
) -> np.ndarray:
    """A normal sample [size, size] in [0, 1]: crop (of side ≈ ``view`` × size), flips, (rotation),
    brightness/contrast jitter."""
    img = random_crop(texture, size, rng, view)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if rng.random() < 0.5:
        img = img[::-1, :]
    if name != "brick":
        img = np.rot90(img, int(rng.integers(0, 4)))
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.9, 1.1) + mean * rng.uniform(0.92, 1.08)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------- defects


def _ellipse_alpha(size: int, rng: np.random.Generator, radius: tuple[float, float]) -> np.ndarray:
    """Opacity of a randomly placed, rotated ellipse with a soft (1.5 px) edge."""
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    ry, rx = rng.uniform(*radius, 2) * size
    theta = rng.uniform(0.0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    dist = (np.sqrt((u / rx) ** 2 + (v / ry) ** 2) - 1.0) * min(rx, ry)  # ≈ pixels outside the edge
    return np.clip(0.5 - dist / 1.5, 0.0, 1.0)


def _blend(img: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = img * (1.0 - alpha[..., None]) + target * alpha[..., None]
    return out, alpha >= 0.5


def scratch(img: np.ndarray, rng: np.random.Generator, **_: Any) -> tuple[np.ndarray, np.ndarray]:
    """A thin random polyline (1-2 px) painted bright on dark texture or dark on bright."""
    size = img.shape[0]
    canvas = Image.new("L", (size, size), 0)
    start = rng.uniform(0.1, 0.9, 2) * size
    points = [tuple(start)]
    for _ in range(int(rng.integers(2, 5))):
        angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.3) * size
        start = np.clip(start + length * np.array([np.cos(angle), np.sin(angle)]), 0, size - 1)
        points.append(tuple(start))
    ImageDraw.Draw(canvas).line(points, fill=255, width=int(rng.integers(1, 3)))
    mask = np.asarray(canvas) > 0
    level = rng.uniform(0.9, 1.0) if img[mask].mean() < 0.5 else rng.uniform(0.0, 0.1)
    out = img.copy()
    out[mask] = level
    return out, mask


def hole(img: np.ndarray, rng: np.random.Generator, **_: Any) -> tuple[np.ndarray, np.ndarray]:
    """A dark ellipse (radii 6-15 % of the side) with a soft rim."""
    alpha = _ellipse_alpha(img.shape[0], rng, (0.06, 0.15))
    return _blend(img, np.full(img.shape[-1], rng.uniform(0.0, 0.08), np.float32), alpha)


def stain(img: np.ndarray, rng: np.random.Generator, **_: Any) -> tuple[np.ndarray, np.ndarray]:
    """An irregular blotch (ellipse warped by noise) that shifts brightness, or colour on RGB images."""
    size, channels = img.shape[0], img.shape[-1]
    base = _ellipse_alpha(size, rng, (0.1, 0.2))
    alpha = np.clip(base * (0.8 + 0.6 * perlin_noise((size, size), 4, rng)), 0.0, 1.0)
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.4) * (rng.uniform(0.4, 1.0, channels))
    return _blend(img, np.clip(img + shift, 0.0, 1.0), alpha)


def cut_paste(
    img: np.ndarray, rng: np.random.Generator, *, textures: dict[str, np.ndarray], name: str, **_: Any
) -> tuple[np.ndarray, np.ndarray]:
    """A rectangle (15-30 % of the side) from another texture, or from this one at a different scale and
    orientation with a brightness change, pasted at a random place."""
    size = img.shape[0]
    others = [t for t in textures if t != name]
    source = str(rng.choice(others)) if rng.random() < 0.5 else name
    scale = 2.0 if source != name else float(rng.choice([0.7, 4.0]))
    patch = np.rot90(random_crop(textures[source], size, rng, scale), 1)
    if source == name:
        patch = np.clip(patch + rng.choice([-1.0, 1.0]) * rng.uniform(0.15, 0.3), 0.0, 1.0)
    ph, pw = (rng.uniform(0.15, 0.3, 2) * size).astype(int).clip(2)
    top, left = rng.integers(0, size - ph + 1), rng.integers(0, size - pw + 1)
    mask = np.zeros((size, size), bool)
    mask[top : top + ph, left : left + pw] = True
    out = img.copy()
    tint = img.mean(axis=(0, 1)) / max(float(img.mean()), 1e-3)  # keep an RGB image's colour cast
    out[mask] = np.clip(patch[mask][:, None] * tint, 0.0, 1.0)
    return out, mask


def perlin(img: np.ndarray, rng: np.random.Generator, **_: Any) -> tuple[np.ndarray, np.ndarray]:
    """Perlin-noise blotches covering 3-12 % of the image; inside, the texture is inverted and shifted."""
    size = img.shape[0]
    noise = perlin_noise((size, size), int(rng.choice([2, 4])), rng)
    mask = noise > np.quantile(noise, 1.0 - rng.uniform(0.03, 0.12))
    out = img.copy()
    out[mask] = np.clip(1.0 - img[mask] + rng.uniform(-0.15, 0.15), 0.0, 1.0)
    return out, mask


DEFECTS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "scratch": scratch,
    "hole": hole,
    "stain": stain,
    "cut_paste": cut_paste,
    "perlin": perlin,
}


def make_defect(
    img: np.ndarray, kind: str, rng: np.random.Generator, textures: dict[str, np.ndarray], name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of ``kind`` on ``img`` [H, W, C] in [0, 1] → (defective image, bool mask [H, W]).

    Redrawn (new random shape) until visible; raises if ``MAX_TRIES`` draws all fail.
    """
    for _ in range(MAX_TRIES):
        out, mask = DEFECTS[kind](img, rng, textures=textures, name=name)
        if mask.mean() >= MIN_MASK_FRACTION and np.abs(out - img)[mask].mean() >= MIN_CONTRAST:
            return out.astype(np.float32), mask
    raise RuntimeError(f"could not draw a visible {kind!r} defect in {MAX_TRIES} tries")


# ------------------------------------------------------------------------------------------- the set


def _colour(gray: np.ndarray, name: str, rgb: bool, rng: np.random.Generator) -> np.ndarray:
    """[H, W] → [H, W, C]: the texture's tint (jittered ±5 % per channel) for RGB, else one channel."""
    if not rgb:
        return gray[..., None]
    tint = np.asarray(TINTS[name], np.float32) * rng.uniform(0.95, 1.05, 3).astype(np.float32)
    return np.clip(gray[..., None] * tint, 0.0, 1.0)


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr).save(path)


def _check_settings(texture: str, size: int, counts: tuple[int, ...], defect_size: int | None) -> None:
    if texture not in TEXTURES:
        raise ValueError(f"unknown texture {texture!r}; choose from {TEXTURES}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if min(counts) < 0:
        raise ValueError("image counts must not be negative")
    if defect_size is not None and not 16 <= defect_size <= size:
        raise ValueError(f"defect_size must be in [16, size = {size}], got {defect_size}")


def generate(
    out_dir: str | Path,
    *,
    texture: str = "brick",
    size: int = 64,
    n_train: int = 200,
    n_test_good: int = 40,
    n_test_defect: int = 10,
    seed: int = 0,
    rgb: bool = False,
    defect_size: int | None = None,
) -> dict[str, Any]:
    """Write the dataset (layout in the module docstring) and return its summary (also ``dataset.json``).

    ``defect_size``: the high-resolution variant (issue 14's tiling benchmark). Good images are then the
    texture at its own scale, mirrored to cover frames larger than it, and each defect is drawn by the
    usual generator in a random ``defect_size``² window of the frame, so it covers a few hundred of its
    pixels, as on a line camera's frame.
    """
    _check_settings(texture, size, (n_train, n_test_good, n_test_defect), defect_size)
    out = Path(out_dir)
    textures = {t: load_texture(t) for t in TEXTURES}
    base = textures[texture] if defect_size is None else mirrored(textures[texture], round(1.2 * size))
    view = 2.0 if defect_size is None else 1.0
    width = max(3, len(str(max(n_train, n_test_good, n_test_defect) - 1)))
    counts: dict[str, int] = {}

    def rng_for(split: str, index: int) -> np.random.Generator:
        return np.random.default_rng([seed, _SPLIT_CODES[split], index])

    def good(rng: np.random.Generator) -> np.ndarray:
        return _colour(good_image(base, texture, size, rng, view), texture, rgb, rng)

    def defect(img: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if defect_size is None:
            return make_defect(img, kind, rng, textures, texture)
        top, left = rng.integers(0, size - defect_size + 1, 2)
        window = (slice(top, top + defect_size), slice(left, left + defect_size))
        painted, small = make_defect(img[window], kind, rng, textures, texture)
        img, mask = img.copy(), np.zeros((size, size), bool)
        img[window], mask[window] = painted, small
        return img, mask

    for split, folder, n in (("train", "train/good", n_train), ("test_good", "test/good", n_test_good)):
        for i in range(n):
            _save(good(rng_for(split, i)), out / folder / f"{i:0{width}d}.png")
        counts[folder] = n
    for kind in DEFECT_TYPES:
        for i in range(n_test_defect):
            rng = rng_for(kind, i)
            img, mask = defect(good(rng), kind, rng)
            _save(img, out / "test" / kind / f"{i:0{width}d}.png")
            _save(mask[..., None].astype(np.float32), out / "ground_truth" / kind / f"{i:0{width}d}_mask.png")
        counts[f"test/{kind}"] = n_test_defect
    summary = {
        "texture": texture,
        "size": size,
        "rgb": rgb,
        "channels": 3 if rgb else 1,
        "defect_size": defect_size,
        "seed": seed,
        "defect_types": list(DEFECT_TYPES),
        "counts": counts,
    }
    (out / "dataset.json").write_text(json.dumps(summary, indent=2))
    return summary
