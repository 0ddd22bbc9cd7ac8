"""Response bodies of the HTTP API, as pydantic models so the OpenAPI document describes them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

HeatmapFormat = Literal["none", "overlay", "gray", "grid"]
HeatmapScaleKind = Literal["calibrated", "image"]


class HeatmapScale(BaseModel):
    kind: HeatmapScaleKind = Field(
        description="calibrated: the same for every image (normal pixels' median to the region level); "
        "image: this heatmap's own min to max (bundles without a pixel calibration, or ?heatmap_scale=image)"
    )
    vmin: float = Field(description="score drawn coldest (0 in gray)")
    vmax: float = Field(description="score drawn hottest (255 in gray); anything above saturates")


class Heatmap(BaseModel):
    format: Literal["overlay", "gray", "grid"]
    width: int
    height: int
    png_base64: str | None = Field(None, description="overlay/gray: a PNG at the model's input size")
    values: list[list[float]] | None = Field(None, description="grid: rows of per-cell mean heatmap values")
    scale: HeatmapScale | None = Field(None, description="overlay/gray: how scores map to colours")


class Region(BaseModel):
    x: int = Field(description="bounding box in the uploaded image's pixels: left")
    y: int = Field(description="top")
    width: int
    height: int
    area: int = Field(description="pixels of the uploaded image the region covers")
    peak: float = Field(description="highest heatmap score in the region")
    mean: float = Field(description="mean heatmap score in the region")


class Picture(BaseModel):
    format: Literal["png"] = "png"
    width: int
    height: int
    png_base64: str


class ImageScore(BaseModel):
    filename: str | None = None
    score: float = Field(description="anomaly score; higher is more anomalous")
    p_value: float = Field(description="share of held-out normal images scoring at least this high")
    verdict: Literal["ok", "anomalous"]
    threshold: float = Field(description="the threshold used: the model's, or the request's override")
    heatmap: Heatmap | None = None
    reconstruction: Picture | None = Field(
        None,
        description="reconstruction=true: the model's reconstruction at its input size, what the memory "
        "takes this part to look like without its defect",
    )
    regions: list[Region] | None = Field(
        None,
        description="regions=true: connected areas above the model's calibrated pixel level, strongest first",
    )


class ModelRef(BaseModel):
    name: str
    version: str


class Timings(BaseModel):
    decode_ms: float
    queue_ms: float = Field(description="longest wait of this request's images for their batch")
    inference_ms: float = Field(description="longest inference call among this request's batches")
    total_ms: float


class ScoreResponse(BaseModel):
    model: ModelRef
    results: list[ImageScore]
    timings_ms: Timings


class ModelInfo(BaseModel):
    name: str
    version: str
    architecture: str
    backend: str
    device: str
    input_channels: int
    input_size: int
    preprocessing: dict[str, Any]
    threshold: float
    calibration_method: str | None = None
    reconstruction: bool = Field(False, description="whether reconstruction=true is available")
    roi: bool = Field(False, description="whether the bundle has a region of interest (scores are its peak)")
    tiling: dict[str, Any] | None = Field(
        None,
        description="tile, overlap, scale: the bundle scores images tile by tile at scale × their own "
        "resolution (heatmaps and regions at that resolution; the score is the worst tile's)",
    )
    pixel_threshold: float | None = Field(
        None, description="the region level (regions=true); None for a bundle without pixel calibration"
    )
    metrics: dict[str, Any]
    created: str
    loaded_at: float


class ModelList(BaseModel):
    models: list[ModelInfo]
    failed: dict[str, str] = Field(
        description="bundle (its folder under MNEMO_MODEL_DIR, '.' for the folder itself) -> why it was "
        "refused, from the last (re)load; a bundle that failed to "
        "reload but is still served in its previous version is listed here and in models"
    )


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. not_an_image, queue_full")
    message: str
    file: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    requires: Literal["all", "any"] = Field(
        description="MNEMO_READY_REQUIRES: all = ready only while every bundle is served; any = one is enough"
    )
    models: list[str]
    failed: dict[str, str] = Field(
        description="bundle (its folder under MNEMO_MODEL_DIR, '.' for the folder itself) -> why it was "
        "refused, from the last (re)load; the directory's own path reads MNEMO_MODEL_DIR"
    )


class ReloadResult(BaseModel):
    loaded: list[str]
    unchanged: list[str]
    kept: list[str] = Field(description="failed to reload; the previous version is still served")
    removed: list[str]
    failed: dict[str, str]
