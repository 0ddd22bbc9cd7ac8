"""One score request, start to end: ``score_request`` reads and decodes the images, waits for the model's
batcher, judges and draws every image, counts it in the model's metrics and times the steps.

Decoding and PNG drawing are CPU work, so they run in worker threads bounded by the app's CPU slots
(``service/decoding.py``). Once the upload is in, decoding, queueing and inference share one deadline,
``request_timeout_s`` (504): it is checked after the small images are decoded (a bounded step) and
cancels the wait for a large-image slot, for the batcher or for inference. A client that disconnects
is noticed as soon as its images are decoded, and then at once: its queued images are withdrawn from
the batcher, and the request is counted as ``client_closed`` (status 499).
The verdict is ``mnemo.calibration.is_anomalous``, the rule the model's threshold was calibrated for.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from functools import partial

import anyio
import anyio.to_thread
import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.types import Receive

from mnemo.calibration import PixelCalibration, is_anomalous, p_value
from mnemo.heatmaps import heatmap_grid, heatmap_overlay_png, heatmap_png, png_bytes
from mnemo.imaging import denormalise
from mnemo.regions import find_regions
from mnemo.roi import RoiError, apply_roi, fit_mask, mask_from_rectangle
from mnemo.service.batching import BatcherClosedError, BatchFailedError, ImageResult, QueueFullError
from mnemo.service.capture import Capture, CaptureStore
from mnemo.service.decoding import CpuSlots, Decoded, Decoding, PixelLimits
from mnemo.service.errors import ApiError
from mnemo.service.model_store import LoadedModel
from mnemo.service.schemas import (
    Heatmap,
    HeatmapFormat,
    HeatmapScale,
    HeatmapScaleKind,
    ImageScore,
    ModelRef,
    Picture,
    Region,
    ScoreResponse,
    Timings,
)
from mnemo.service.settings import Settings
from mnemo.service.uploads import Upload, read_uploads

logger = logging.getLogger("mnemo.service")
PNG_FORMATS = ("overlay", "gray")  # drawn in a worker thread; "grid" and "none" are cheap


class ScoreOptions(BaseModel):
    """What a request may choose, from its query string (validated by pydantic-core in one call; the
    route publishes these fields as its OpenAPI query parameters)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    heatmap: HeatmapFormat = Field("none", description="overlay/gray: base64 PNG; grid: float grid")
    threshold: float | None = Field(None, description="override the model's threshold", allow_inf_nan=False)
    regions: bool = Field(
        False, description="list the connected areas above the model's calibrated pixel level"
    )
    reconstruction: bool = Field(
        False, description="return the model's reconstruction: what this part looks like to its memory"
    )
    heatmap_scale: HeatmapScaleKind = Field(
        "calibrated",
        description="calibrated: one colour scale for every image (default); image: each map's min…max",
    )
    roi: str | None = Field(
        None,
        description="x,y,width,height in the image's pixels: only that part counts (score = heatmap peak "
        "inside; verdict by the pixel level unless the bundle has its own ROI)",
        pattern=r"^-?\d+,-?\d+,\d+,\d+$",
    )


async def score_request(
    request: Request,
    model: LoadedModel,
    options: ScoreOptions,
    settings: Settings,
    slots: CpuSlots,
    started: float,
    capture: CaptureStore | None = None,
) -> ScoreResponse:
    """Score the request's images; ``started`` (``time.perf_counter``) is when the request arrived, so the
    decode time includes receiving the upload. Failures are ``ApiError``s."""
    if options.regions and model.calibration.pixel is None:
        raise ApiError(
            400,
            "no_pixel_calibration",
            f"{model.name} has no pixel calibration, so it cannot find regions: re-export it, or run "
            "`mnemo recalibrate` on its bundle with good images",
        )
    if options.roi and model.roi is None and model.calibration.pixel is None:
        raise ApiError(
            400,
            "no_pixel_calibration",
            f"{model.name} has no pixel calibration to judge a rectangle by: run `mnemo recalibrate` on it",
        )
    if options.reconstruction and model.reconstructor is None:
        raise ApiError(
            400,
            "no_reconstruction",
            f"{model.name} has no reconstruction graph: its architecture does not reconstruct, or the bundle "
            "was exported before reconstructions were (export it again)",
        )
    uploads = await read_uploads(request, settings.max_files)
    decoded, results, decoded_at = await decode_and_infer(
        request, model, uploads, settings, slots, overlay=options.heatmap == "overlay"
    )
    draw = partial(judge, model, uploads, results, decoded, options, settings.heatmap_grid_size)
    in_thread = options.heatmap in PNG_FORMATS or options.regions
    images = await anyio.to_thread.run_sync(draw, limiter=slots.any) if in_thread else draw()
    if options.reconstruction:
        rebuilt = await anyio.to_thread.run_sync(reconstructions, model, decoded, limiter=slots.any)
        for image, picture in zip(images, rebuilt):
            image.reconstruction = picture
    observe(model, images, uploads, capture)
    return ScoreResponse(
        model=ModelRef(name=model.name, version=model.manifest.version),
        results=images,
        timings_ms=_timings(started, decoded_at, results),
    )


async def decode_and_infer(
    request: Request | None,
    model: LoadedModel,
    uploads: list[Upload],
    settings: Settings,
    slots: CpuSlots,
    overlay: bool = False,
) -> tuple[Decoded, list[ImageResult], float]:
    """Decode ``uploads`` within the pixel limits and run them through the model's batcher, under the
    request's deadline; returns the decoded images, their results and when decoding ended. ``request``
    None (gRPC): nobody watches for a disconnect here; the gRPC server cancels a call whose client left."""
    deadline = asyncio.get_running_loop().time() + settings.request_timeout_s
    decoding = Decoding(uploads, model.preprocessing, overlay, model.tiling)
    limits = PixelLimits(settings.max_image_pixels, settings.max_request_pixels, settings.max_queue)
    try:
        await decoding.start(limits, slots)
        async with _Cancelled(request, deadline, settings.request_timeout_s):
            decoded = await decoding.finish(slots)
            decoded_at = time.perf_counter()
            results = await _infer(model, decoded, settings)
    finally:
        decoding.close()
    return decoded, results, decoded_at


async def infer_inputs(
    request: Request | None, model: LoadedModel, inputs: list[np.ndarray], settings: Settings
) -> tuple[Decoded, list[ImageResult]]:
    """Model inputs a client prepared itself (already [C, H, W] in the model's normalisation) through the
    batcher, under the request's deadline. For a tiled bundle each input is one tile, scored alone."""
    size = model.preprocessing.size
    decoded = Decoded(inputs, None, [(size, size)] * len(inputs))
    deadline = asyncio.get_running_loop().time() + settings.request_timeout_s
    async with _Cancelled(request, deadline, settings.request_timeout_s):
        results = await _infer(model, decoded, settings)
    # Finite but huge inputs (3e38 is a float32) overflow inside the model: a NaN score would answer "ok"
    # and stay in the score histogram's sum for good. Decoded images cannot get there.
    for i, result in enumerate(results):
        if not (math.isfinite(result.score) and np.isfinite(result.heatmap).all()):
            raise ApiError(
                400,
                "bad_input",
                f"input {i} gives a non-finite score: its values are too large for the model; send "
                "normalised model input, as the bundle's preprocessing makes it from 0…255 pixels",
            )
    return decoded, results


def reconstructions(model: LoadedModel, decoded: Decoded) -> list[Picture]:
    """The model's reconstruction of each image as a PNG at its input size (one ONNX Runtime call; a
    tiled bundle's: one per image, its tiles stitched like the heatmap)."""
    if decoded.working is None:
        rebuilt = list(model.reconstructor.run(np.stack(decoded.inputs)))
    else:
        stitch = model.tiling.stitch
        rebuilt = [
            stitch(model.reconstructor.run(tiles), *size)
            for tiles, size in zip(decoded.inputs, decoded.working)
        ]
    pictures = []
    for chw in rebuilt:
        pixels = denormalise(chw, model.preprocessing)
        png = base64.b64encode(png_bytes(pixels)).decode("ascii")
        pictures.append(Picture(width=pixels.shape[1], height=pixels.shape[0], png_base64=png))
    return pictures


def observe(
    model: LoadedModel, images: list[ImageScore], uploads: list[Upload], capture: CaptureStore | None
) -> None:
    """Count every judged image in the model's metrics, and offer it to review capture."""
    for image, upload in zip(images, uploads):
        model.metrics.observe_image(image.score, image.p_value, image.verdict)
        if capture is not None and upload.data:
            answer = image.model_dump(exclude_none=True, exclude={"heatmap"})
            capture.offer(Capture(model.name, model.manifest.version, image.verdict, upload.data, answer))


class _Cancelled:
    """``async with``: cancel the body at ``deadline`` (504 ``timeout``) or when the client disconnects
    (499 ``client_closed``), whichever comes first. Native asyncio cancellation, as cheap as it gets: one
    timer and one task that waits for the ASGI disconnect message (the body has been read, so nothing
    else can come). Nothing here refers back to the watcher once it is cancelled, so a request leaves
    no reference cycle for the garbage collector."""

    def __init__(self, request: Request | None, deadline: float, timeout_s: float) -> None:
        self.request, self.timeout_s = request, timeout_s
        self.timeout = asyncio.timeout_at(deadline)
        self.gone: list[bool] = []  # the watcher appends True when the client has left

    async def __aenter__(self) -> None:
        if self.timeout.when() <= asyncio.get_running_loop().time():
            raise self._late()
        self.watcher = None
        if self.request is not None:
            self.watcher = asyncio.ensure_future(
                _cancel_on_disconnect(self.request.receive, asyncio.current_task(), self.gone)
            )
        await self.timeout.__aenter__()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
        del self.watcher
        try:
            await self.timeout.__aexit__(kind, exc, tb)
        except TimeoutError:
            raise self._late() from None
        if kind is asyncio.CancelledError and self.gone and asyncio.current_task().uncancel() == 0:
            message = "the client disconnected before its images were scored"
            raise ApiError(499, "client_closed", message) from None

    def _late(self) -> ApiError:
        return ApiError(
            504, "timeout", f"no result within {self.timeout_s:g} s (decoding, queue and inference)"
        )


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task, gone: list[bool]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.append(True)
    task.cancel()


async def _infer(model: LoadedModel, decoded: Decoded, settings: Settings) -> list[ImageResult]:
    """The batcher's results, its failures mapped to the API's errors. Cancelling this (deadline,
    disconnect) withdraws the request's queued images: the batcher skips them. A tiled bundle's images
    go in as all their tiles at once (one admission) and come back merged (``mnemo.tiling``)."""
    try:
        if decoded.working is None:
            return await model.batcher.submit(decoded.inputs)
        tiles = await model.batcher.submit([tile for image in decoded.inputs for tile in image])
        return merge_tiles(model, tiles, decoded)
    except QueueFullError as exc:
        headers = {"Retry-After": str(settings.retry_after_s)}
        raise ApiError(503, "queue_full", f"{model.name} is busy: {exc}", headers=headers) from None
    except BatchFailedError as exc:
        logger.error("inference failed for %s: %s", model.name, exc)
        raise ApiError(500, "inference_failed", f"inference failed for this batch: {exc}") from None
    except BatcherClosedError as exc:
        raise ApiError(503, "model_unloaded", str(exc), headers={"Retry-After": "1"}) from None


def merge_tiles(model: LoadedModel, tiles: list[ImageResult], decoded: Decoded) -> list[ImageResult]:
    """Every image's tile results → one result: the worst tile's score, the stitched heatmap; queue and
    inference times of its slowest tile, and the largest batch its tiles ran in."""
    merged, start = [], 0
    for image, size in zip(decoded.inputs, decoded.working):
        own = tiles[start : start + len(image)]
        start += len(image)
        score, heat = model.tiling.merge(
            np.array([t.score for t in own]), np.stack([t.heatmap for t in own]), *size
        )
        slowest = max(own, key=lambda t: t.queue_s + t.inference_s)
        batch = max(t.batch_size for t in own)
        merged.append(ImageResult(score, heat, slowest.queue_s, slowest.inference_s, batch))
    return merged


def _timings(started: float, decoded_at: float, results: list[ImageResult]) -> Timings:
    """Queue and inference: the slowest of the request's images, since they may run in several batches."""
    return Timings(
        decode_ms=1000 * (decoded_at - started),
        queue_ms=1000 * max(r.queue_s for r in results),
        inference_ms=1000 * max(r.inference_s for r in results),
        total_ms=1000 * (time.perf_counter() - started),
    )


def judge(
    model: LoadedModel,
    uploads: list[Upload],
    results: list[ImageResult],
    decoded: Decoded,
    options: ScoreOptions,
    grid_size: int,
) -> list[ImageScore]:
    """Score, p-value, verdict, requested heatmap and regions of every image, in upload order; within
    the bundle's ROI and the request's rectangle, where there are any (``mnemo.roi``)."""
    pixel = model.calibration.pixel
    scale = pixel.scale if pixel is not None and options.heatmap_scale == "calibrated" else None
    judged = []
    for i, (upload, result) in enumerate(zip(uploads, results)):
        heat, score = within_roi(model, result, decoded.sizes[i], options.roi)
        if options.roi and model.roi is None:  # a peak over some pixels: judged by the pixel level
            threshold = pixel.threshold if options.threshold is None else options.threshold
            p = p_value(score, pixel.quantiles, len(pixel.quantiles))
        else:
            threshold = model.threshold if options.threshold is None else options.threshold
            p = p_value(score, model.quantiles, model.calibration.n)
        judged.append(
            ImageScore(
                filename=upload.filename,
                score=score,
                p_value=float(p),
                verdict="anomalous" if is_anomalous(score, threshold) else "ok",
                threshold=threshold,
                heatmap=render_heatmap(heat, options.heatmap, decoded.displays, i, grid_size, scale),
                regions=regions_of(heat, pixel, decoded.sizes[i], model) if options.regions else None,
            )
        )
    return judged


def within_roi(
    model: LoadedModel, result: ImageResult, size: tuple[int, int], rectangle: str | None
) -> tuple[np.ndarray, float]:
    """The heatmap and score as the model gave them, or, with an ROI, calm outside and the peak inside."""
    mask = None if model.roi is None else fit_mask(model.roi, result.heatmap.shape)
    if rectangle:
        try:
            rect = mask_from_rectangle(rectangle, size, model.preprocessing, model.tiling)
        except RoiError as exc:
            raise ApiError(400, "bad_roi", str(exc)) from None
        mask = rect if mask is None else mask & rect
        if not mask.any():
            raise ApiError(
                400, "bad_roi", f"roi {rectangle} does not overlap the bundle's region of interest"
            )
    if mask is None:
        return result.heatmap, float(result.score)
    pixel = model.calibration.pixel
    fill = pixel.scale[0] if pixel is not None else float(result.heatmap[mask].min())
    return apply_roi(result.heatmap, mask, fill)


def regions_of(
    heat: np.ndarray, pixel: PixelCalibration, size: tuple[int, int], model: LoadedModel
) -> list[Region]:
    found = find_regions(heat, pixel.threshold, size, model.preprocessing, model.tiling)
    return [Region(**vars(region)) for region in found]


def render_heatmap(
    heat: np.ndarray,
    fmt: HeatmapFormat,
    displays: list[np.ndarray] | None,
    index: int,
    grid_size: int,
    scale: tuple[float, float] | None = None,
) -> Heatmap | None:
    """A PNG coloured on ``scale`` (vmin, vmax: the bundle's calibrated one, the same for every image),
    else stretched over this heatmap's own min…max; the answer says which."""
    height, width = heat.shape
    if fmt == "none":
        return None
    if fmt == "grid":
        grid = heatmap_grid(heat, grid_size)
        return Heatmap(format="grid", width=grid.shape[1], height=grid.shape[0], values=grid.tolist())
    kind = "calibrated" if scale else "image"
    vmin, vmax = scale or (float(heat.min()), float(heat.max()))
    if fmt == "overlay":
        png = heatmap_overlay_png(displays[index], heat, vmin=vmin, vmax=vmax)
    else:
        png = heatmap_png(heat, vmin=vmin, vmax=vmax)
    return Heatmap(
        format=fmt,
        width=width,
        height=height,
        png_base64=base64.b64encode(png).decode("ascii"),
        scale=HeatmapScale(kind=kind, vmin=vmin, vmax=vmax),
    )
