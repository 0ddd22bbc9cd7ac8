"""PNG plots of an evaluation, for people: ROC and PR curves, score histograms, an example grid."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve


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
