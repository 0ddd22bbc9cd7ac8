"""PNG plots of an evaluation, for people: ROC and PR curves, score histograms, an example grid.

``write_plots`` draws them all for one scored test set; the functions under it draw one figure each.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.metrics import precision_recall_curve, roc_curve

from mnemo.calibration import Calibration
from mnemo.models.base import AnomalyModel, ModelConfig
from mnemo.tiling import Tiling
from mnemo.training.evaluate import ScoredSet, images_of

EXAMPLES_PER_CLASS = 3  # the most anomalous-looking anomalies and the least anomalous-looking good images


@torch.no_grad()
def write_plots(
    model: AnomalyModel,
    dataset,
    scored: ScoredSet,
    calibration: Calibration,
    out: Path,
    device: torch.device,
    tiling: Tiling | None = None,
) -> None:
    """Curves and histograms of ``scored`` (``dataset``'s scores), and an example grid of its images
    (a tiled set's whole frames, their tiles' reconstructions stitched)."""
    out.mkdir(parents=True, exist_ok=True)
    curves(scored.scores, scored.labels, out, calibration.threshold)
    order = np.argsort(scored.scores)
    anomalous = [i for i in order[::-1] if scored.labels[i] == 1][:EXAMPLES_PER_CLASS]
    normal = [i for i in order if scored.labels[i] == 0][:EXAMPLES_PER_CLASS]
    picks = [int(i) for i in anomalous + normal]
    x = torch.stack([images_of(dataset[i]) for i in picks])
    recon = reconstructions(model, x, device, tiling)
    recon = None if recon is None else denormalise(recon, model.config)
    titles = [f"{'anomalous' if scored.labels[i] else 'good'} {scored.scores[i]:.4g}" for i in picks]
    example_grid(denormalise(x, model.config), recon, scored.heatmaps[picks], titles, out / "examples.png")


@torch.inference_mode()
def reconstructions(
    model: AnomalyModel, x: torch.Tensor, device: torch.device, tiling: Tiling | None
) -> torch.Tensor | None:
    """The model's reconstructions of ``x`` [B, C, H, W] (None where it does not reconstruct); tiled,
    each frame's tiles reconstructed and stitched."""
    if tiling is None:
        return model.example_reconstruction(x.to(device))
    frames = []
    for frame in x.numpy():
        rebuilt = model.example_reconstruction(torch.from_numpy(tiling.cut(frame)).to(device))
        if rebuilt is None:
            return None
        frames.append(tiling.stitch(rebuilt.cpu().numpy(), frame.shape[-1], frame.shape[-2]))
    return torch.from_numpy(np.stack(frames))


def denormalise(x: torch.Tensor, config: ModelConfig) -> np.ndarray:
    """[B, C, H, W] in the model's normalisation → [B, H, W, C] in [0, 1] for display."""
    mean = torch.tensor(config.mean).view(1, -1, 1, 1)
    std = torch.tensor(config.std).view(1, -1, 1, 1)
    return (x.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves(scores: np.ndarray, labels: np.ndarray, out: Path, threshold: float | None = None) -> list[Path]:
    """ROC and PR curves (image level), plus normal-vs-anomalous score histograms with the threshold."""
    written = []
    if 0 < labels.sum() < len(labels):
        fpr, tpr, _ = roc_curve(labels, scores)
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.plot(fpr, tpr)
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (image level)")
        written.append(_save(fig, out / "roc.png"))
        precision, recall, _ = precision_recall_curve(labels, scores)
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.plot(recall, precision)
        ax.set(xlabel="recall", ylabel="precision", title="precision-recall (image level)")
        written.append(_save(fig, out / "pr.png"))
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    bins = np.histogram_bin_edges(scores, bins=40)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="good")
    if labels.any():
        ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="anomalous")
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", lw=1, label="threshold")
    ax.set(xlabel="anomaly score", ylabel="images", title="score distribution")
    ax.legend()
    written.append(_save(fig, out / "scores.png"))
    return written


def example_grid(
    images: np.ndarray,
    reconstructions: np.ndarray | None,
    heatmaps: np.ndarray,
    titles: list[str],
    path: Path,
) -> Path:
    """Rows of input / reconstruction / heatmap overlay. ``images`` are [N, H, W, C] in [0, 1]."""
    cols = 3 if reconstructions is not None else 2
    fig, axes = plt.subplots(len(images), cols, figsize=(2.2 * cols, 2.2 * len(images)), squeeze=False)
    for i, img in enumerate(images):
        show = img[..., 0] if img.shape[-1] == 1 else img
        panels = [("input", show)]
        if reconstructions is not None:
            rec = reconstructions[i]
            panels.append(("reconstruction", rec[..., 0] if rec.shape[-1] == 1 else rec))
        panels.append(("heatmap", show))
        for j, (name, data) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(np.clip(data, 0, 1), cmap="gray", vmin=0, vmax=1)
            if name == "heatmap":
                ax.imshow(heatmaps[i], cmap="jet", alpha=0.45)
            ax.set_axis_off()
            ax.set_title(f"{name}\n{titles[i]}" if j == 0 else name, fontsize=7)
    return _save(fig, path)
