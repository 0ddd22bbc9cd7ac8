"""mnemo.imaging: decoding every mode, safety limits, resize policies, normalisation, display crops."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from mnemo import costly_formats, imaging
from mnemo.imaging import ImageDecodeError, Preprocessing
from tests.image_bytes import (
    encode,
    gif_with_comment,
    ico_wrapping,
    missing_pixel_data,
    png_chunk,
    png_declaring,
    png_of_first_rows,
    png_of_zero_rows,
    png_with_empty_chunks,
    progressive_jpeg,
    rle8_bmp,
    tiff_of_entries,
    tiff_of_strips,
    tiled_tiff,
)


def test_module_does_not_import_torch():
    code = (
        "import sys, mnemo.imaging, mnemo.heatmaps, mnemo.calibration, mnemo.regions, mnemo.roi, "
        "mnemo.tiling, mnemo.service.recalibration; sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


RNG = np.random.default_rng(0)
GRAY = (RNG.random((6, 8)) * 255).astype(np.uint8)
RGB = (RNG.random((6, 8, 3)) * 255).astype(np.uint8)
PNG = encode(Image.fromarray(RGB))


@pytest.mark.parametrize(
    ("image", "channels", "expected_max"),
    [
        (Image.fromarray(GRAY), 1, GRAY.max()),
        (Image.fromarray(RGB), 3, RGB.max()),
        (Image.fromarray(RGB).convert("P"), 3, None),
        (Image.fromarray(RGB).convert("CMYK"), 3, None),
        (Image.fromarray(RGB).convert("YCbCr"), 3, None),
        (Image.fromarray(GRAY).convert("1"), 1, 255),
        (Image.fromarray(np.full((4, 4), 65535, np.uint16)), 1, 255),
        (Image.fromarray(np.full((4, 4), 4095, np.int32)), 1, 4095 * 255 / 65535),
        (Image.fromarray(np.full((4, 4), 0.5, np.float32)), 1, 127.5),
    ],
    ids=["L", "RGB", "P", "CMYK", "YCbCr", "1", "I;16", "I", "F"],
)
def test_every_mode_gives_channels_on_the_8bit_scale(image, channels, expected_max):
    pixels = imaging.image_to_pixels(image)
    assert pixels.dtype == np.float32
    assert pixels.shape == (image.height, image.width, channels)
    assert pixels.min() >= 0.0 and pixels.max() <= 255.0
    if expected_max is not None:
        assert pixels.max() == pytest.approx(expected_max, abs=1e-3)


def test_sixteen_bit_png_scales_by_bit_depth_not_clipping():
    arr = np.array([[0, 256, 32768, 65535]], np.uint16)
    pixels = imaging.decode_image(encode(Image.fromarray(arr)))
    assert pixels[0, :, 0] == pytest.approx(arr[0] * 255.0 / 65535.0, abs=1e-3)
    x = imaging.preprocess(encode(Image.fromarray(arr)), Preprocessing(channels=1, size=4))
    assert x[0, 0, -1] == pytest.approx(1.0, abs=1e-6)  # 65535 → 255 → 1.0 after /255
    assert x[0, 0, 1] < 0.01  # 256 in 16 bits is dark, not clipped to white


def test_alpha_is_composited_on_black():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[1, :, 3] = 0, 255, 51
    pixels = imaging.decode_image(encode(Image.fromarray(rgba, "RGBA")))
    assert pixels.shape == (2, 2, 3)
    assert pixels[0, 0] == pytest.approx([0, 0, 0])
    assert pixels[0, 1] == pytest.approx([200, 200, 200])
    assert pixels[1, 0] == pytest.approx([40, 40, 40])
    la = imaging.decode_image(encode(Image.fromarray(rgba, "RGBA").convert("LA")))
    assert la.shape == (2, 2, 1) and la[0, 0, 0] == 0 and la[0, 1, 0] == pytest.approx(200)


def test_channel_conversion_both_ways():
    rgb = imaging.decode_image(encode(Image.fromarray(RGB)))
    gray = imaging.to_channels(rgb, 1)
    expected = RGB @ np.array([0.299, 0.587, 0.114])
    assert gray[..., 0] == pytest.approx(expected, abs=1e-3)
    three = imaging.to_channels(gray, 3)
    assert three.shape == (6, 8, 3) and np.array_equal(three[..., 0], three[..., 2])


def test_bomb_is_refused_before_allocation_and_fast():
    start = time.perf_counter()
    for side in (30_000, 7_000):  # above Pillow's own guard, and above only ours
        with pytest.raises(ImageDecodeError) as err:
            imaging.decode_image(png_declaring(side, side))
        assert err.value.reason == "too_large"
    assert time.perf_counter() - start < 1.0
    small = encode(Image.fromarray(GRAY))  # 6×8 = 48 pixels
    assert imaging.decode_image(small, max_pixels=48).shape == (6, 8, 1)
    with pytest.raises(ImageDecodeError, match="limit is 47") as err:
        imaging.decode_image(small, max_pixels=47)
    assert err.value.reason == "too_large"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"definitely not an image, just text" * 3, "not_an_image"),
        (bytes(range(256)) * 4, "not_an_image"),
        (PNG[: len(PNG) // 2], "truncated"),
        (PNG[:20], "truncated"),
        (
            encode(Image.fromarray((RNG.random((64, 64, 3)) * 255).astype(np.uint8)), "JPEG")[:300],
            "truncated",
        ),
    ],
    ids=["zero-bytes", "text", "garbage", "png-cut-late", "png-cut-in-header", "jpeg-cut"],
)
def test_bad_bytes_raise_with_reason(data, reason):
    with pytest.raises(ImageDecodeError) as err:
        imaging.decode_image(data)
    assert err.value.reason == reason
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("fmt", imaging.ACCEPTED_FORMATS)
def test_every_accepted_format_decodes(fmt):
    assert imaging.decode_image(encode(Image.fromarray(GRAY).convert("RGB"), fmt)).shape[:2] == (6, 8)


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "TGA", "PCX", "SGI", "QOI-like"])
def test_formats_outside_the_accepted_ones_are_refused_unopened(fmt):
    """Pillow opens these too, but an ICO decodes its embedded PNG before its size can be checked and
    QOI or plain PPM decode in Python: none of them gets past the header."""
    if fmt == "ICO":
        data = ico_wrapping(png_of_zero_rows(4000, 4000, colour=2))  # 48 MB of RGB if it were decoded
    elif fmt == "QOI-like":
        data = b"qoif" + struct.pack(">II", 1000, 1000) + b"\x03\x00" + b"\x6a" * 100_000 + b"\0" * 7 + b"\1"
    else:
        data = encode(Image.fromarray(GRAY).convert("RGB"), fmt)
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="not an image in an accepted format") as err:
        imaging.decode_image(data)
    assert err.value.reason == "not_an_image" and time.perf_counter() - start < 0.05


@pytest.mark.parametrize("after_data", [False, True], ids=["before-IDAT", "before-IEND"])
def test_a_png_flooded_with_chunks_is_refused_before_pillow_walks_them(after_data):
    png = encode(Image.fromarray(GRAY))
    limit = imaging.PNG_MIN_CHUNKS
    assert imaging.decode_image(png_with_empty_chunks(png, limit - 3, after_data)).shape == (6, 8, 1)
    flood = png_with_empty_chunks(png, 1_000_000, after_data)  # 12 MB of empty chunks: seconds in Pillow
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="chunks") as err:
        imaging.decode_image(flood)
    assert err.value.reason == "too_large" and time.perf_counter() - start < 0.5


def test_a_jpeg_of_thousands_of_scans_is_refused_before_pillow_decodes_them():
    """1000 repeats of an empty scan of a 16-megapixel frame: 94 KB that took Pillow 9.4 s to decode; also
    behind a comment between scans that holds the end-of-image bytes (libjpeg skips it by its length)."""
    flat = Image.new("L", (4000, 4000), 128)
    normal = progressive_jpeg(Image.fromarray((RNG.random((64, 48, 3)) * 255).astype(np.uint8)))
    assert imaging.decode_image(normal).shape == (64, 48, 3)  # libjpeg's progressive script: 10 scans
    allowed = min(costly_formats.JPEG_MAX_SCANS, costly_formats.JPEG_SCAN_PIXELS // 4000**2)  # 80 at 16 MP
    assert imaging.decode_image(progressive_jpeg(flat, allowed - 7)).shape == (4000, 4000, 1)  # 6 + 73 scans
    flood = progressive_jpeg(flat, 1000)
    second_scan = flood.index(b"\xff\xda", flood.index(b"\xff\xda") + 2)
    hidden = flood[:second_scan] + b"\xff\xfe\x00\x04\xff\xd9" + flood[second_scan:]
    for data in (flood, hidden):
        start = time.perf_counter()
        with pytest.raises(ImageDecodeError, match="JPEG holds more than 80 scans") as err:
            imaging.decode_image(data)
        assert err.value.reason == "too_large" and time.perf_counter() - start < 0.05


def test_the_scans_a_jpeg_may_hold_shrink_as_its_frame_grows():
    """Each scan is a pass over every block: 89 scans of a 40 MP frame took 2.7 s against 0.34 s for 10."""
    small, large = Image.new("L", (1000, 1000), 128), Image.new("L", (8000, 5000), 128)
    assert imaging.decode_image(progressive_jpeg(small, 34)).shape == (1000, 1000, 1)  # 6 + 34 scans
    with pytest.raises(ImageDecodeError, match=r"more than 32 scans .* its 40,000,000 pixels"):
        imaging.decode_image(progressive_jpeg(large, 34))


@pytest.mark.parametrize("filler", [b"\xff\xfe\x00\x02", b"\xff"], ids=["empty-comments", "fill-bytes"])
def test_a_jpeg_header_flooded_with_markers_is_refused_before_pillow_reads_them(filler):
    """Pillow reads a JPEG's header in Python: a million empty comments (4 MB) took 1 s."""
    jpeg = encode(Image.fromarray(GRAY), "JPEG")
    at = 4 + int.from_bytes(jpeg[4:6], "big")  # after SOI and the APP0 segment
    assert imaging.decode_image(
        jpeg[:at] + filler * (costly_formats.JPEG_MAX_MARKERS - 16) + jpeg[at:]
    ).shape == (
        6,
        8,
        1,
    )
    flood = jpeg[:at] + filler * 1_000_000 + jpeg[at:]
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="JPEG header holds more than 4,096 markers") as err:
        imaging.decode_image(flood)
    assert err.value.reason == "too_large" and time.perf_counter() - start < 0.05


def test_junk_between_jpeg_segments_is_capped_and_bytes_beside_the_image_are_not_counted_as_scans():
    jpeg = encode(Image.fromarray(GRAY), "JPEG")
    at = 4 + int.from_bytes(jpeg[4:6], "big")
    assert imaging.decode_image(jpeg[:at] + bytes(1000) + jpeg[at:]).shape == (6, 8, 1)
    with pytest.raises(ImageDecodeError, match="bytes outside its segments") as err:
        imaging.decode_image(jpeg[:at] + bytes(costly_formats.JPEG_MAX_SKIPPED + 1) + jpeg[at:])
    assert err.value.reason == "too_large"
    # arbitrary bytes hold an FF DA pair every 64 KiB: a large ICC profile (in APP2 segments before the
    # image) and a trailer after its end (a phone's motion photo) are not scans
    noise = RNG.integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
    assert noise.count(b"\xff\xda") > costly_formats.JPEG_MAX_SCANS
    icc = b"".join(
        b"\xff\xe2" + (2 + 14 + 60000).to_bytes(2, "big") + b"ICC_PROFILE\0" + bytes([i + 1, 34])
        + noise[i * 60000 : (i + 1) * 60000]
        for i in range(34)
    )  # fmt: skip
    assert imaging.decode_image(jpeg[:at] + icc + jpeg[at:] + noise).shape == (6, 8, 1)


def test_gif_blocks_and_run_length_bmps_that_pillow_reads_in_python_are_capped():
    """2 million one-byte comment sub-blocks (4 MB) took Pillow 0.5 s, 8 MB of one-pixel BMP runs 1 s."""
    small = Image.fromarray(GRAY)
    assert imaging.decode_image(gif_with_comment(small, costly_formats.GIF_MAX_BLOCKS - 8)).shape == (6, 8, 3)
    assert imaging.decode_image(rle8_bmp(2000, 200)).shape == (200, 2000, 1)  # 0.8 MB of runs
    for flood in (gif_with_comment(small, 2_000_000), rle8_bmp(2000, 2000), rle8_bmp(8000, 5000, runs=False)):
        start = time.perf_counter()  # the last: 40 MP in 10 KB, seconds of Python
        with pytest.raises(
            ImageDecodeError, match=r"GIF holds more than 65,536 blocks|run-length BMP"
        ) as err:
            imaging.decode_image(flood)
        assert err.value.reason == "too_large" and time.perf_counter() - start < 0.05


def test_a_tiff_cut_into_millions_of_strips_is_refused_before_pillow_lists_them():
    """2 million one-byte strips (17 MB): Pillow took 3.4 s to open the file and as long to read it."""
    assert imaging.decode_image(tiff_of_strips(1000)).shape == (1000, 1, 1)
    pixels = (RNG.random((300, 200)) * 255).astype(np.uint8)
    for options in (
        {},
        {"compression": "tiff_lzw"},
        {"compression": "tiff_adobe_deflate"},
        {"big_tiff": True},
    ):
        written = io.BytesIO()
        Image.fromarray(pixels).save(written, "TIFF", **options)
        assert np.array_equal(imaging.decode_image(written.getvalue())[..., 0], pixels), options
    flood = tiff_of_strips(costly_formats.TIFF_MAX_STRIPS + 1)
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="TIFF tag 273 holds 65,537 values") as err:
        imaging.decode_image(flood)
    assert err.value.reason == "too_large" and time.perf_counter() - start < 0.05


@pytest.mark.parametrize("order", ["<", ">"], ids=["II", "MM"])
def test_tiff_directories_that_cost_more_than_their_image_are_refused(order):
    """libtiff inflates whole tiles (16384² tiles of a one-row image sharing one compressed block: 0.24 s
    each); Pillow makes a Python object of every value of a tag (2.6 million resolutions: 6 s) and keeps
    what it can read of a directory cut short."""
    tile = bytes(range(256)) * 256
    assert imaging.decode_image(tiled_tiff(512, 512, 256, tile, order=order))[1, :3, 0].tolist() == [0, 1, 2]
    inflating = zlib.compress(bytes(4096 * 4096), 9)
    for kind in (3, 9):  # tile sizes as SHORT, or as SLONG (libtiff takes signed types too)
        bomb = tiled_tiff(4 * 4096, 1, 4096, inflating, order=order, compression=8, tile_kind=kind)
        with pytest.raises(ImageDecodeError, match=r"TIFF tiles of 4096×4096 cover 67,108,864 pixels"):
            imaging.decode_image(bomb)
    legit = bytearray(tiled_tiff(512, 512, 256, tile, order=order))
    resolution = legit.index(struct.pack(order + "HHI", 282, 5, 1))
    legit[resolution + 4 : resolution + 8] = struct.pack(order + "I", costly_formats.TIFF_MAX_RATIONALS + 1)
    with pytest.raises(ImageDecodeError, match="TIFF tag 282 holds 4,097 values") as err:
        imaging.decode_image(bytes(legit))
    assert err.value.reason == "too_large"
    cut = tiled_tiff(512, 512, 256, tile, order=order)[: 8 + 2 + 5 * 12 + 7]  # five whole entries of 13
    with pytest.raises(ImageDecodeError, match="TIFF directory is cut short") as err:
        imaging.decode_image(cut)
    assert err.value.reason == "truncated"


def test_a_jpeg_compressed_tiff_pays_for_its_strips_scans_as_a_jpeg_does():
    """libtiff decodes each JPEG strip or tile scan by scan (up to 100 each): 100 strips sharing one 3 KB
    stream of 96 scans made a 36 MP image that took 3.7 s. Tiles of a progressive stream of 6 scans each
    decode; of 96 (16.8 MP × 96 scans) they are refused. Strips are decoded as often as they are listed
    (16 000 sharing one 200 KB stream: 6.4 s): sharing bytes past twice the file's length is refused."""

    def tiles(scans: int, shared: bool = False) -> bytes:
        block = progressive_jpeg(Image.new("L", (512, 512), 128), scans - 6)
        return tiled_tiff(4096, 4096, 512, block, compression=7, shared=shared)

    assert imaging.decode_image(tiles(6)).shape == (4096, 4096, 1)
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="TIFF's JPEG strips hold 1,610,612,736 scan-pixels") as err:
        imaging.decode_image(tiles(96))
    assert err.value.reason == "too_large" and time.perf_counter() - start < 0.05
    with pytest.raises(ImageDecodeError, match="bytes from a file of 1,996: they share bytes"):
        imaging.decode_image(tiles(6, shared=True))


def _jpeg_tiff(width: int, height: int, jpeg: bytes, *extra: tuple, count: int | None = -1) -> bytes:
    """A gray JPEG-compressed TIFF of one strip, ``jpeg``, of byte count ``count`` (-1: its length; None:
    no such tag), then the ``extra`` entries (tag, type, values)."""
    entries = [(256, 4, [width]), (257, 4, [height]), (258, 3, [8]), (259, 3, [7]), (262, 3, [1]),
               (273, 4, None), (277, 3, [1]), (278, 4, [height])]  # fmt: skip
    if count is not None:
        entries.append((279, 4, [len(jpeg) if count < 0 else count]))
    return tiff_of_entries([*entries, *extra], jpeg)


def test_a_jpeg_compressed_tiff_is_read_as_libtiff_reads_it():
    """A review's bypasses, each decoded by libtiff in 2-4 s from at most 260 KB: a strip byte count of zero
    or none (libtiff reads to the file's end), a strip holding a frame far taller than the image (libtiff
    decodes a last strip's frame whole: 8000x8000 behind an 8000x8 image), a tag given twice (libtiff keeps
    the first copy, the check kept the last), tiles listed under the strip tags (libtiff takes them alike)."""
    jpeg = progressive_jpeg(Image.new("L", (4000, 4000), 128), 90)  # 96 scans of 16 MP: over the budget
    block = progressive_jpeg(Image.new("L", (512, 512), 128), 90)
    tiles = tiled_tiff(4096, 4096, 512, block, compression=7, shared=False)
    offsets, counts = (struct.pack("<HH", tag, 4) for tag in (324, 325))
    strip_offsets, strip_counts = (struct.pack("<HH", tag, 4) for tag in (273, 279))
    cases = [
        ("hold 1,536,000,000 scan-pixels", _jpeg_tiff(4000, 4000, jpeg, count=0)),
        ("hold 1,536,000,000 scan-pixels", _jpeg_tiff(4000, 4000, jpeg, count=None)),
        ("frame of 4000×4000", _jpeg_tiff(4000, 8, encode(Image.new("L", (4000, 4000), 128), "JPEG"))),
        ("tag 259 twice", _jpeg_tiff(4000, 4000, jpeg, (259, 3, [8]))),
        ("hold 1,610,612,736", tiles.replace(offsets, strip_offsets).replace(counts, strip_counts)),
        ("both tags 273 and 324", tiles.replace(counts, strip_offsets)),
    ]
    for said, data in cases:
        with pytest.raises(ImageDecodeError, match=said):
            imaging.decode_image(data)
    small = _jpeg_tiff(64, 48, encode(Image.new("L", (64, 48), 9), "JPEG"))
    assert imaging.decode_image(small)[0, 0, 0] == 9


def test_what_libjpeg_spends_more_on_is_charged_more():
    """A second review's bypasses: arithmetic-coded scans cost about 3.5 times a Huffman one's (76 of a
    4096² frame in 1 KB: 3.2 s), thin strips are decoded in whole 16-row blocks (65 000 one-row strips:
    6.7 s), a frame of 5 components escaped the frame-header check (8000×16000 behind 8000×8: 1 GB)."""
    flat = Image.new("L", (4000, 4000), 128)
    progressive = progressive_jpeg(flat, 20)  # 26 scans of 16 MP: within 80 as Huffman, over 20 as arithmetic
    assert imaging.decode_image(progressive).shape == (4000, 4000, 1)
    arithmetic = progressive.replace(b"\xff\xc2", b"\xff\xca", 1)  # SOF10: progressive, arithmetic-coded
    with pytest.raises(ImageDecodeError, match=r"more than 20 scans .* arithmetic-coded") as err:
        imaging.decode_image(arithmetic)
    assert err.value.reason == "too_large"
    row = progressive_jpeg(Image.new("L", (8000, 1), 128), 90)  # 96 scans of one row, a copy per strip
    strips = 105  # 96 × 8000 × 16 rows × 105 = 1.29 billion scan-pixels; 81 million counted by rows
    entries = [(256, 4, [8000]), (257, 4, [strips]), (258, 3, [8]), (259, 3, [7]), (262, 3, [1]),
               (273, 4, lambda at: [at + i * len(row) for i in range(strips)]), (277, 3, [1]), (278, 4, [1]),
               (279, 4, [len(row)] * strips)]  # fmt: skip
    with pytest.raises(ImageDecodeError, match="hold 1,290,240,000 scan-pixels"):
        imaging.decode_image(tiff_of_entries(entries, row * strips))

    def segment(marker: int, payload: bytes) -> bytes:
        return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload

    components = b"".join(bytes([i, 0x11, 0]) for i in range(1, 6))
    five = b"\xff\xd8" + segment(0xC2, struct.pack(">BHHB", 8, 16000, 8000, 5) + components) + b"\xff\xd9"
    with pytest.raises(ImageDecodeError, match="frame of 8000×16000"):
        imaging.decode_image(_jpeg_tiff(8000, 8, five, (277, 3, [5])))


def test_tiff_tags_sharing_their_values_are_refused():
    """libtiff copies every tag's values and keeps them while the file is open, however many tags point at
    the same bytes: 4000 tags sharing one 250 KB run took 1.2 GB and 1.6 s from a 298 KB Deflate TIFF."""
    strip, run = zlib.compress(bytes(64 * 64)), bytes(100_000)

    def tiff(tags: int) -> bytes:
        entries = [(256, 3, [64]), (257, 3, [64]), (258, 3, [8]), (259, 3, [8]), (262, 3, [1]),
                   (273, 4, None), (277, 3, [1]), (278, 3, [64]), (279, 4, [len(strip)])]  # fmt: skip
        entries += [(40000 + i, 4, lambda at: [at + len(strip)]) for i in range(tags)]
        data = bytearray(tiff_of_entries(entries, strip + run))
        for i in range(tags):  # each an UNDEFINED run of bytes: the one after the strip
            struct.pack_into("<HI", data, data.index(struct.pack("<HHI", 40000 + i, 4, 1)) + 2, 7, len(run))
        return bytes(data)

    assert imaging.decode_image(tiff(1)).shape == (64, 64, 1)
    with pytest.raises(ImageDecodeError, match="TIFF tags hold 4,000,000 bytes of values") as err:
        imaging.decode_image(tiff(40))
    assert err.value.reason == "too_large"


def test_tiff_directories_of_huge_counts_or_offsets_cost_the_check_nothing():
    """A size tag of 20 million BYTE values took the check 1.5 s and 1 GB while it unpacked them all; a
    BigTIFF directory offset past 2**63 raised an OverflowError out of the check."""
    values = 20_000_000
    entries = [(256, 1, [7]), (257, 4, [8]), (259, 3, [7]), (273, 4, None), (279, 4, [1])]
    tiff = tiff_of_entries(entries, b"\x07" * values)
    blob = len(tiff) - values
    flood = tiff.replace(struct.pack("<HHIB3x", 256, 1, 1, 7), struct.pack("<HHII", 256, 1, values, blob))
    start = time.perf_counter()
    assert costly_formats.refusal(flood) is None  # a width of 7: Pillow says what it makes of the rest
    assert time.perf_counter() - start < 0.5
    far = b"II+\0" + struct.pack("<HHQ", 8, 0, 2**63)
    assert costly_formats.refusal(far) is None
    with pytest.raises(ImageDecodeError):
        imaging.decode_image(far)


def test_a_png_of_more_than_one_icc_profile_is_refused():
    """Pillow inflates every iCCP chunk (up to 1 MB) and keeps the last: 20 MB of 1 KB ones took 12 s."""
    profile = png_chunk(b"iCCP", b"p\0\0" + zlib.compress(bytes(1 << 20), 9))
    png = encode(Image.fromarray(GRAY))
    assert imaging.decode_image(png[:33] + profile + png[33:]).shape == (6, 8, 1)
    with pytest.raises(ImageDecodeError, match="more than one ICC profile") as err:
        imaging.decode_image(png[:33] + profile * 2 + png[33:])
    assert err.value.reason == "too_large"


def test_an_os2_bmp_is_not_read_as_a_run_length_one():
    """OS/2 1.x headers (12 bytes) have no compression field: bytes 30-33 are pixels there."""
    width, height = 1500, 1000
    pixels = bytearray(width * 3 * height)  # rows of 4500 bytes: no padding
    pixels[4:8] = b"\x01\0\0\0"  # at file offset 30, where a Windows header keeps its compression
    head = (
        b"BM"
        + struct.pack("<IHHI", 26 + len(pixels), 0, 0, 26)
        + struct.pack("<IHHHH", 12, width, height, 1, 24)
    )
    assert len(head + pixels) > costly_formats.BMP_MAX_RLE_BYTES
    assert imaging.decode_image(bytes(head + pixels)).shape == (height, width, 3)


def test_jpeg_headers_that_pillow_parses_at_length_are_refused():
    """A second frame header (Pillow appends a tuple per component triplet: 20 MB, 0.6 GB) and Exif split
    over many segments (joined, then parsed: 2.6 million resolutions, 7 s)."""
    jpeg = encode(Image.fromarray(GRAY), "JPEG")
    frame = jpeg.index(b"\xff\xc0")
    frame_header = jpeg[frame : frame + 2 + int.from_bytes(jpeg[frame + 2 : frame + 4], "big")]
    with pytest.raises(ImageDecodeError, match="more than one frame header"):
        imaging.decode_image(jpeg[:frame] + frame_header + jpeg[frame:])
    exif = b"\xff\xe1" + (2 + 6 + 60000).to_bytes(2, "big") + b"Exif\0\0" + bytes(60000)
    assert imaging.decode_image(jpeg[:2] + exif + jpeg[2:]).shape == (6, 8, 1)  # one full segment
    with pytest.raises(ImageDecodeError, match="bytes of 0xFFE1 segments") as err:
        imaging.decode_image(jpeg[:2] + exif * 5 + jpeg[2:])
    assert err.value.reason == "too_large"


def test_a_png_written_one_data_chunk_per_row_still_decodes():
    """Streaming encoders flush a data chunk per row: 5000 rows of 4 bytes are 5003 chunks in 70 KB."""
    pixels = (RNG.random((5000, 4)) * 255).astype(np.uint8)
    stream = zlib.compressobj(0)
    chunks = b"".join(
        png_chunk(b"IDAT", stream.compress(b"\0" + row.tobytes()) + stream.flush(zlib.Z_SYNC_FLUSH))
        for row in pixels
    ) + png_chunk(b"IDAT", stream.flush())
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 5000, 8, 0, 0, 0, 0))
    data = b"\x89PNG\r\n\x1a\n" + header + chunks + png_chunk(b"IEND", b"")
    assert data.count(b"IDAT") > imaging.PNG_MIN_CHUNKS and len(data) // imaging.PNG_BYTES_PER_CHUNK < 5000
    assert np.array_equal(imaging.decode_image(data)[..., 0], pixels.astype(np.float32))


def test_a_png_written_in_many_small_data_chunks_still_decodes():
    """libpng writes 8 KiB data chunks; 1.1 KiB ones, more than ``PNG_MIN_CHUNKS`` of them, still pass."""
    pixels = (RNG.random((2200, 2200)) * 255).astype(np.uint8)
    stream = zlib.compress(b"".join(b"\0" + row.tobytes() for row in pixels), 0)  # stored: 4.8 MB
    chunks = b"".join(png_chunk(b"IDAT", stream[i : i + 1100]) for i in range(0, len(stream), 1100))
    assert len(stream) // 1100 > imaging.PNG_MIN_CHUNKS
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 2200, 2200, 8, 0, 0, 0, 0))
    data = b"\x89PNG\r\n\x1a\n" + header + chunks + png_chunk(b"IEND", b"")
    assert np.array_equal(imaging.decode_image(data)[..., 0], pixels.astype(np.float32))


def test_path_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"nope")
    with pytest.raises(ImageDecodeError, match=r"broken\.png"):
        imaging.decode_image(bad)
    with pytest.raises(FileNotFoundError):
        imaging.decode_image(tmp_path / "missing.png")


def test_resize_policies_shapes_and_crop_content():
    pixels = np.zeros((40, 80, 1), np.float32)
    pixels[:, :15] = 255.0  # a white band at the left edge
    stretched = imaging.resize_pixels(pixels, 16, "resize")
    cropped = imaging.resize_pixels(pixels, 16, "center_crop")
    assert stretched.shape == cropped.shape == (16, 16, 1)
    assert stretched[:, 0].min() > 250  # stretching keeps the band at the left edge
    assert cropped.max() < 1  # the centred square never reaches the band
    with pytest.raises(ValueError, match="resize policy"):
        imaging.resize_pixels(pixels, 16, "squash")


def test_preprocess_normalises_per_channel_and_batches():
    prep = Preprocessing(channels=3, size=5, mean=(0.5, 0.0, 0.25), std=(0.5, 1.0, 0.25))
    white = encode(Image.new("RGB", (9, 7), (255, 255, 255)))
    x = imaging.preprocess(white, prep)
    assert x.shape == (3, 5, 5) and x.dtype == np.float32
    assert x[:, 0, 0] == pytest.approx([1.0, 1.0, 3.0])
    batch = imaging.preprocess_batch([white, encode(Image.new("L", (3, 3), 0))], prep)
    assert batch.shape == (2, 3, 5, 5)
    assert batch[1, :, 2, 2] == pytest.approx([-1.0, 0.0, -1.0])
    with pytest.raises(ImageDecodeError, match="image 1"):
        imaging.preprocess_batch([white, b""], prep)


def test_preprocessing_round_trip_and_validation():
    prep = Preprocessing(channels=3, size=64, mean=(0.5,), std=(0.5,), resize="center_crop")
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    with pytest.raises(ValueError, match="channels"):
        Preprocessing(channels=2)
    with pytest.raises(ValueError, match="std"):
        Preprocessing(std=(0.0,))
    with pytest.raises(ValueError, match="unknown"):
        Preprocessing.from_dict({"size": 8, "colour": "yes"})


def test_display_crop_is_the_models_view_in_8_bit_rgb():
    image = imaging.display_rgb(imaging.decode_image(encode(Image.fromarray(GRAY))), Preprocessing(size=16))
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert np.array_equal(image[..., 0], image[..., 2])  # gray replicated, as to_channels does


# ------------------------------------------------------- the request path: model-sized decoding (issue 13)


SMOOTH = np.clip(
    np.linspace(0, 255, 300)[None, :, None] / 2
    + np.linspace(0, 255, 200)[:, None, None] / 2
    + RNG.normal(0, 3, (200, 300, 3)),
    0,
    255,
).astype(np.uint8)


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(SMOOTH),
        Image.fromarray(SMOOTH[..., 0]),
        Image.fromarray(np.concatenate([SMOOTH, SMOOTH[..., :1]], axis=-1), "RGBA"),
        Image.fromarray(SMOOTH).convert("P"),
        Image.fromarray(SMOOTH[..., 0].astype(np.uint16) * 257),
        Image.fromarray((SMOOTH[..., 0] / 255).astype(np.float32)),
    ],
    ids=["RGB", "L", "RGBA", "P", "I;16", "F"],
)
@pytest.mark.parametrize(
    "prep",
    [Preprocessing(1, 28), Preprocessing(3, 64, resize="center_crop"), Preprocessing(3, 150)],
    ids=["gray-28", "rgb-64-crop", "rgb-150"],
)
def test_model_sized_decoding_matches_the_full_size_float_path(image, prep):
    data = encode(image, "TIFF" if image.mode == "F" else "PNG")
    full = imaging.prepare_pixels(imaging.decode_image(data), prep)
    sized = imaging.preprocess(data, prep)
    assert sized.shape == full.shape == (prep.channels, prep.size, prep.size)
    if 200 / prep.size < 2 * imaging.REDUCING_GAP:  # not reduced: training's pixels exactly
        assert np.array_equal(sized, full)
    else:  # box-averaged in 8 bits first: within a few levels
        assert np.abs(sized - full).max() * 255 * max(prep.std) < 2.5


def test_model_sized_decoding_never_holds_the_image_as_floats():
    import tracemalloc

    data = png_of_zero_rows(4000, 2500)  # 10 MP RGB: 120 MB as float32, 30 MB as Pillow's 8 bits
    tracemalloc.start()  # numpy's allocations are traced; Pillow's own buffers are not
    try:
        x = imaging.preprocess(data, Preprocessing(3, 64))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert x.shape == (3, 64, 64) and peak < 8_000_000


def test_large_images_are_reduced_before_they_become_floats():
    big = encode(Image.fromarray(np.repeat(np.repeat(SMOOTH, 8, axis=0), 8, axis=1)), "JPEG")  # 2400×1600
    prep = Preprocessing(3, 64)
    with imaging.open_image(big) as opened:
        x = imaging.decode_for_model(opened, prep)
        assert opened.image.size == (300, 200)  # decoded at 1/8 scale: still ≥ 3 × 64 on the short side
    assert x.shape == (200, 300, 3)
    reference = imaging.prepare_pixels(imaging.decode_image(big), prep)
    assert np.abs(imaging.prepare_pixels(x, prep) - reference).mean() * 255 < 2.0
    png = encode(Image.fromarray(np.repeat(np.repeat(SMOOTH, 8, axis=0), 8, axis=1)))
    assert imaging.decode_for_model(png, prep).shape == (200, 300, 3)  # box-averaged 8 × 8 in Pillow


@pytest.mark.parametrize(
    ("data", "missing"),
    [
        (png_of_zero_rows(8000, 5000, rows=2), True),  # issue 13: 126 bytes declaring 40 MP
        (png_of_zero_rows(300, 200, rows=20, colour=0), True),
        (png_of_zero_rows(300, 200, colour=0), False),
        (encode(Image.fromarray(SMOOTH)), False),
        (encode(Image.fromarray(SMOOTH).convert("1")), False),
        (encode(Image.fromarray(SMOOTH).convert("P")), False),
        (encode(Image.fromarray(SMOOTH[..., 0].astype(np.uint16) * 257)), False),
    ],
    ids=["issue-126-bytes", "20-of-200-rows", "all-rows", "rgb", "bilevel", "palette", "16-bit"],
)
def test_png_rows_are_counted_before_decoding(data, missing):
    assert imaging.png_rows_missing(data) is missing


def test_a_photo_png_is_counted_only_when_its_last_row_comes_out_blank(monkeypatch):
    """Counting rows is a second inflate of the file; a photo's is skipped when Pillow filled its last row."""
    photo = (RNG.random((48, 64, 3)) * 255).astype(np.uint8)
    counted, count = [], imaging.png_rows_missing
    monkeypatch.setattr(imaging, "png_rows_missing", lambda data: counted.append(len(data)) or count(data))
    assert np.array_equal(imaging.decode_image(encode(Image.fromarray(photo))), photo)
    assert counted == []
    dark = photo.copy()
    dark[-1] = 0  # a black last row: it may be Pillow's fill, so the rows are counted, and all there
    assert np.array_equal(imaging.decode_image(encode(Image.fromarray(dark))), dark)
    assert len(counted) == 1
    short = png_of_first_rows(photo, rows=47)  # one row short, its stream ending cleanly
    with pytest.raises(ImageDecodeError, match="last row"):
        imaging.decode_image(short)
    assert len(counted) == 2


def _apng_default_frame(width: int, height: int, frame_rows: int, padding: int) -> bytes:
    """An image whose frame control, ahead of its data, cuts the default image to its last
    ``frame_rows`` rows (Pillow then decodes only those), padded so it is not bomb-shaped."""
    frame = struct.pack(">IIIIIHHBB", 0, width, frame_rows, 0, height - frame_rows, 1, 10, 0, 0)
    rows = RNG.integers(1, 256, (frame_rows, width, 3)).astype(np.uint8)
    data = zlib.compress(b"".join(b"\0" + row.tobytes() for row in rows))
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    body = png_chunk(b"fcTL", frame) + png_chunk(b"IDAT", data) + png_chunk(b"tEXt", bytes(padding + 2))
    return b"\x89PNG\r\n\x1a\n" + header + body + png_chunk(b"IEND", b"")


def _png_ending_in_a_ddat_chunk() -> bytes:
    """40 rows whose stream, as Pillow reads it (IDAT, DDAT, IDAT: one run of image data chunks), ends
    cleanly one row short in the DDAT chunk, while the IDAT chunks alone hold a complete stream."""
    rows = [b"\0" + row.tobytes() for row in RNG.integers(1, 256, (40, 30, 3)).astype(np.uint8)]
    first = b"".join(rows[:-1])

    def stored(data: bytes, final: bool) -> bytes:  # one uncompressed deflate block
        return bytes([final]) + struct.pack("<HH", len(data), len(data) ^ 0xFFFF) + data

    def adler(data: bytes) -> bytes:
        return struct.pack(">I", zlib.adler32(data))

    chunks = [
        (b"IDAT", b"\x78\x01" + stored(first[:-1], False)),
        (b"DDAT", stored(first[-1:], True) + adler(first)),
        (b"IDAT", stored(first[-1:] + rows[-1], True) + adler(first + rows[-1])),
    ]
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30, 40, 8, 2, 0, 0, 0))
    body = b"".join(png_chunk(kind, data) for kind, data in chunks)
    return b"\x89PNG\r\n\x1a\n" + header + body + png_chunk(b"IEND", b"")


PHOTO_ROW_SHORT = png_of_first_rows(RNG.integers(1, 256, (40, 30, 3)), rows=39)


@pytest.mark.parametrize(
    "data",
    [
        PHOTO_ROW_SHORT[:8] + png_chunk(b"tEXt", b"a\0b") + PHOTO_ROW_SHORT[8:],  # a chunk before its header
        PHOTO_ROW_SHORT[:33] + PHOTO_ROW_SHORT[8:],  # the header twice
        _apng_default_frame(30, 8, frame_rows=1, padding=0),
        _apng_default_frame(200, 200, frame_rows=1, padding=200_000),
        _png_ending_in_a_ddat_chunk(),
    ],
    ids=["chunk-before-header", "two-headers", "frame-of-the-last-row", "frame-padded", "ends-in-ddat"],
)
def test_pngs_that_hide_missing_rows_from_the_last_row_rule_are_refused(data):
    for decode in (imaging.decode_image, lambda d: imaging.preprocess(d, Preprocessing(3, 64))):
        with pytest.raises(ImageDecodeError) as err:
            decode(data)
        assert err.value.reason == "truncated", err.value


def test_missing_rows_read_zero_even_in_memory_pillow_reuses():
    """The rule above rests on Pillow zeroing a new image, also one in a block it cached (dirty, white)."""
    blocks = Image.core.get_blocks_max()
    Image.core.set_blocks_max(64)
    try:
        white = encode(Image.fromarray(np.full((120, 90, 3), 255, np.uint8)))
        short = png_of_first_rows(RNG.integers(1, 256, (120, 90, 3)), rows=119)
        for _ in range(3):
            imaging.decode_image(white)
            with pytest.raises(ImageDecodeError, match="last row"):
                imaging.decode_image(short)
    finally:
        Image.core.set_blocks_max(blocks)


def test_a_bomb_shaped_png_is_counted_before_pillow_decodes_it(monkeypatch):
    def no_decoding(self):
        raise AssertionError("decoded a file that was refused by its header and size alone")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageDecodeError, match="last row"):
        imaging.decode_image(png_of_zero_rows(8000, 5000, rows=2))


def adam7_png(pixels: np.ndarray, keep: float = 1.0) -> bytes:
    """An interlaced (Adam7) 8-bit RGB PNG of ``pixels``, its image data cut to ``keep`` of its rows
    (Pillow cannot write interlaced PNGs)."""
    rows = []
    for x0, y0, dx, dy in imaging._ADAM7:
        sub = pixels[y0::dy, x0::dx]
        if sub.size:
            rows += [b"\0" + row.tobytes() for row in sub]
    raw = b"".join(rows[: round(len(rows) * keep)])
    height, width = pixels.shape[:2]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def test_interlaced_png_rows_are_counted_per_pass():
    pixels = SMOOTH[:37, :53]  # sizes that leave every Adam7 pass a ragged edge
    complete = adam7_png(pixels)
    assert not imaging.png_rows_missing(complete)
    assert np.array_equal(imaging.decode_image(complete).astype(np.uint8), pixels)
    assert imaging.png_rows_missing(adam7_png(pixels, keep=0.9))
    with pytest.raises(ImageDecodeError, match="last row"):
        imaging.decode_image(adam7_png(pixels, keep=0.9))


@pytest.mark.parametrize("data", missing_pixel_data(SMOOTH).values(), ids=missing_pixel_data(SMOOTH).keys())
def test_missing_pixel_data_is_truncated_in_every_format_and_path(data):
    for decode in (imaging.decode_image, lambda d: imaging.preprocess(d, Preprocessing(1, 28))):
        with pytest.raises(ImageDecodeError) as err:
            decode(data)
        assert err.value.reason == "truncated", err.value


def test_decoding_refuses_to_run_with_pillows_fill_in_switch(monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        imaging.decode_image(PNG)
