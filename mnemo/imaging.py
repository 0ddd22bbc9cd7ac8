"""Torch-free image decoding and preprocessing, shared by training and the ONNX serving path.

The pipeline, one small function per step:

    decode_image(bytes | path)   → float32 pixels [H, W, C], C ∈ {1, 3}, on the 8-bit scale 0…255
    to_channels(pixels, 1 | 3)   → the model's channel count (ITU-R 601 luma, or gray replicated)
    resize_pixels(pixels, size)  → the model's square size, by the declared policy
    normalise(pixels, mean, std) → float32 [C, H, W] = (pixel/255 - mean) / std   (models/base.py)

Pixels stay float from decoding on, so 16-bit and float sources keep their precision until the model sees
them (there is no intermediate 8-bit rounding). ``preprocess`` chains the steps; ``display_rgb`` cuts the
image as the model saw it, for ``mnemo.heatmaps`` to draw a heatmap onto.

Safety: decoding reads the header first and refuses images whose declared pixel count exceeds a per-call
``max_pixels`` *before* any pixel buffer is allocated, so a decompression bomb (a few KB declaring
30000×30000) costs nothing. Every decoding failure is an ``ImageDecodeError`` carrying a machine ``reason``.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

# 40 megapixels: larger than any inspection camera frame we expect, far below Pillow's own 89 MP guard.
DEFAULT_MAX_PIXELS = 40_000_000
RESIZE_POLICIES = ("resize", "center_crop")

# Modes Pillow converts losslessly (or by its documented rule) to RGB / RGBA / L before we read pixels.
_TO_RGB = {"CMYK", "YCbCr", "LAB", "HSV", "RGBX"}
_TO_RGBA = {"RGBa", "PA"}
_TO_LA = {"La"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
# Magic bytes of common formats: a file that starts like one but will not open was cut short.
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")

Source = bytes | bytearray | memoryview | str | os.PathLike


class ImageDecodeError(ValueError):
    """An input that cannot become model pixels. ``reason`` is stable and machine-readable:

    ``empty``, ``not_an_image``, ``truncated``, ``too_large``, ``unsupported_mode``.
    """

    REASONS = ("empty", "not_an_image", "truncated", "too_large", "unsupported_mode")

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become a model's input; stored in the bundle manifest.

    ``mean``/``std`` hold one value (broadcast to every channel) or one per channel, as in
    ``models.base.ModelConfig``. ``resize``: ``"resize"`` stretches the whole image to ``size``×``size``
    (bilinear, aspect ratio not kept, nothing cut off); ``"center_crop"`` scales the shorter side to
    ``size`` (bilinear, aspect kept) and cuts the centred square (the borders of the longer side are lost).
    """

    channels: int = 1
    size: int = 28
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    resize: str = "resize"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.channels):
                raise ValueError(f"{name} needs 1 or {self.channels} values, got {len(values)}")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Preprocessing:
        known = {"channels", "size", "mean", "std", "resize"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing key(s) {unknown}; valid keys: {sorted(known)}")
        values = dict(raw)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(values[key]) if isinstance(values[key], list | tuple) else (values[key],)
        return cls(**values)

    @classmethod
    def from_model_config(cls, config: Any, resize: str = "resize") -> Preprocessing:
        """From any ``ModelConfig``-like object (``in_channels``, ``image_size``, ``mean``, ``std``)."""
        return cls(config.in_channels, config.image_size, tuple(config.mean), tuple(config.std), resize)


# --------------------------------------------------------------------------------------------- decoding


def decode_image(source: Source, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode bytes or a file into float32 pixels [H, W, C] (C = 1 or 3) on the 0…255 scale.

    A path is read into memory first (``OSError`` such as ``FileNotFoundError`` propagates unchanged);
    decoding errors are ``ImageDecodeError`` whose message starts with the path. Multi-frame files (GIF,
    TIFF stacks) give their first frame.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        return _decode_bytes(bytes(source), max_pixels)
    try:
        return _decode_bytes(Path(source).read_bytes(), max_pixels)
    except ImageDecodeError as exc:
        raise ImageDecodeError(exc.reason, f"{source}: {exc}") from None


def _decode_bytes(data: bytes, max_pixels: int) -> np.ndarray:
    if not data:
        raise ImageDecodeError("empty", "empty input (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if data.startswith(_SIGNATURES):  # a known format's magic bytes, cut before the header ends
            raise ImageDecodeError("truncated", "image header is truncated") from None
        raise ImageDecodeError("not_an_image", "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's global guard fired first (its limit or a warnings-as-errors filter): same outcome.
        raise ImageDecodeError("too_large", f"image exceeds the decoder's pixel limit ({exc})") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        raise ImageDecodeError("truncated", f"corrupt image header ({exc})") from None
    with image:
        _check_size(image, max_pixels)
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError) as exc:
            raise ImageDecodeError("truncated", f"truncated or corrupt {image.format} data ({exc})") from None
        return image_to_pixels(image)


def _check_size(image: Image.Image, max_pixels: int) -> None:
    """Reject on the header's declared size, before ``load()`` allocates anything."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError("truncated", f"image declares an empty size {width}×{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(
            "too_large", f"image is {width}×{height} = {width * height:,} pixels, the limit is {max_pixels:,}"
        )


def image_to_pixels(image: Image.Image) -> np.ndarray:
    """Any supported Pillow mode → float32 [H, W, C] on the 0…255 scale, C = 1 (gray) or 3 (colour).

    Rules: ``1`` → 0/255; ``P`` → its palette colours (with transparency, as RGBA); CMYK, YCbCr, LAB, HSV →
    RGB by Pillow's conversion; alpha (RGBA, LA, PA, RGBa) is composited on **black** (pixel × α), so
    whatever colour hides under fully transparent pixels cannot leak into the score; 16-bit ``I;16*`` scale
    by 255/65535; 32-bit ``I`` by its true bit depth (see ``_int_bit_depth``); float ``F`` is read as
    intensities in [0, 1] (clipped, non-finite → 0) — the usual convention for float images.
    """
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "1":
        image = image.convert("L")
    elif mode in _TO_RGB:
        image = image.convert("RGB")
    elif mode in _TO_RGBA:
        image = image.convert("RGBA")
    elif mode in _TO_LA:
        image = image.convert("LA")
    mode = image.mode
    if mode in ("L", "RGB"):
        return _with_channels(np.asarray(image, dtype=np.float32))
    if mode in ("LA", "RGBA"):
        arr = np.asarray(image, dtype=np.float32)
        return _with_channels(arr[..., :-1] * (arr[..., -1:] / 255.0))
    if mode in _SIXTEEN_BIT:
        return _with_channels(np.asarray(image).astype(np.float32) * (255.0 / 65535.0))
    if mode == "I":
        arr = np.asarray(image).astype(np.float64)
        scale = 255.0 / (2.0 ** _int_bit_depth(image, arr) - 1.0)
        return _with_channels(np.clip(arr, 0.0, None) * scale)
    if mode == "F":
        arr = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        return _with_channels(np.clip(arr, 0.0, 1.0) * 255.0)
    raise ImageDecodeError("unsupported_mode", f"unsupported image mode {image.mode!r}")


def _int_bit_depth(image: Image.Image, arr: np.ndarray) -> int:
    """Bit depth of a 32-bit-integer (``I``) image.

    Pillow uses ``I`` for several sources, so the depth is read where the file says it (TIFF
    BitsPerSample); otherwise 16 bits when every value fits (16-bit PNG/PGM in older Pillow), else 32.
    Negative values (signed data) are clipped to 0 — inspection images are intensities.
    """
    tags = getattr(image, "tag_v2", None)
    if tags is not None and 258 in tags:
        bits = tags[258]
        return int(bits[0] if isinstance(bits, tuple) else bits)
    return 16 if arr.size == 0 or arr.max() <= 65535 else 32


def _with_channels(arr: np.ndarray) -> np.ndarray:
    arr = arr[..., None] if arr.ndim == 2 else arr
    return np.ascontiguousarray(arr, dtype=np.float32)


# ------------------------------------------------------------------------------------ channels and size


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """[H, W, 1|3] → [H, W, channels]. Colour → gray uses ITU-R 601 luma (Pillow's ``L`` weights)."""
    have = pixels.shape[-1]
    if have == channels:
        return pixels
    if channels == 1:
        luma = pixels[..., 0] * 0.299 + pixels[..., 1] * 0.587 + pixels[..., 2] * 0.114
        return luma[..., None].astype(np.float32)
    return np.repeat(pixels, channels, axis=-1)


def resize_pixels(pixels: np.ndarray, size: int, policy: str = "resize", nearest: bool = False) -> np.ndarray:
    """[H, W, C] → [size, size, C] by ``policy`` (see ``Preprocessing``); bilinear, or nearest for masks.

    Each channel goes through Pillow in float mode ``F``, so there is no 8-bit rounding; Pillow's bilinear
    widens its kernel when shrinking, which anti-aliases downscaling.
    """
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}, got {policy!r}")
    height, width = pixels.shape[:2]
    if policy == "center_crop":
        scale = size / min(height, width)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    else:
        new_w, new_h = size, size
    out = pixels if (new_h, new_w) == (height, width) else _resize_channels(pixels, new_w, new_h, nearest)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(out[top : top + size, left : left + size])


def _resize_channels(pixels: np.ndarray, width: int, height: int, nearest: bool) -> np.ndarray:
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    planes = [
        np.asarray(Image.fromarray(pixels[..., c].astype(np.float32)).resize((width, height), resample))
        for c in range(pixels.shape[-1])
    ]
    return np.stack(planes, axis=-1)


def normalise(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """[H, W, C] on 0…255 → float32 [C, H, W] = (pixel/255 - mean) / std, per channel.

    On the request path: one copy into [C, H, W], then two in-place passes (× 1/(255·std), − mean/std).
    """
    chw = np.array(np.transpose(pixels, (2, 0, 1)), dtype=np.float32, order="C")
    s = np.asarray(std, np.float32).reshape(-1, 1, 1)
    chw *= np.float32(1.0) / (np.float32(255.0) * s)
    chw -= np.asarray(mean, np.float32).reshape(-1, 1, 1) / s
    return chw


# ----------------------------------------------------------------------------------------- whole chain


def prepare_pixels(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Decoded pixels [H, W, C] (or [H, W]) on 0…255 → model input float32 [C, size, size]."""
    pixels = _with_channels(np.asarray(pixels, dtype=np.float32))
    sized = resize_pixels(to_channels(pixels, prep.channels), prep.size, prep.resize)
    return normalise(sized, prep.mean, prep.std)


def preprocess(source: Source, prep: Preprocessing, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes or a path → model input float32 [C, size, size]."""
    return prepare_pixels(decode_image(source, max_pixels=max_pixels), prep)


def preprocess_batch(
    sources: list[Source], prep: Preprocessing, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Several inputs → float32 [B, C, size, size]; the first bad input raises (its index in the message)."""
    out = np.empty((len(sources), prep.channels, prep.size, prep.size), np.float32)
    for i, source in enumerate(sources):
        try:
            out[i] = preprocess(source, prep, max_pixels=max_pixels)
        except ImageDecodeError as exc:
            raise ImageDecodeError(exc.reason, f"image {i}: {exc}") from None
    return out


def display_rgb(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Decoded pixels → uint8 RGB [size, size, 3] cut exactly as the model saw them (for overlays)."""
    sized = resize_pixels(
        to_channels(_with_channels(np.asarray(pixels, np.float32)), 3), prep.size, prep.resize
    )
    return np.clip(np.rint(sized), 0, 255).astype(np.uint8)
