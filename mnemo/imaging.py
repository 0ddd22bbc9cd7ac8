"""Torch-free image decoding and preprocessing, shared by training and the ONNX serving path.

The pipeline, one small function per step:

    decode_image(bytes | path)   → float32 pixels [H, W, C], C ∈ {1, 3}, on the 8-bit scale 0…255
    to_channels(pixels, 1 | 3)   → the model's channel count (ITU-R 601 luma, or gray replicated)
    resize_pixels(pixels, size)  → the model's square size, by the declared policy
    normalise(pixels, mean, std) → float32 [C, H, W] = (pixel/255 - mean) / std   (models/base.py)

``decode_image`` keeps the full size and goes to float at once, so 16-bit and float sources keep their
precision. That is bounded when the image is not much larger than the model's input, but a 40-megapixel
frame would be 480 MB of floats for a 256 px model; ``decode_for_model`` (the request path, and
``preprocess``) therefore shrinks a large image before it becomes float: a JPEG is decoded at 1/2, 1/4 or
1/8 scale (DCT scaling, ``draft``), then Pillow's box ``reduce`` averages it in its own 8-bit (or 16/32-bit)
mode, each step only as far as leaves ``REDUCING_GAP`` × the model's size, from where the float steps run
as usual. An image less than 2 × ``REDUCING_GAP`` times the model's size in either direction (768 px for a
128 px model) is not reduced at all, so its pixels are exactly ``decode_image``'s, the ones training reads.
``open_image`` reads the header alone, so a caller can see what decoding would cost first.
``display_rgb`` cuts the image as the model saw it, for ``mnemo.heatmaps`` to draw a heatmap onto.

Safety: decoding reads the header first and refuses images whose declared pixel count exceeds a per-call
``max_pixels`` *before* any pixel buffer is allocated, so a decompression bomb (a few KB declaring
30000×30000) costs nothing. Images whose pixel data is missing are refused as ``truncated`` rather than
filled in: Pillow's ``LOAD_TRUNCATED_IMAGES`` is never used (``decode`` refuses to run with it set), its
load errors surface, and a PNG whose compressed stream ends cleanly before the last row (which Pillow
accepts and fills with zeros) is caught by counting the stream's rows: before decoding when the file is
far smaller than its rows (a bomb's shape), otherwise after it and only when its last row came out blank.
Every decoding failure is an ``ImageDecodeError`` carrying a machine ``reason``.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from mnemo import costly_formats

# 40 megapixels: larger than any inspection camera frame we expect, far below Pillow's own 89 MP guard.
DEFAULT_MAX_PIXELS = 40_000_000
RESIZE_POLICIES = ("resize", "center_crop")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")  # what folders are read for
# The only formats Pillow may open (``Image.open(formats=...)``): what cameras and inspection software write.
# The others cost what their header does not declare: an ICO or ICNS decodes its embedded PNG while it is
# opened, before its size can be checked (16 ICOs of 150 KB took a server to 2.5 GB), and QOI or plain PPM
# decode in Python at ~1 s a megapixel, holding the GIL.
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")
# A PNG's chunks are walked in Python, by Pillow and by ``png_rows_missing``: 16 MB of empty chunks cost
# 8 s. Most encoders write image data in chunks of 8 KiB or more, streaming ones one per row; a PNG of more
# chunks than one per ``PNG_BYTES_PER_CHUNK`` bytes, one per row (up to ``PNG_ROW_CHUNKS``) and
# ``PNG_MIN_CHUNKS`` is refused before Pillow sees it.
PNG_BYTES_PER_CHUNK, PNG_MIN_CHUNKS = 1024, 4096
PNG_ROW_CHUNKS = 65536  # up to this many rows, a data chunk per row (streaming encoders) also passes
# A PNG whose rows inflate to more than this many times its file has its rows counted before it is decoded
# (see ``_load``); photos and camera frames compress 1.5–4 ×, a bomb or a flat picture by 100 × or more.
PNG_COUNT_FIRST_RATIO = 16
# decode_for_model shrinks large images (JPEG DCT scaling, Pillow's box ``reduce``) no further than
# REDUCING_GAP × the size the model needs, then resizes as floats; Pillow documents 3 as the gap from which
# a reduce-then-resize is indistinguishable from a direct resize.
REDUCING_GAP = 3.0

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


class OpenImage:
    """An image whose header was read and accepted (size within the limit); no pixels decoded yet.

    ``open_image`` makes one; ``decode_for_model`` turns it into model-sized pixels. Cheap to hold: it
    keeps the encoded bytes and Pillow's parsed header. Close it (or use ``with``) when done.
    """

    def __init__(self, image: Image.Image, data: bytes) -> None:
        self.image, self.data = image, data

    @property
    def pixels(self) -> int:
        """Declared width × height: what decoding at full size would cost."""
        return self.image.width * self.image.height

    def close(self) -> None:
        self.image.close()

    def __enter__(self) -> OpenImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_image(source: Source, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> OpenImage:
    """Read the header of bytes or a file and check its declared size; decodes no pixels.

    A path is read into memory first (``OSError`` such as ``FileNotFoundError`` propagates unchanged);
    decoding errors are ``ImageDecodeError`` whose message starts with the path.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        return _open_bytes(bytes(source), max_pixels)
    try:
        return _open_bytes(Path(source).read_bytes(), max_pixels)
    except ImageDecodeError as exc:
        raise ImageDecodeError(exc.reason, f"{source}: {exc}") from None


def decode_image(source: OpenImage | Source, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode bytes, a file or an ``OpenImage`` (which it closes) into float32 pixels [H, W, C] (C = 1 or
    3) on the 0…255 scale, full size.

    Errors as ``open_image``. Multi-frame files (GIF, TIFF stacks) give their first frame.
    """
    opened = source if isinstance(source, OpenImage) else open_image(source, max_pixels=max_pixels)
    with opened:
        _load(opened)
        return image_to_pixels(opened.image)


def decode_for_model(
    opened: OpenImage | Source,
    prep: Preprocessing,
    target: tuple[int, int] | None = None,
    **open_args: Any,
) -> np.ndarray:
    """Decode for a model with ``prep``: float32 pixels [H, W, C] on 0…255 as ``decode_image`` gives
    them, but at most about 2 × ``REDUCING_GAP`` times the size the model needs (see the module
    docstring); ``prepare_pixels`` and ``display_rgb`` take it from there. ``target`` (width, height)
    replaces the model's size as what is needed (a tiled bundle's working resolution, ``mnemo.tiling``).

    Accepts an ``OpenImage``, which it closes (so the full-size pixels are freed as soon as the small ones
    exist), or anything ``open_image`` takes (with its ``max_pixels``).
    """
    if not isinstance(opened, OpenImage):
        opened = open_image(opened, **open_args)
    with opened:
        image = opened.image
        new_w, new_h = target or _scaled_size(image.width, image.height, prep.size, prep.resize)
        if image.format == "JPEG":  # decodes at 1/s scale only where that leaves ≥ REDUCING_GAP × the target
            image.draft(None, (math.ceil(new_w * REDUCING_GAP), math.ceil(new_h * REDUCING_GAP)))
        _load(opened)
        factor = int(min(image.width / new_w, image.height / new_h) / REDUCING_GAP)
        if factor < 2:
            return image_to_pixels(image)
        narrowed, scale = _narrow_mode(image)
        pixels = _with_channels(np.array(narrowed.reduce(factor), dtype=np.float32))
    if scale != 1.0:
        pixels *= np.float32(scale)
    return pixels


def _open_bytes(data: bytes, max_pixels: int) -> OpenImage:
    if not data:
        raise ImageDecodeError("empty", "empty input (0 bytes)")
    if data.startswith(_SIGNATURES[0]):
        _check_png_chunks(data)
    elif refused := costly_formats.refusal(data):
        raise ImageDecodeError(*refused)
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        if data.startswith(_SIGNATURES):  # a known format's magic bytes, cut before the header ends
            raise ImageDecodeError("truncated", "image header is truncated") from None
        accepted = ", ".join(ACCEPTED_FORMATS)
        raise ImageDecodeError("not_an_image", f"not an image in an accepted format ({accepted})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's global guard fired first (its limit or a warnings-as-errors filter): same outcome.
        raise ImageDecodeError("too_large", f"image exceeds the decoder's pixel limit ({exc})") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        raise ImageDecodeError("truncated", f"corrupt image header ({exc})") from None
    try:
        _check_size(image, max_pixels)
    except ImageDecodeError:
        image.close()
        raise
    return OpenImage(image, data)


def _load(opened: OpenImage) -> None:
    """Decode the pixels; missing pixel data is ``truncated``, never filled in."""
    image = opened.image
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # a process-wide Pillow switch; it would hide every truncation
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; mnemo refuses to fill in images")
    png = image.format == "PNG"
    if png and not (len(image.tile) == 1 and tuple(image.tile[0][1]) == (0, 0, *image.size)):
        # an APNG frame control ahead of the image data cuts it to a rectangle; the rest would read zero
        raise ImageDecodeError("truncated", "PNG frame control does not cover the whole image")
    counted_first = png and _png_inflates_far(opened.data)
    if counted_first:
        _refuse_missing_rows(opened.data)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError) as exc:
        raise ImageDecodeError("truncated", f"truncated or corrupt {image.format} data ({exc})") from None
    if png and not counted_first and _last_row_may_be_missing(image, opened.data):
        _refuse_missing_rows(opened.data)


def _refuse_missing_rows(png: bytes) -> None:
    if png_rows_missing(png):
        raise ImageDecodeError("truncated", "PNG pixel data ends before the last row")


def _png_inflates_far(data: bytes) -> bool:
    """Whether a PNG's rows are more than ``PNG_COUNT_FIRST_RATIO`` times its size: a bomb's shape (or a
    flat picture), whose rows are counted before Pillow allocates and fills them. Others, photos among
    them, are decoded first and counted only when their last row comes out blank, which saves a second
    inflate."""
    expected = png_row_bytes(data)
    return expected is None or expected > PNG_COUNT_FIRST_RATIO * len(data)


def _last_row_may_be_missing(image: Image.Image, data: bytes) -> bool:
    """After Pillow's load: rows it never received stay zero, and rows arrive in order, so a sequential
    PNG whose last row holds a non-zero byte has them all. An interlaced one (rows arrive in seven passes)
    or an all-zero last row cannot tell, and is counted."""
    if data[28:29] != b"\0":  # IHDR's interlace method
        return True
    last = image.crop((0, image.height - 1, image.width, image.height)).tobytes()
    return not last.strip(b"\0")


def _check_size(image: Image.Image, max_pixels: int) -> None:
    """Reject on the header's declared size, before ``load()`` allocates anything."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError("truncated", f"image declares an empty size {width}×{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(
            "too_large", f"image is {width}×{height} = {width * height:,} pixels, the limit is {max_pixels:,}"
        )


def _check_png_chunks(data: bytes) -> None:
    """Refuse a PNG of more chunks than its size or rows explain, walking no further than the limit, one
    whose header chunk is not first or not alone (Pillow reads past both; the row count reads the first
    chunk's header, the one the PNG standard allows), and one of more than one ICC profile (Pillow
    inflates each, up to 1 MB, and keeps the last: 20 MB of 1 KB profiles took 12 s)."""
    height = _PNG_IHDR.unpack_from(data, 16)[1] if data[12:16] == b"IHDR" and len(data) >= 33 else 0
    limit = max(PNG_MIN_CHUNKS, len(data) // PNG_BYTES_PER_CHUNK, min(height, PNG_ROW_CHUNKS) + 16)
    profiles = 0
    for count, (_, _, kind) in enumerate(_png_chunks(data), start=1):
        if count > limit:
            raise ImageDecodeError(
                "too_large",
                f"PNG of {len(data):,} bytes holds more than {limit:,} chunks; real encoders write far fewer",
            )
        if (kind == b"IHDR") != (count == 1):
            raise ImageDecodeError("truncated", "corrupt PNG: its header chunk (IHDR) must come first, once")
        profiles += kind == b"iCCP"
        if profiles > 1:
            raise ImageDecodeError(
                "too_large", "PNG holds more than one ICC profile (iCCP); the standard allows one"
            )


def _png_chunks(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(offset, length, kind) of each chunk of a PNG, up to IEND or the last whole chunk header."""
    pos, end = 8, len(data)
    while pos + 8 <= end:
        length, kind = _PNG_CHUNK.unpack_from(data, pos)
        yield pos, length, kind
        if kind == b"IEND":
            return
        pos += 12 + length


# Adam7 passes: (first column, first row, column step, row step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
_PNG_CHUNK, _PNG_IHDR = struct.Struct(">I4s"), struct.Struct(">IIBBBBB")


def png_rows_missing(data: bytes) -> bool:
    """Whether the image data Pillow decodes (``_png_image_data``) inflates to fewer bytes than the
    header's rows need.

    Pillow takes a zlib stream that ends cleanly before the last row as the end of the image and leaves
    the rest zero. Counting costs one inflate pass, in 1 MiB pieces that are dropped at once, and stops
    as soon as every row is there. A file this cannot parse is left to Pillow (False).
    """
    parts = _png_image_data(data)
    expected = png_row_bytes(data)
    if expected is None:
        return False
    stream, inflated = zlib.decompressobj(), 0
    try:
        for part in parts:
            while part and inflated < expected and not stream.eof:
                inflated += len(stream.decompress(part, min(1 << 20, expected - inflated)))
                part = stream.unconsumed_tail
            if inflated >= expected or stream.eof:
                break
    except zlib.error:
        return False  # corrupt rather than short: Pillow's own decoder reports it
    return inflated < expected


def _png_image_data(data: bytes) -> list[memoryview]:
    """The compressed stream Pillow decodes as the first frame: from the first IDAT (or fdAT, less its
    sequence number) through the image data chunks (IDAT, DDAT, fdAT) that follow it without a break."""
    view, parts = memoryview(data), []
    for pos, length, kind in _png_chunks(data):
        if kind in (b"IDAT", b"fdAT") or (parts and kind == b"DDAT"):
            skip = 4 if kind == b"fdAT" else 0
            parts.append(view[pos + 8 + skip : pos + 8 + max(length, skip)])
        elif parts:
            break
    return parts


def png_row_bytes(data: bytes) -> int | None:
    """How many bytes a PNG's image data inflates to, from its header (None when it has no usable one)."""
    if data[12:16] != b"IHDR" or len(data) < 33:
        return None
    width, height, depth, colour, _, _, interlace = _PNG_IHDR.unpack_from(data, 16)
    if colour not in _PNG_CHANNELS:
        return None
    bits = depth * _PNG_CHANNELS[colour]
    expected = 0
    for x0, y0, dx, dy in _ADAM7 if interlace else ((0, 0, 1, 1),):
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns > 0 and rows > 0:
            expected += rows * (1 + -(-columns * bits // 8))  # each row: a filter byte + packed pixels
    return expected


def image_to_pixels(image: Image.Image) -> np.ndarray:
    """Any supported Pillow mode → float32 [H, W, C] on the 0…255 scale, C = 1 (gray) or 3 (colour).

    Rules: ``1`` → 0/255; ``P`` → its palette colours (with transparency, as RGBA); CMYK, YCbCr, LAB, HSV →
    RGB by Pillow's conversion; alpha (RGBA, LA, PA, RGBa) is composited on **black** (pixel × α), so
    whatever colour hides under fully transparent pixels cannot leak into the score; 16-bit ``I;16*`` scale
    by 255/65535; 32-bit ``I`` by its true bit depth (see ``_int_bit_depth``); float ``F`` is read as
    intensities in [0, 1] (clipped, non-finite → 0) — the usual convention for float images.
    """
    image = _common_mode(image)
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
        scale = 255.0 / (2.0 ** _int_bit_depth(image, arr.max() if arr.size else 0) - 1.0)
        return _with_channels(np.clip(arr, 0.0, None) * scale)
    if mode == "F":
        return _with_channels(_unit_floats(image) * 255.0)
    raise ImageDecodeError("unsupported_mode", f"unsupported image mode {image.mode!r}")


def _common_mode(image: Image.Image) -> Image.Image:
    """The conversions both paths share: palettes, bilevel and other colour spaces to L/RGB(A)/LA."""
    mode = image.mode
    if mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if mode == "1":
        return image.convert("L")
    if mode in _TO_RGB:
        return image.convert("RGB")
    if mode in _TO_RGBA:
        return image.convert("RGBA")
    if mode in _TO_LA:
        return image.convert("LA")
    return image


def _narrow_mode(image: Image.Image) -> tuple[Image.Image, float]:
    """``image_to_pixels``'s rules, kept in Pillow's own modes so that reducing can follow: L or RGB
    (alpha premultiplied, i.e. composited on black, in 8 bits), or I/F for wide data, with the factor that
    takes the reduced values to the 0…255 scale."""
    image = _common_mode(image)
    mode = image.mode
    if mode in ("L", "RGB"):
        return image, 1.0
    if mode in ("LA", "RGBA"):
        premultiplied = image.convert("La" if mode == "LA" else "RGBa")
        bands = premultiplied.split()[:-1]
        return (bands[0] if len(bands) == 1 else Image.merge("RGB", bands)), 1.0
    if mode in _SIXTEEN_BIT:  # Pillow resizes 16-bit data only as 32-bit I
        return image.convert("I"), 255.0 / 65535.0
    if mode == "I":
        low, high = image.getextrema()
        scale = 255.0 / (2.0 ** _int_bit_depth(image, high) - 1.0)
        if low < 0:
            image = Image.fromarray(np.clip(np.asarray(image), 0, None).astype(np.int32))
        return image, scale
    if mode == "F":
        return Image.fromarray(_unit_floats(image)), 255.0
    raise ImageDecodeError("unsupported_mode", f"unsupported image mode {image.mode!r}")


def _unit_floats(image: Image.Image) -> np.ndarray:
    """A float image as intensities in [0, 1]: clipped, non-finite → 0."""
    arr = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(arr, 0.0, 1.0)


def _int_bit_depth(image: Image.Image, max_value: float) -> int:
    """Bit depth of a 32-bit-integer (``I``) image.

    Pillow uses ``I`` for several sources, so the depth is read where the file says it (TIFF
    BitsPerSample); otherwise 16 bits when every value fits (16-bit PNG/PGM in older Pillow), else 32.
    Negative values (signed data) are clipped to 0 — inspection images are intensities.
    """
    tags = getattr(image, "tag_v2", None)
    if tags is not None and 258 in tags:
        bits = tags[258]
        return int(bits[0] if isinstance(bits, tuple) else bits)
    return 16 if max_value <= 65535 else 32


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
    new_w, new_h = _scaled_size(width, height, size, policy)
    out = pixels if (new_h, new_w) == (height, width) else resize_to(pixels, new_w, new_h, nearest)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(out[top : top + size, left : left + size])


def _scaled_size(width: int, height: int, size: int, policy: str) -> tuple[int, int]:
    """The size an image is resized to before the centred ``size``×``size`` cut (see ``Preprocessing``)."""
    if policy == "center_crop":
        scale = size / min(height, width)
        return max(size, round(width * scale)), max(size, round(height * scale))
    return size, size


def model_box_to_image(
    box: tuple[float, float, float, float], width: int, height: int, prep: Preprocessing
) -> tuple[float, float, float, float]:
    """A box (x0, y0, x1, y1) on the model's ``size``×``size`` grid → the same box in the pixels of the
    ``width``×``height`` image it came from, undoing ``resize_pixels`` (its stretch or its centred cut)."""
    new_w, new_h = _scaled_size(width, height, prep.size, prep.resize)
    left, top = (new_w - prep.size) // 2, (new_h - prep.size) // 2
    sx, sy = width / new_w, height / new_h
    x0, y0, x1, y1 = box
    return (x0 + left) * sx, (y0 + top) * sy, (x1 + left) * sx, (y1 + top) * sy


def resize_to(pixels: np.ndarray, width: int, height: int, nearest: bool = False) -> np.ndarray:
    """[H, W, C] → [height, width, C] exactly (aspect not kept); bilinear in float, or nearest."""
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


def denormalise(chw: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """``normalise``'s inverse for people: float32 [C, H, W] in the model's normalisation → uint8
    [H, W] (one channel) or [H, W, 3], clipped to 0…255 (a reconstruction may overshoot)."""
    channels = chw.shape[0]
    std = np.broadcast_to(np.asarray(prep.std, np.float32), (channels,)).reshape(-1, 1, 1)
    mean = np.broadcast_to(np.asarray(prep.mean, np.float32), (channels,)).reshape(-1, 1, 1)
    pixels = np.clip(np.rint((chw * std + mean) * 255.0), 0, 255).astype(np.uint8)
    return pixels[0] if channels == 1 else np.transpose(pixels, (1, 2, 0))


# ----------------------------------------------------------------------------------------- whole chain


def prepare_pixels(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Decoded pixels [H, W, C] (or [H, W]) on 0…255 → model input float32 [C, size, size]."""
    pixels = _with_channels(np.asarray(pixels, dtype=np.float32))
    sized = resize_pixels(to_channels(pixels, prep.channels), prep.size, prep.resize)
    return normalise(sized, prep.mean, prep.std)


def preprocess(source: Source, prep: Preprocessing, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes or a path → model input float32 [C, size, size], as the service computes it."""
    return prepare_pixels(decode_for_model(source, prep, max_pixels=max_pixels), prep)


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
    return rgb_uint8(sized)


def rgb_uint8(pixels: np.ndarray) -> np.ndarray:
    """Pixels [H, W, 1|3] on 0…255 → uint8 RGB [H, W, 3], as they are drawn."""
    return np.clip(np.rint(to_channels(pixels, 3)), 0, 255).astype(np.uint8)
