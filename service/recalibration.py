"""``mnemo recalibrate BUNDLE --data DIR``: a bundle's threshold, p-value distribution and pixel level
computed again on new good images, without retraining (issue 14).

Lighting changes, a new batch of material arrives: the model still knows what normal looks like, but its
scores drift, and so must the threshold. This scores the good images with the bundle's own graph (ONNX
Runtime, no torch, so it runs in the slim serving image too), calibrates them exactly as training does
(``mnemo.calibration.calibrate_normal``) and writes the bundle again under a new version, its model files
untouched: a running service picks it up at its next reload (``POST /v1/admin/reload``). The manifest is
replaced atomically, so a reload never reads half a file.

The best-F1 threshold of the old record is dropped: it was chosen on a labelled set of the old conditions.
``--roi MASK.png`` adds a region of interest (``mnemo.roi``): the bundle then scores the heatmap's peak
inside it, and this calibrates exactly that, on the pixels inside.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mnemo.bundle import MANIFEST_FILE, Manifest, read_manifest
from mnemo.calibration import (
    DEFAULT_PIXEL_FALSE_ALARM_RATE,
    Calibration,
    calibrate_normal,
    is_anomalous,
    too_few_for_rate,
)
from mnemo.imaging import IMAGE_EXTENSIONS, Preprocessing, open_image, preprocess
from mnemo.layout import good_folder, image_files
from mnemo.roi import ROI_FILE, fit_mask, mask_from_image
from mnemo.service.backends import create_runner
from mnemo.tiling import Tiling, decode_working, prepare_tiles

DEFAULT_FALSE_ALARM_RATE = 0.01  # when the old threshold was not chosen by a false-alarm rate


def good_images(data: Path) -> list[Path]:
    """An MVTec-layout folder's ``train/good``, else the images directly in ``data`` (as training reads)."""
    folder = good_folder(data / "train") or data
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory")
    images = image_files(folder)
    if not images:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def score_images(
    runner,
    prep: Preprocessing,
    paths: list[Path],
    batch_size: int,
    progress: bool,
    tiling: Tiling | None = None,
):
    """Scores [N] and heatmaps [N, H, W] of ``paths``, decoded as the service decodes uploads (a tiled
    bundle's: tile by tile, merged; its images must share one size)."""
    if tiling is not None:
        scored = [
            score_tiled(runner, prep, tiling, path, batch_size) for path in tqdm(paths, disable=not progress)
        ]
        shapes = sorted({heat.shape for _, heat in scored})
        if len(shapes) > 1:
            raise ValueError(f"the good images must share one size to be calibrated together; found {shapes}")
        return np.array([score for score, _ in scored], np.float64), np.stack([heat for _, heat in scored])
    scores, heatmaps = [], []
    with tqdm(total=len(paths), desc="scoring good images", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            batch = np.stack([preprocess(path, prep) for path in chunk])
            score, heat = runner.run(batch)
            scores.append(np.asarray(score, np.float64))
            heatmaps.append(np.asarray(heat, np.float32)[:, 0])
            bar.update(len(chunk))
    return np.concatenate(scores), np.concatenate(heatmaps)


def score_tiled(runner, prep: Preprocessing, tiling: Tiling, path: Path, batch_size: int):
    """One image's (score, stitched heatmap), its tiles run ``batch_size`` at a time."""
    with open_image(path) as opened:
        tiling.check(*opened.image.size)
        working = decode_working(opened, prep, tiling)
    tiles = prepare_tiles(working, prep, tiling)
    parts = [runner.run(tiles[i : i + batch_size]) for i in range(0, len(tiles), batch_size)]
    scores = np.concatenate([score for score, _ in parts])
    height, width = working.shape[:2]
    return tiling.merge(scores, np.concatenate([heat[:, 0] for _, heat in parts]), width, height)


def recalibrate(
    bundle: Path,
    data: Path,
    *,
    out: Path | None = None,
    false_alarm_rate: float | None = None,
    pixel_false_alarm_rate: float | None = None,
    roi: Path | None = None,
    version: str | None = None,
    backend: str = "auto",
    device: str = "auto",
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Recalibrate ``bundle`` on the good images in ``data``; write it in place, or a copy to ``out``.
    Rates default to the bundle's own. ``roi``: a mask PNG to add (a bundle's own ROI is kept otherwise);
    with one, the threshold is for the heatmap's peak inside it and the pixel level for the pixels inside.
    Returns the report: how threshold and pixel level moved."""
    manifest = read_manifest(bundle)
    old = Calibration.from_dict(manifest.calibration)
    if false_alarm_rate is None:
        false_alarm_rate = old.target if old.method == "false_alarm_rate" else DEFAULT_FALSE_ALARM_RATE
    if pixel_false_alarm_rate is None:
        pixel_false_alarm_rate = old.pixel.false_alarm_rate if old.pixel else DEFAULT_PIXEL_FALSE_ALARM_RATE
    paths = good_images(data)
    runner = create_runner(bundle, backend, device)
    prep = Preprocessing.from_dict(manifest.preprocessing)
    tiling = Tiling.from_dict(manifest.tiling) if manifest.tiling else None
    scores, heatmaps = score_images(runner, prep, paths, batch_size, progress, tiling)
    roi_source = Path(roi) if roi else (Path(bundle) / manifest.roi["file"] if manifest.roi else None)
    if roi_source is not None:  # calibrate what is judged then: the peak inside, the pixels inside
        mask = fit_mask(mask_from_image(roi_source, prep, tiling), heatmaps.shape[1:])
        scores, heatmaps = heatmaps[:, mask].max(axis=1).astype(np.float64), heatmaps[:, mask]
    new = calibrate_normal(scores, false_alarm_rate, heatmaps, pixel_false_alarm_rate)
    version = version or dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S")
    if version == manifest.version:
        raise ValueError(f"version {version!r} is the bundle's current one; a reload would not notice")
    report = {
        "bundle": str(out or bundle),
        "images": len(paths),
        "version": {"old": manifest.version, "new": version},
        "false_alarm_rate": false_alarm_rate,
        "threshold": {"old": old.threshold, "new": new.threshold},
        # what the old threshold would have done on the new good images: the drift, in one number
        "old_threshold_flags": float(np.mean(is_anomalous(scores, old.threshold))),
        "pixel_false_alarm_rate": pixel_false_alarm_rate,
        "pixel_threshold": {"old": old.pixel.threshold if old.pixel else None, "new": new.pixel.threshold},
        "roi": roi_source is not None,
        "warning": too_few_for_rate(new.n, false_alarm_rate),
    }
    roi_bytes = roi_source.read_bytes() if roi_source is not None else None
    files = dict(manifest.files)
    if roi_bytes is not None:
        files[ROI_FILE] = hashlib.sha256(roi_bytes).hexdigest()
    recalibrated = dataclasses.replace(
        manifest,
        version=version,
        files=files,
        roi={"file": ROI_FILE} if roi_bytes is not None else None,
        calibration=new.to_dict(),
        training={
            **manifest.training,
            "recalibrated": {k: report[k] for k in ("images", "version", "threshold")},
        },
    )
    target = Path(out) if out else Path(bundle)
    if out:
        if target.exists():
            raise FileExistsError(f"{target} exists; give a new directory for the recalibrated bundle")
        shutil.copytree(bundle, target)
    if roi_bytes is not None:
        (target / ROI_FILE).write_bytes(roi_bytes)
    write_manifest(target, recalibrated)
    return report


def write_manifest(bundle: Path, manifest: Manifest) -> None:
    """Replace ``manifest.json`` atomically: a concurrent reload reads the old file or the new one."""
    tmp = bundle / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(manifest.to_json())
    os.replace(tmp, bundle / MANIFEST_FILE)
