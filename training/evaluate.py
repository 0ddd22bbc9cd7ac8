"""``mnemo evaluate``: score a labelled test set, compute the papers' metrics, write a report and plots.

Image level: AUROC, AUPRC, best F1 (papers 000/001/003). Pixel level, when masks exist: pixel AUROC and
PRO integrated to FPR 0.3. The report is JSON (``report.json``) plus PNG plots (``plots.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mnemo.tiling import Tiling
from mnemo.training import detection_metrics


@dataclass
class ScoredSet:
    """Everything one scoring pass over a dataset produced, in dataset order."""

    scores: np.ndarray  # [N]
    labels: np.ndarray  # [N] 0 = good, 1 = anomalous (all 0 for unlabelled sets)
    heatmaps: np.ndarray  # [N, H, W] float32
    masks: np.ndarray | None  # [N, H, W] bool, when the dataset has pixel masks
    has_mask: np.ndarray | None = None  # [N] bool: False for a defect image whose mask file is missing
    valid: np.ndarray | None = None  # [H, W] bool: the region of interest; pixel metrics count only inside


def unpack(batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(images, labels, masks) from a dict batch, a tuple batch, or a bare tensor."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if isinstance(batch, dict):
        return batch["image"], batch.get("label"), batch.get("mask")
    items = [*batch, None, None]
    return items[0], items[1], items[2]


def images_of(batch) -> torch.Tensor:
    """The images of a loader batch, in any of the forms ``unpack`` takes."""
    return unpack(batch)[0]


@torch.inference_mode()
def score_dataset(
    model: torch.nn.Module, loader: DataLoader, device: torch.device, progress: bool = True
) -> ScoredSet:
    model.eval().to(device)
    scores, labels, heats, masks, has_mask = [], [], [], [], []
    for batch in tqdm(loader, desc="scoring", disable=not progress, leave=False):
        x, y, m = unpack(batch)
        score, heat = model.score(x.to(device))
        scores.append(score.cpu().numpy())
        heats.append(heat[:, 0].cpu().numpy().astype(np.float32))
        labels.append(np.zeros(len(x), np.int64) if y is None else np.asarray(y).astype(np.int64))
        if m is not None:
            masks.append(np.asarray(m).reshape(len(x), *heat.shape[-2:]) > 0.5)
            known = batch.get("has_mask") if isinstance(batch, dict) else None
            has_mask.append(np.ones(len(x), bool) if known is None else np.asarray(known, bool))
    return ScoredSet(
        scores=np.concatenate(scores),
        labels=np.concatenate(labels),
        heatmaps=np.concatenate(heats),
        masks=np.concatenate(masks) if masks and len(masks) == len(heats) else None,
        has_mask=np.concatenate(has_mask) if has_mask and len(has_mask) == len(heats) else None,
    )


@torch.inference_mode()
def score_frames(
    model: torch.nn.Module,
    frames: Dataset,
    tiling: Tiling,
    device: torch.device,
    batch_size: int = 64,
    progress: bool = True,
) -> ScoredSet:
    """Score whole frames tile by tile as the service does (``mnemo.tiling``): each frame's tiles in
    batches of ``batch_size``, merged into its score (the worst tile's) and stitched heatmap. Pixel
    metrics need one heatmap size, so the frames must share one size."""
    model.eval().to(device)
    scores, labels, heats, masks, has_mask = [], [], [], [], []
    for i in tqdm(range(len(frames)), desc="scoring frames", disable=not progress, leave=False):
        item = frames[i]
        tiles = torch.from_numpy(tiling.cut(item["image"].numpy()))
        parts = [model.score(tiles[j : j + batch_size].to(device)) for j in range(0, len(tiles), batch_size)]
        tile_scores = torch.cat([p[0] for p in parts]).cpu().numpy()
        tile_heats = torch.cat([p[1][:, 0] for p in parts]).cpu().numpy()
        height, width = item["image"].shape[-2:]
        score, heat = tiling.merge(tile_scores, tile_heats, width, height)
        scores.append(score)
        heats.append(heat)
        labels.append(int(item["label"]))
        masks.append(item["mask"].numpy()[0] > 0.5)
        has_mask.append(bool(item["has_mask"]))
    shapes = sorted({h.shape for h in heats})
    if len(shapes) > 1:
        raise ValueError(f"a tiled set's frames must share one size to be scored together; found {shapes}")
    return ScoredSet(
        scores=np.asarray(scores, np.float64),
        labels=np.asarray(labels, np.int64),
        heatmaps=np.stack(heats),
        masks=np.stack(masks),
        has_mask=np.asarray(has_mask, bool),
    )


def within_roi(scored: ScoredSet, roi: np.ndarray | None) -> ScoredSet:
    """What the service answers for a bundle with this ROI (bool [H, W] on the heatmaps' grid, as
    ``mnemo.roi``): each image's score becomes its heatmap's peak inside, the heatmap outside is set to
    the lowest value inside (calm), and pixel metrics count only the pixels inside."""
    if roi is None:
        return scored
    inside = scored.heatmaps[:, roi]
    heat = np.where(roi, scored.heatmaps, np.float32(inside.min())).astype(np.float32)
    return dataclasses.replace(scored, scores=inside.max(axis=1).astype(np.float64), heatmaps=heat, valid=roi)


def compute_metrics(scored: ScoredSet) -> dict[str, Any]:
    """Image metrics when both classes are present; pixel metrics when anomalous masks exist too."""
    report: dict[str, Any] = {
        "n_images": len(scored.scores),
        "n_anomalous": int(scored.labels.sum()),
    }
    if 0 < scored.labels.sum() < len(scored.labels):
        report["image"] = detection_metrics.image_metrics(scored.scores, scored.labels)
    if scored.masks is not None and scored.masks.any():
        # Defect images whose mask file is missing would count as all-good pixels: leave them out.
        keep = np.ones(len(scored.scores), bool) if scored.has_mask is None else scored.has_mask
        heat, masks = scored.heatmaps[keep], scored.masks[keep]
        report["pixel"] = {
            "auroc": detection_metrics.pixel_auroc(heat, masks, valid=scored.valid),
            "pro": detection_metrics.pro_score(heat, masks, valid=scored.valid),
            "n_images": int(keep.sum()),
        }
    return report
