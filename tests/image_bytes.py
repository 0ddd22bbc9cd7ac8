"""Image files as bytes for the tests: encode a Pillow image or a pixel array, or forge a PNG header.

Shared by the imaging and the service tests; torch-free, so the imaging tests stay light.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_bytes(array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    """Pixels [H, W] or [H, W, C] (a single channel is squeezed) as a file, converted to ``mode`` if given."""
    array = array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    return encode(image, fmt)


def png_declaring(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header declares width×height 8-bit gray: a decompression bomb's shape."""
    return png_of_zero_rows(width, height, rows=0, colour=0, tail=b"\0" * 64)


def png_of_zero_rows(
    width: int, height: int, rows: int | None = None, colour: int = 2, tail: bytes = b""
) -> bytes:
    """A PNG declaring width×height, 8 bits, colour type ``colour`` (0 gray, 2 RGB), whose one IDAT holds
    ``rows`` all-zero rows (default: all of them) and ``tail``, maximally compressed: 8000×5000 RGB with
    two rows is the 126-byte file of issue 13, with every row a complete 116 KB one."""
    row = 1 + width * (3 if colour == 2 else 1)  # a filter byte, then the pixels
    raw = b"\0" * (row * (height if rows is None else rows)) + tail
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    body = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw, 9)) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def png_of_first_rows(pixels: np.ndarray, rows: int) -> bytes:
    """An 8-bit RGB PNG declaring all of ``pixels`` [H, W, 3] whose data holds only its first ``rows`` rows,
    in a zlib stream that ends cleanly: the shape Pillow decodes without complaint, filling in zeros."""
    height, width = pixels.shape[:2]
    raw = b"".join(b"\0" + row.tobytes() for row in pixels[:rows].astype(np.uint8))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_empty_chunks(png: bytes, count: int, after_data: bool = False) -> bytes:
    """``png`` with ``count`` empty ancillary chunks after its header (or just before IEND)."""
    filler = png_chunk(b"abCd", b"") * count
    cut = len(png) - 12 if after_data else 8 + 25  # IEND is the last 12 bytes; IHDR ends at 33
    return png[:cut] + filler + png[cut:]


def progressive_jpeg(image: Image.Image, repeats: int = 0) -> bytes:
    """``image`` as a progressive JPEG, its smallest scan repeated ``repeats`` more times before EOI
    (each costs the decoder a pass over every block; a flat image's take a few bytes)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    starts = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xda"]
    scans = [data[a:b] for a, b in zip(starts, [*starts[1:], len(data) - 2], strict=True)]
    return data[:-2] + min(scans, key=len) * repeats + data[-2:]


def gif_with_comment(image: Image.Image, sub_blocks: int) -> bytes:
    """``image`` as a GIF whose first block is a comment of ``sub_blocks`` one-byte sub-blocks."""
    gif = encode(image, "GIF")
    flags = gif[10]
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    return gif[:at] + b"\x21\xfe" + b"\x01x" * sub_blocks + b"\x00" + gif[at:]


def rle8_bmp(width: int, height: int, runs: bool = True) -> bytes:
    """A gray run-length BMP (RLE8) of one-pixel runs (the most bytes per pixel Pillow decodes in Python),
    or with ``runs=False`` of end-of-line codes alone (the fewest bytes for its pixels)."""
    palette = b"".join(struct.pack("<BBBB", i, i, i, 0) for i in range(256))
    row = b"\x01\x07" * width if runs else b""
    pixels = (row + b"\x00\x00") * height + b"\x00\x01"  # runs, end of line; end of bitmap
    offset = 14 + 40 + len(palette)
    head = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return head + info + palette + pixels


def tiff_of_strips(height: int) -> bytes:
    """A 1-pixel-wide gray TIFF of ``height`` one-byte strips (one row each), little-endian."""
    entries = [(256, 4, [1]), (257, 4, [height]), (258, 3, [8]), (259, 3, [1]), (262, 3, [1]),
               (273, 4, lambda at: list(range(at, at + height))), (277, 3, [1]), (278, 4, [1]),
               (279, 4, [1] * height), (284, 3, [1])]  # fmt: skip
    return tiff_of_entries(entries, bytes(height))


def tiff_of_entries(entries: list[tuple[int, int, Any]], payload: bytes) -> bytes:
    """A little-endian TIFF of one directory: ``entries`` (tag, type 3 SHORT / 4 LONG / 1 BYTE, values) in
    the order given (repeats kept), values inline when they fit in the entry, else after the directory;
    values of None are the payload's offset, or a function of it gives them (the payload comes last)."""
    kinds = {1: "B", 3: "H", 4: "I"}
    first = 8 + 2 + 12 * len(entries) + 4  # where out-of-line values start
    spill = sum(4 * len(v(0) if callable(v) else v or [0]) for _, _, v in entries)  # the payload goes after
    payload_at, table, extra = first + spill, b"", b""
    for tag, kind, given in entries:
        values = (
            given(payload_at)
            if callable(given)
            else [payload_at if v is None else v for v in given or [None]]
        )
        raw = struct.pack(f"<{len(values)}{kinds[kind]}", *values)
        field = raw.ljust(4, b"\0") if len(raw) <= 4 else struct.pack("<I", first + len(extra))
        extra += b"" if len(raw) <= 4 else raw
        table += struct.pack("<HHI", tag, kind, len(values)) + field
    head = b"II*\0" + struct.pack("<IH", 8, len(entries)) + table + bytes(4) + extra
    return head.ljust(payload_at, b"\0") + payload


def tiled_tiff(
    width: int,
    height: int,
    tile: int,
    block: bytes,
    *,
    order: str = "<",
    compression: int = 1,
    tile_kind: int = 3,
    shared: bool = True,
) -> bytes:
    """A gray TIFF of ``tile``² tiles, every one stored as ``block`` (one copy, all offsets pointing at it,
    or with ``shared=False`` a copy each; ``compression``: TIFF's code, 8 deflate, 7 JPEG), in either byte
    order; sizes as SHORTs (left-justified in big-endian entries; the tile's as SLONGs with
    ``tile_kind=9``), offsets as LONGs."""
    tiles = -(-width // tile) * -(-height // tile)
    entry = struct.Struct(order + "HHII")

    def short(value: int) -> int:  # a SHORT sits in the entry's first two bytes
        return value << 16 if order == ">" else value

    tile_size = short(tile) if tile_kind == 3 else tile
    directory_size = 2 + 13 * entry.size + 4
    offsets = 8 + directory_size
    counts = offsets + 4 * tiles
    data = counts + 4 * tiles
    stored = block if shared else block * tiles
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, short(8)),
            (259, 3, 1, short(compression)), (262, 3, 1, short(1)), (277, 3, 1, short(1)),
            (284, 3, 1, short(1)), (322, tile_kind, 1, tile_size), (323, tile_kind, 1, tile_size),
            (324, 4, tiles, offsets), (325, 4, tiles, counts), (339, 3, 1, short(1)),
            (282, 5, 1, data + len(stored))]  # fmt: skip
    directory = struct.pack(order + "H", len(tags)) + b"".join(entry.pack(*t) for t in tags)
    starts = [data if shared else data + i * len(block) for i in range(tiles)]
    arrays = struct.pack(f"{order}{tiles}I", *starts) + struct.pack(f"{order}{tiles}I", *[len(block)] * tiles)
    resolution = struct.pack(order + "II", 72, 1)
    header = (b"II*\0" if order == "<" else b"MM\0*") + struct.pack(order + "I", 8)
    return header + directory + struct.pack(order + "I", 0) + arrays + stored + resolution


def ico_wrapping(png: bytes) -> bytes:
    """An ICO whose directory declares 256×256 and whose one entry is ``png``, of whatever size it is."""
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def missing_pixel_data(pixels: np.ndarray) -> dict[str, bytes]:
    """Files whose pixel data is missing, one per format, by name: PNGs with rows short (the issue-13
    shape: a 40 MP header over 20 rows; a flat picture and a photo one row short), and the others cut
    part-way through the data."""
    image = Image.fromarray(pixels)
    cut = {"JPEG": 0.3, "GIF": 0.5, "TIFF": 0.5, "BMP": 0.5, "WEBP": 0.3}
    files = {
        "png-20-of-5000-rows": png_of_zero_rows(8000, 5000, rows=20, colour=0),
        "png-one-row-short": png_of_zero_rows(300, 200, rows=199),
        "png-photo-one-row-short": png_of_first_rows(
            np.random.default_rng(0).integers(0, 256, (40, 30, 3)), 39
        ),
    }
    for fmt, share in cut.items():
        data = encode(image, fmt)
        files[fmt.lower()] = data[: int(len(data) * share)]
    return files
