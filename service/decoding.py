"""A score request's images, decoded with their cost admitted before it is paid.

Every upload's header is read first (no pixels decoded), so what the request would cost is known up front:
an image that declares more than ``max_image_pixels`` (``too_large``), or images that declare more than
``max_request_pixels`` together (``request_too_large``), are refused before any pixel is decoded. Small
images then decode in that same worker thread. Each large one (over ``LARGE_IMAGE_PIXELS``) first waits
for a large-image slot: there are ``decode_concurrency - 1`` of them (at least one), so one CPU slot is
always left to small images and one client's huge frames cannot stall everyone's small ones.

Large images are shrunk before they become float (``mnemo.imaging.decode_for_model``): memory and time
follow the model, not the file. After a large image, freed memory is handed back to the system (glibc keeps it
otherwise), so resident memory returns near its baseline after a burst. ``Decoding`` runs the two steps;
the caller puts the second under the request's deadline (see its docstring).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import TypeVar

import anyio
import anyio.to_thread
import numpy as np

from mnemo.imaging import (
    ImageDecodeError,
    OpenImage,
    Preprocessing,
    decode_for_model,
    display_rgb,
    open_image,
    prepare_pixels,
    rgb_uint8,
)
from mnemo.service.errors import ApiError
from mnemo.service.uploads import Upload
from mnemo.tiling import Tiling, TilingError, decode_working, prepare_tiles

LARGE_IMAGE_PIXELS = 4_000_000  # decodes in tens of milliseconds and ~16 MB; larger ones queue for a slot
# Uploads this small (all files together) are decoded on the event loop: a 64 px PNG decodes in ~0.1 ms,
# less than handing it to a worker thread and back costs the loop. Their declared size must also stay
# under INLINE_PIXELS, so a small file that declares a large image still goes to a thread.
INLINE_BYTES = 32 * 1024
INLINE_PIXELS = 256 * 256
T = TypeVar("T")
Pixels = tuple[np.ndarray, np.ndarray | None]  # model input (tiled: its tiles), display crop for overlays


@dataclass(frozen=True)
class CpuSlots:
    """The worker threads that decode and draw: ``any`` bounds them all, ``large`` the large-image decodes
    among them (one fewer, at least one)."""

    any: anyio.CapacityLimiter
    large: anyio.CapacityLimiter

    @classmethod
    def create(cls, concurrency: int) -> CpuSlots:
        """Made at start-up: limiters need the running event loop."""
        return cls(anyio.CapacityLimiter(concurrency), anyio.CapacityLimiter(max(1, concurrency - 1)))


@dataclass(frozen=True)
class Decoded:
    inputs: list[np.ndarray]  # N × [C, H, W] in the model's normalisation (tiled: [tiles, C, H, W] each)
    displays: list[np.ndarray] | None  # uint8 RGB as the model saw it (model size, or working size)
    sizes: list[tuple[int, int]]  # (width, height) of each upload as sent: regions are given in these
    working: list[tuple[int, int]] | None = None  # a tiled bundle's (width, height) of each heatmap


@dataclass(frozen=True)
class PixelLimits:
    image: int  # most pixels one image may declare
    request: int  # most pixels a request's images may declare together
    tiles: int = 0  # most tiles a request's images may become (tiled bundles: the batcher's queue)


class Decoding:
    """One request's images on their way to model input, in two steps.

    ``start`` reads every header, checks the pixel limits and decodes the small images, in one worker
    thread call that is not interrupted (its cost is bounded: small images only), or, for a few tiny
    files (``INLINE_BYTES``, ``INLINE_PIXELS``), on the event loop itself. ``finish`` decodes the
    large images one at a time, each once a large-image slot is free; it may be cancelled at any await
    (the request's deadline, its client leaving), and a decode already running then keeps both its slots
    until it returns, so the slots always bound the threads at work. ``close`` drops what is left.
    """

    def __init__(
        self, uploads: list[Upload], pre: Preprocessing, overlay: bool, tiling: Tiling | None = None
    ) -> None:
        self.uploads, self.tiling = uploads, tiling
        self.view = _View(pre, overlay, tiling)
        self.opened: list[OpenImage] = []
        self.done: list[Pixels | None] = []

    async def start(self, limits: PixelLimits, slots: CpuSlots) -> None:
        view = self.view
        decode = partial(_decode_small, self.uploads, view, self.opened, self.done)
        if sum(len(upload.data) for upload in self.uploads) > INLINE_BYTES:
            opening = partial(_open_checked, self.uploads, view, limits, self.opened)
            await anyio.to_thread.run_sync(lambda: (opening(), decode()), limiter=slots.any)
            return
        _open_checked(self.uploads, view, limits, self.opened)  # headers of a few small files: cheap
        if sum(image.pixels for image in self.opened) <= INLINE_PIXELS:
            decode()  # costs the loop less than the hop to a worker thread and back
        else:
            await anyio.to_thread.run_sync(decode, limiter=slots.any)

    async def finish(self, slots: CpuSlots) -> Decoded:
        """Every upload as model input (and display crop for overlays), in upload order."""
        for i, image in enumerate(self.opened):
            if self.done[i] is None:
                decode = partial(_decode_large, self.uploads[i], i, image, self.view)
                self.done[i] = await _large_in_thread(decode, slots)
        sizes = [image.image.size for image in self.opened]
        self.close()
        inputs = [item[0] for item in self.done]
        displays = [item[1] for item in self.done] if self.view.overlay else None
        working = [self.tiling.working_size(*size) for size in sizes] if self.tiling else None
        return Decoded(inputs, displays, sizes, working)

    def close(self) -> None:
        for image in self.opened:
            image.close()


async def _large_in_thread(decode: Callable[[], Pixels], slots: CpuSlots) -> Pixels:
    """``decode()`` in a worker thread holding a large-image slot and a CPU slot. Cancelled while waiting
    for the slots, it gives up; cancelled while decoding, it returns at once and the decode finishes in
    the background, still holding its slots (native cancellation would release them early)."""
    running = False

    async def job() -> Pixels:
        nonlocal running
        async with slots.large:
            running = True
            return await anyio.to_thread.run_sync(decode, limiter=slots.any)

    task = asyncio.ensure_future(job())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not running:
            task.cancel()
        task.add_done_callback(_retrieve)  # nobody waits for its result or error any more
        raise


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


@dataclass(frozen=True)
class _View:
    """How an image becomes model input: the model's preprocessing, its tiling, whether to keep a display."""

    pre: Preprocessing
    overlay: bool
    tiling: Tiling | None


def _open_checked(uploads: list[Upload], view: _View, limits: PixelLimits, opened: list[OpenImage]) -> None:
    """Read every header and check the pixel (and tile) limits; fills ``opened``. No pixel is decoded."""
    for i, upload in enumerate(uploads):
        opened.append(_named(upload, i, partial(open_image, upload.data, max_pixels=limits.image)))
    declared = sum(image.pixels for image in opened)
    if declared > limits.request:
        raise ApiError(
            400,
            "request_too_large",
            f"the request's {len(opened)} images declare {declared:,} pixels together; the limit is "
            f"{limits.request:,}",
        )
    if view.tiling is not None:
        _check_tiles(uploads, opened, view.tiling, limits.tiles)


def _decode_small(
    uploads: list[Upload], view: _View, opened: list[OpenImage], done: list[Pixels | None]
) -> None:
    """Decode the images at most ``LARGE_IMAGE_PIXELS`` large; fills ``done`` (None for a large one)."""
    for i, (upload, image) in enumerate(zip(uploads, opened)):
        small = image.pixels <= LARGE_IMAGE_PIXELS
        done.append(_named(upload, i, partial(_model_pixels, image, view)) if small else None)


def _check_tiles(uploads: list[Upload], opened: list[OpenImage], tiling: Tiling, limit: int) -> None:
    """Before any pixel is decoded: every image holds a tile, and the request's tiles fit the batcher."""
    for i, (upload, image) in enumerate(zip(uploads, opened)):
        try:
            tiling.check(*image.image.size)
        except TilingError as exc:
            name = upload.filename or f"image {i}"
            raise ApiError(400, "image_too_small", f"{name}: {exc}", file=upload.filename) from None
    tiles = sum(tiling.count(*image.image.size) for image in opened)
    if limit and tiles > limit:
        raise ApiError(
            400,
            "too_many_tiles",
            f"the request's {len(opened)} images make {tiles} tiles of {tiling.tile} px; at most {limit} "
            "can queue for this model (MNEMO_MAX_QUEUE): send fewer or smaller images",
        )


def _decode_large(upload: Upload, index: int, image: OpenImage, view: _View) -> Pixels:
    try:
        return _named(upload, index, partial(_model_pixels, image, view))
    finally:
        release_free_memory()


def _model_pixels(image: OpenImage, view: _View) -> Pixels:
    pre, tiling = view.pre, view.tiling
    if tiling is None:
        sized = decode_for_model(image, pre)
        return prepare_pixels(sized, pre), display_rgb(sized, pre) if view.overlay else None
    working = decode_working(image, pre, tiling)
    return prepare_tiles(working, pre, tiling), rgb_uint8(working) if view.overlay else None


def _named(upload: Upload, index: int, step: Callable[[], T]) -> T:
    """``step()``, with an ``ImageDecodeError`` turned into a 400 naming the upload."""
    try:
        return step()
    except ImageDecodeError as exc:
        name = upload.filename or f"image {index}"
        raise ApiError(400, exc.reason, f"{name}: {exc}", file=upload.filename) from None


def release_free_memory() -> None:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim``; a no-op elsewhere).

    Large decodes free hundreds of megabytes in worker threads, whose glibc arenas otherwise keep much
    of it: after four concurrent requests of two 40 MP PNGs each, the server's resident memory stayed
    210–320 MB above its 110 MB baseline without this, and came back to the baseline with it.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
