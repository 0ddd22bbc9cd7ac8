"""Uploads built to cost Pillow far more than their declared size: refused before Pillow reads them.

The declared pixel count (``mnemo.imaging``) bounds what a decoder allocates, not what some of Pillow's
readers spend: they loop in Python over a file's structure (JPEG header segments, GIF blocks, TIFF strips
and tag values, run-length BMP pixels), and libjpeg and libtiff do work a small file can multiply (a pass
over the image per JPEG scan, in a JPEG or in each JPEG strip of a TIFF; a whole tile inflated per TIFF
tile). Each check walks no further than its limit; the limits sit far above what cameras and common writers
produce (docs/security.md).
"""

from __future__ import annotations

import itertools
import re
import struct
from typing import NamedTuple

# A JPEG scan is one pass over every block of the image, however few bytes it takes: a progressive encoder
# writes about 10 (libjpeg's script), but a file may repeat one thousands of times (1000 empty scans of a
# 16-megapixel frame: 94 KB that took 9.4 s to decode). Counted, then refused, before Pillow decodes.
JPEG_MAX_SCANS = 100
JPEG_SCAN_PIXELS = 32 * 40_000_000  # and scans × pixels: a 40 MP frame may have 32 scans (89 of one: 2.7 s)
# Pillow reads a JPEG's header (its marker segments, and the fill bytes allowed before each, up to the first
# scan) in Python, one at a time: a million empty comments (4 MB) took 1 s, 4 MB of fill bytes as long.
# Cameras write a few dozen segments; a header of more than this many is refused before Pillow reads it.
JPEG_MAX_MARKERS = 4096
JPEG_MAX_SKIPPED = 1 << 20  # bytes between its segments, which Pillow skips one at a time (20 MiB: 1 s)
# Segments Pillow parses in Python before the first scan, by their total bytes: quantisation tables (re-sliced
# after each: 318 segments of 1008 tables, 1 s), Exif (joined, then parsed: 2.6 million resolutions, 7 s;
# the standard fits it in one 64 KB segment) and Photoshop resources (1.7 million, 0.8 s). One frame header.
JPEG_SEGMENT_BUDGETS = {0xDB: 64 << 10, 0xE1: 256 << 10, 0xED: 1 << 20}  # DQT, APP1 (Exif), APP13
# Pillow also reads a GIF's blocks before its first image in Python, one sub-block (or stray byte) at a time,
# and decodes a run-length BMP in Python, pixel by pixel (an 8000 × 5000 RLE8 of 20 KB: 4 s). A GIF of more
# blocks than this before its image, or a run-length BMP of more pixels or bytes than this, is refused.
GIF_MAX_BLOCKS = 65536  # 16 MB of comment in full sub-blocks; 65 536 one-byte ones cost Pillow 15 ms
BMP_MAX_RLE_PIXELS, BMP_MAX_RLE_BYTES = 4_000_000, 4 << 20
# Pillow lists a TIFF's strips (or tiles) at open and reads them one by one in Python (2 million one-byte
# strips, 17 MB: 7 s and 650 MB), turns each numeric tag value into a Python object (2.6 million
# resolutions: 6 s), and libtiff inflates whole tiles however small the image (16384² tiles sharing one
# compressed block: 0.24 s each). Refused: more tags, strips or tiles, or values of a tag, than a writer sets,
# and tiles covering more than ``TIFF_MAX_TILE_FACTOR`` × the image (plus ``TIFF_TILE_SLACK`` pixels).
TIFF_MAX_STRIPS, TIFF_MAX_TAGS, TIFF_MAX_VALUES, TIFF_MAX_RATIONALS = 65536, 4096, 262144, 4096
TIFF_MAX_TILE_FACTOR, TIFF_TILE_SLACK = 4, 16_000_000
# Arithmetic-coded scans cost libjpeg about 3.5 times a Huffman-coded one's per pixel, in a few bytes each
# (76 refinement scans of a 4096² frame: 1 KB, 3.2 s): each weighs this many scans in the budget.
JPEG_ARITHMETIC_WEIGHT = 4
# libtiff decodes a strip as often as it is listed, however many strips share its bytes (16 000 strips of
# one 200 KB stream: 6.4 s from 328 KB): strips may read at most this many times the file's bytes in all.
TIFF_MAX_READ_FACTOR = 2
# A JPEG-compressed TIFF's strips (or tiles) are each a JPEG stream that libtiff decodes scan by scan, up to
# 100 scans each: 100 strips sharing one 3 KB stream of 96 scans made a 36 MP image that took 3.7 s. Their
# scans are counted as a JPEG's are, strip by strip, against the same scans × pixels budget (a strip's
# pixels rounded up to whole 16-pixel blocks, as libjpeg decodes them: 65 000 one-row strips cost 16-row
# ones), and a strip's frame may not be larger than the strip (libtiff decodes a taller one whole).
_TIFF_JPEG = (6, 7)  # Compression: old-style JPEG, JPEG
_JPEG_BLOCK = 16  # the largest block libjpeg decodes at once (an MCU of 2 × 2 subsampled 8 × 8 blocks)

# A marker: 0xFF then neither 0x00 (a stuffed data byte), a restart marker (0xD0–0xD7) nor 0xFF (a fill byte).
_JPEG_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
_TIFF_SIGNATURES = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF, either byte order
# libtiff takes strip and tile tags alike: StripOffsets or TileOffsets, StripByteCounts or TileByteCounts.
_TIFF_OFFSET_TAGS, _TIFF_COUNT_TAGS = (273, 324), (279, 325)
_TIFF_SIZE_TAGS = (256, 257, 322, 323)  # ImageWidth, ImageLength, TileWidth, TileLength
_TIFF_COMPRESSION, _TIFF_ROWS_PER_STRIP, _TIFF_JPEG_STREAM = 259, 278, (513, 514)  # old-style JPEG's stream
_TIFF_READ_TAGS = frozenset(
    {*_TIFF_OFFSET_TAGS, *_TIFF_COUNT_TAGS, *_TIFF_SIZE_TAGS, *_TIFF_JPEG_STREAM, 259, 278}
)
# The integer types by TIFF code: BYTE, SHORT, LONG, SBYTE, SSHORT, SLONG, LONG8, SLONG8.
_TIFF_INTEGERS = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 16: "Q", 17: "q"}
# Bytes a value of each TIFF type takes (unknown types: 1): libtiff copies every tag's values and keeps them
# while the file is open, however many tags share their bytes (4000 tags sharing one 250 KB run: 1.2 GB).
_TIFF_TYPE_BYTES = {3: 2, 8: 2, 4: 4, 9: 4, 11: 4, 13: 4, 5: 8, 10: 8, 12: 8, 16: 8, 17: 8, 18: 8}
_BMP_RLE = (b"\x01\0\0\0", b"\x02\0\0\0")  # BI_RLE8, BI_RLE4
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0–15 (not DHT, JPG, DAC)
_JPEG_ARITHMETIC = frozenset(m for m in _JPEG_FRAME_MARKERS if m >= 0xC9)  # SOF9–11, SOF13–15
# A JPEG frame header: SOFn, its length for 1–10 components (libjpeg's most), a precision of 1–16 bits;
# then height and width.
_JPEG_SOF = re.compile(
    rb"\xff(["
    + re.escape(bytes(sorted(_JPEG_FRAME_MARKERS)))
    + rb"])\x00["
    + bytes(8 + 3 * components for components in range(1, 11))
    + rb"][\x01-\x10]"
)
# The frame headers' count, the frame's pixels and its scans' weight in ``_spend_jpeg_budget``.
_JPEG_FRAME, _JPEG_PIXELS, _JPEG_WEIGHT = -1, -2, -3
# Markers without a length: TEM, RSTn, SOI, EOI (and a stuffed 0x00).
_JPEG_STANDALONE = frozenset({0x00, 0x01, *range(0xD0, 0xDA)})


class Refused(Exception):
    """(reason, message) as ``mnemo.imaging.ImageDecodeError`` takes them."""


def refusal(data: bytes) -> tuple[str, str] | None:
    """Why ``data`` (a JPEG, GIF, BMP or TIFF by its first bytes) is refused, or None."""
    check = next((c for prefixes, c in _CHECKS if data.startswith(prefixes)), None)
    try:
        if check is not None:
            check(data)
    except Refused as refused:
        return refused.args[0], refused.args[1]
    return None


def _check_gif(data: bytes) -> None:
    """Refuse a GIF of more than ``GIF_MAX_BLOCKS`` extension sub-blocks and stray bytes before its first
    image, walking no further than that (the image's own data Pillow reads in C)."""
    flags = data[10] if len(data) > 10 else 0
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    steps = 0
    while pos < len(data) and data[pos] not in b",;":  # an image descriptor or the trailer
        steps += 1
        if data[pos] == 0x21:  # an extension: its label, then sub-blocks up to an empty one
            pos += 2
            while pos < len(data) and data[pos] and steps <= GIF_MAX_BLOCKS:
                pos += 1 + data[pos]
                steps += 1
        pos += 1
        if steps > GIF_MAX_BLOCKS:
            raise Refused(
                "too_large",
                f"GIF holds more than {GIF_MAX_BLOCKS:,} blocks before its image; encoders write a few",
            )


def _check_bmp(data: bytes) -> None:
    """Refuse a run-length BMP (RLE8, RLE4) of more than ``BMP_MAX_RLE_PIXELS`` or ``BMP_MAX_RLE_BYTES``
    (an OS/2 1.x header, of 12 bytes, has no compression field)."""
    if len(data) < 34 or int.from_bytes(data[14:18], "little") < 40 or data[30:34] not in _BMP_RLE:
        return
    width, height = (abs(int.from_bytes(data[i : i + 4], "little", signed=True)) for i in (18, 22))
    if width * height > BMP_MAX_RLE_PIXELS or len(data) > BMP_MAX_RLE_BYTES:
        raise Refused(
            "too_large",
            f"run-length BMP of {width}×{height} pixels, {len(data):,} bytes: Pillow decodes those in "
            f"Python, up to {BMP_MAX_RLE_PIXELS:,} pixels and {BMP_MAX_RLE_BYTES:,} bytes are accepted",
        )


class _TiffDirectory(NamedTuple):
    """A TIFF's first directory as libtiff reads it: the tags ``_TIFF_READ_TAGS`` names, by (type, count,
    value field), their values read only when asked for."""

    data: bytes
    order: str
    fields: dict[int, tuple[int, int, bytes]]

    def first(self, tag: int, default: int = 0) -> int:
        """A tag's first value (its only one for the size tags), ``default`` when it is absent."""
        return self.values(self.fields[tag], 1)[0] if tag in self.fields else default

    def either(self, tags: tuple[int, int]) -> tuple[int, ...]:
        """The values of whichever of two tags libtiff takes alike is present (refused when both are)."""
        present = [self.fields[t] for t in tags if t in self.fields]
        if len(present) > 1:
            raise Refused("not_an_image", f"TIFF directory holds both tags {tags[0]} and {tags[1]}")
        return self.values(present[0], present[0][1]) if present else ()

    def values(self, field: tuple[int, int, bytes], wanted: int) -> tuple[int, ...]:
        """The first ``wanted`` values of an integer tag (libtiff takes signed sizes too), from the entry's
        value field or where that field points; refused when they are no integers or lie past the end."""
        kind, count, value = field
        if kind not in _TIFF_INTEGERS or count < 1:
            raise Refused("truncated", f"TIFF tag of type {kind} × {count}: not an integer")
        item = struct.calcsize(_TIFF_INTEGERS[kind])
        if item * count > len(value):  # the values live elsewhere: the field holds their offset
            at = int.from_bytes(value, "little" if self.order == "<" else "big")
            value = self.data[at : at + item * wanted]
            if len(value) < item * wanted:
                raise Refused("truncated", "TIFF tag points past the file's end")
        return struct.unpack_from(f"{self.order}{wanted}{_TIFF_INTEGERS[kind]}", value)


def _check_tiff(data: bytes) -> None:
    """Refuse a TIFF (or BigTIFF) whose first directory Pillow would read at length: more than
    ``TIFF_MAX_TAGS`` tags, ``TIFF_MAX_STRIPS`` strips or tiles, ``TIFF_MAX_VALUES`` numbers
    (``TIFF_MAX_RATIONALS`` fractions) in a tag, tiles covering far more than the image, JPEG strips costing
    more than a JPEG may, compressed strips sharing bytes past ``TIFF_MAX_READ_FACTOR`` times the file, tags
    whose values take more bytes than the file holds (they share them), a tag this check reads given twice
    (libtiff keeps the first copy, a reader may keep the last: refused, so there is no doubt which one the
    check saw), or cut short."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\0", b"\0+")
    offset_format, count_format, entry_format = ("Q", "Q", "HHQ8s") if big else ("I", "H", "HHI4s")
    try:
        offset = struct.unpack_from(order + offset_format, data, 8 if big else 4)[0]
        tags = struct.unpack_from(order + count_format, data, offset)[0] if offset < len(data) else 0
    except struct.error:
        return  # a header cut short: Pillow says so
    if tags > TIFF_MAX_TAGS:
        raise Refused("too_large", f"TIFF directory of {tags:,} tags; writers set a few dozen")
    entry = struct.Struct(order + entry_format)
    first = offset + struct.calcsize(order + count_format)
    table = data[first : first + tags * entry.size]
    if len(table) < tags * entry.size:
        raise Refused("truncated", "TIFF directory is cut short")
    fields: dict[int, tuple[int, int, bytes]] = {}
    values = 0  # bytes of values kept outside the entries
    for tag, kind, count, value in entry.iter_unpack(table):
        limit = _tiff_value_limit(tag, kind)
        if limit is not None and count > limit:
            raise Refused(
                "too_large",
                f"TIFF tag {tag} holds {count:,} values, each read in Python; the limit is {limit:,}",
            )
        if tag in fields:
            raise Refused(
                "not_an_image", f"TIFF directory holds tag {tag} twice; readers differ on which counts"
            )
        if tag in _TIFF_READ_TAGS:
            fields[tag] = kind, count, value
        size = count * _TIFF_TYPE_BYTES.get(kind, 1)
        values += size if size > len(value) else 0
    if values > len(data):
        raise Refused(
            "too_large",
            f"TIFF tags hold {values:,} bytes of values in a file of {len(data):,}: they share bytes, and "
            "libtiff keeps a copy of each",
        )
    directory = _TiffDirectory(data, order, fields)
    _check_tiff_tiles(*(directory.first(t) for t in _TIFF_SIZE_TAGS))
    compression = directory.first(_TIFF_COMPRESSION, 1)
    if compression == 1:
        return  # uncompressed strips cost what their pixels do, however they share bytes
    strips = _tiff_strips(directory)
    read = sum(count for _, count, _ in strips)
    if read > TIFF_MAX_READ_FACTOR * len(data):
        raise Refused(
            "too_large",
            f"TIFF's strips read {read:,} bytes from a file of {len(data):,}: they share bytes, and each is "
            "decoded as often as it is listed",
        )
    if compression in _TIFF_JPEG:
        _check_tiff_jpeg(data, strips)


def _tiff_value_limit(tag: int, kind: int) -> int | None:
    if tag in _TIFF_OFFSET_TAGS or tag in _TIFF_COUNT_TAGS:
        return TIFF_MAX_STRIPS
    if kind in (5, 10):  # RATIONAL, SRATIONAL: a Python object each
        return TIFF_MAX_RATIONALS
    return None if kind in (1, 2, 6, 7) else TIFF_MAX_VALUES  # bytes and text are sliced, not looped


def _check_tiff_tiles(width: int, height: int, tile_width: int, tile_height: int) -> None:
    """libtiff inflates a whole tile whatever part of it the image uses."""
    if min(width, height, tile_width, tile_height) <= 0:
        return  # untiled, or sizes Pillow refuses itself
    covered = -(-width // tile_width) * tile_width * -(-height // tile_height) * tile_height
    if covered > TIFF_MAX_TILE_FACTOR * width * height + TIFF_TILE_SLACK:
        raise Refused(
            "too_large",
            f"TIFF tiles of {tile_width}×{tile_height} cover {covered:,} pixels for a {width}×{height} image",
        )


def _tiff_strips(directory: _TiffDirectory) -> list[tuple[int, int, tuple[int, int]]]:
    """Each strip (or tile) as (offset, bytes, the strip's width and height), read as libtiff reads them:
    strip and tile tags alike, a missing or zero byte count running to the file's end (libtiff's estimate),
    strips outside the file or at its start (a sparse file's empty tiles) left out; and old-style JPEG's
    stream for the whole image (JPEGInterchangeFormat) as one more."""
    first, end = directory.first, len(directory.data)
    if 322 in directory.fields or 323 in directory.fields:  # tiled
        segment = first(322), first(323)
    else:
        width, height, rows = first(256), first(257), first(_TIFF_ROWS_PER_STRIP)
        segment = width, rows if 0 < rows < height else height  # none, zero or past the image: one strip
    offsets, counts = directory.either(_TIFF_OFFSET_TAGS), directory.either(_TIFF_COUNT_TAGS)
    strips = [(o, c, segment) for o, c in itertools.zip_longest(offsets, counts[: len(offsets)], fillvalue=0)]
    if all(t in directory.fields for t in _TIFF_JPEG_STREAM):
        strips.append((first(513), first(514), (first(256), first(257))))
    return [(o, c if 0 < c < end - o else end - o, size) for o, c, size in strips if 0 < o < end]


def _check_tiff_jpeg(data: bytes, strips: list[tuple[int, int, tuple[int, int]]]) -> None:
    """Refuse a JPEG-compressed TIFF whose strips' (or tiles') scans, each a pass over its strip's pixels
    (in whole blocks), cost more than a JPEG may (``JPEG_SCAN_PIXELS``), or whose strip holds a frame
    larger than the strip. Strips sharing bytes are walked once (and all of them read at most
    ``TIFF_MAX_READ_FACTOR`` times the file's bytes: ``_check_tiff``)."""
    scans = {strip: _jpeg_strip_scans(data, *strip) for strip in set(strips)}
    spent = sum(scans[strip] * _blocks(strip[2][0]) * _blocks(strip[2][1]) for strip in strips)
    if spent > JPEG_SCAN_PIXELS:
        raise Refused(
            "too_large",
            f"TIFF's JPEG strips hold {spent:,} scan-pixels (each scan a pass over its strip's pixels); "
            f"the limit is {JPEG_SCAN_PIXELS:,}",
        )


def _blocks(pixels: int) -> int:
    """``pixels`` rounded up to whole ``_JPEG_BLOCK``s, as libjpeg decodes them."""
    return -(-pixels // _JPEG_BLOCK) * _JPEG_BLOCK


def _jpeg_strip_scans(data: bytes, start: int, size: int, segment: tuple[int, int]) -> int:
    """The scans of the JPEG stream of ``size`` bytes at ``start`` (arithmetic-coded ones weighing
    ``JPEG_ARITHMETIC_WEIGHT``), refused when a frame header in it declares more than ``segment`` (width,
    height). Each FF DA pair counts as a scan, each run of bytes shaped like a frame header as a frame
    (neither occurs in entropy-coded data: a baseline strip holds one of each), so bytes that merely look
    like them only err towards refusing; counted in C."""
    end, weight = start + size, 1
    for number, frame in enumerate(_JPEG_SOF.finditer(data, start, end)):
        height, width = (
            struct.unpack_from(">HH", data, frame.end()) if frame.end() + 4 <= len(data) else (0, 0)
        )
        if number > 3 or width > segment[0] or height > segment[1]:
            raise Refused(
                "too_large",
                f"TIFF's JPEG strip of {segment[0]}×{segment[1]} holds a frame of {width}×{height} "
                "(or several frames); libtiff would decode it whole",
            )
        if frame[1][0] in _JPEG_ARITHMETIC:
            weight = JPEG_ARITHMETIC_WEIGHT
    return weight * data.count(b"\xff\xda", start, end)


def _check_jpeg(data: bytes) -> None:
    """Refuse a JPEG whose header Pillow would read at length (``_jpeg_first_scan``) or of more than
    ``JPEG_MAX_SCANS`` scans. From the first scan on, the walk goes marker by marker as libjpeg does:
    entropy-coded data is skipped in C (an 0xFF there is followed by 0x00 or a restart marker), segments
    between scans by their length, and it ends at the image's end (EOI), so what a file carries after its
    image (a camera's second picture, a phone's video) is not counted."""
    first = _jpeg_first_scan(data)
    if first is None:
        return  # no image data: Pillow says so
    pos, pixels, weight = first
    most = max(1, min(JPEG_MAX_SCANS, JPEG_SCAN_PIXELS // max(pixels * weight, 1)))
    coding = f", arithmetic-coded: each weighing {weight}" if weight > 1 else ""
    scans = others = 0
    while (found := _JPEG_MARKER.search(data, pos)) is not None:
        pos, marker = found.start(), data[found.start() + 1]
        if marker == 0xD9:  # EOI
            return
        if marker == 0xDA:
            scans += 1
        else:
            others += 1
        if scans > most or others > JPEG_MAX_MARKERS:
            raise Refused(
                "too_large",
                f"JPEG holds more than {most} scans (each a pass over its {pixels:,} pixels{coding}) or "
                f"{JPEG_MAX_MARKERS:,} segments between them; encoders write about 10 scans",
            )
        pos += 2 if marker in _JPEG_STANDALONE else 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")


def _jpeg_first_scan(data: bytes) -> tuple[int, int, int] | None:
    """The offset of a JPEG's first start-of-scan marker, its frame's pixels (from the frame header,
    SOFn; 0 when it has none) and its scans' weight (``JPEG_ARITHMETIC_WEIGHT`` if arithmetic-coded, else
    1), walking its header as Pillow will (segments by
    their length, fill bytes one by one, other bytes between segments skipped), and refusing it past
    ``JPEG_MAX_MARKERS`` markers and fill bytes, ``JPEG_MAX_SKIPPED`` other bytes, a second frame header
    or more bytes of a kind Pillow parses than ``JPEG_SEGMENT_BUDGETS`` allows."""
    pos, end, skipped = 2, len(data), 0
    spent = dict.fromkeys(JPEG_SEGMENT_BUDGETS, 0) | {_JPEG_FRAME: 0, _JPEG_PIXELS: 0, _JPEG_WEIGHT: 1}
    for _ in range(JPEG_MAX_MARKERS + 1):  # up to that many, then the first scan
        found = data.find(b"\xff", pos)
        if found < 0 or found + 4 > end:
            return None
        skipped += found - pos
        if skipped > JPEG_MAX_SKIPPED:
            raise Refused(
                "too_large", f"JPEG header holds more than {JPEG_MAX_SKIPPED:,} bytes outside its segments"
            )
        marker, pos = data[found + 1], found
        if marker == 0xDA:  # the first scan: libjpeg reads the rest
            return pos, spent[_JPEG_PIXELS], spent[_JPEG_WEIGHT]
        if marker == 0xFF:  # a fill byte
            pos += 1
        elif marker in _JPEG_STANDALONE:
            pos += 2
        else:
            length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            _spend_jpeg_budget(spent, marker, length, data[pos + 4 : pos + 9])
            pos += 2 + length
    raise Refused(
        "too_large",
        f"JPEG header holds more than {JPEG_MAX_MARKERS:,} markers before its image data; cameras write a "
        "few dozen",
    )


def _spend_jpeg_budget(spent: dict[int, int], marker: int, length: int, start: bytes) -> None:
    """Count a header segment (``start``: its first payload bytes) against its kind's budget
    (``JPEG_SEGMENT_BUDGETS``; APP1 only when it holds Exif); the frame header (SOFn) gives the image's
    pixels, and a second one is refused, Pillow would parse every one."""
    if marker in _JPEG_FRAME_MARKERS:
        spent[_JPEG_FRAME] += 1
        if spent[_JPEG_FRAME] > 1:
            raise Refused("too_large", "JPEG holds more than one frame header before its image data")
        if len(start) == 5:  # precision, then height and width
            spent[_JPEG_PIXELS] = int.from_bytes(start[1:3], "big") * int.from_bytes(start[3:5], "big")
        spent[_JPEG_WEIGHT] = JPEG_ARITHMETIC_WEIGHT if marker in _JPEG_ARITHMETIC else 1
    elif marker in spent and (marker != 0xE1 or start[:4] == b"Exif"):
        spent[marker] += length
        if spent[marker] > JPEG_SEGMENT_BUDGETS[marker]:
            raise Refused(
                "too_large",
                f"JPEG header holds more than {JPEG_SEGMENT_BUDGETS[marker]:,} bytes of 0xFF{marker:02X} "
                "segments, parsed in Python; cameras write far fewer",
            )


_CHECKS = (
    (b"\xff\xd8\xff", _check_jpeg),
    (b"GIF8", _check_gif),
    (b"BM", _check_bmp),
    (_TIFF_SIGNATURES, _check_tiff),
)
