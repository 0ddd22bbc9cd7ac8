"""The papers' detection metrics, all as fractions in [0, 1] (the service's Prometheus metrics are
``service/metrics.py``).

Image level (papers 000/001 §4.1, 003 table 1): AUROC, AUPRC (average precision, scikit-learn's step-wise
sum, not the trapezoid that over-rates PR curves) and the best F1 over all thresholds. Pixel level
(MVTec AD, Bergmann et al.): pixel AUROC and PRO, the per-region overlap integrated up to a false-positive
rate of 0.3 and divided by 0.3.

Labels: 1 = anomalous (positive), 0 = normal. Higher scores are more anomalous. Thresholds returned here
follow scikit-learn's rule "predict anomalous iff score ≥ threshold".
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

PRO_MAX_FPR = 0.3
PRO_MAX_THRESHOLDS = 20_000


def _binary(scores: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"{what}: {s.size} scores but {y.size} labels")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{what}: scores contain NaN or infinity")
    if y.all() or not y.any():
        only = "anomalous" if y.any() else "normal"
        raise ValueError(f"{what} needs both normal and anomalous samples; all {y.size} are {only}")
    return s, y


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    s, y = _binary(scores, labels, "AUROC")
    return float(roc_auc_score(y, s))


def auprc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision: Σₙ (Rₙ - Rₙ₋₁) Pₙ over the descending-score thresholds."""
    s, y = _binary(scores, labels, "AUPRC")
    return float(average_precision_score(y, s))


def best_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(best F1, its threshold) over every distinct score used as threshold (anomalous iff ≥ threshold).

    Papers 000/001 report "the best one after traversal threshold". Ties in F1 go to the highest threshold
    (fewest alarms).
    """
    s, y = _binary(scores, labels, "F1")
    precision, recall, thresholds = precision_recall_curve(y, s)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))  # thresholds ascend: last maximum = highest threshold
    return float(f1[best]), float(thresholds[best])


def image_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``auroc``, ``auprc``, ``f1`` and ``f1_threshold`` (anomalous iff score ≥ it) for one test set."""
    f1, threshold = best_f1(scores, labels)
    return {
        "auroc": auroc(scores, labels),
        "auprc": auprc(scores, labels),
        "f1": f1,
        "f1_threshold": threshold,
    }


def pixel_auroc(heatmaps: np.ndarray, masks: np.ndarray, valid: np.ndarray | None = None) -> float:
    """AUROC over every pixel of every image; heatmaps and masks [N, H, W], masks > 0.5 = defect.
    ``valid`` (bool [H, W], a region of interest): only the pixels inside count."""
    heat, defect = _pixels(heatmaps, masks)
    if valid is not None:
        inside = np.broadcast_to(valid, heat.shape)
        heat, defect = heat[inside], defect[inside]
    s, y = _binary(heat, defect, "pixel AUROC")
    return float(roc_auc_score(y, s))


def pro_score(
    heatmaps: np.ndarray,
    masks: np.ndarray,
    max_fpr: float = PRO_MAX_FPR,
    max_thresholds: int = PRO_MAX_THRESHOLDS,
    valid: np.ndarray | None = None,
) -> float:
    """Area under the PRO curve up to ``max_fpr``, divided by ``max_fpr`` (so a perfect map scores 1).

    Ground-truth regions are the 8-connected components of each image's mask (as MVTec AD's own
    evaluation code labels them). At a threshold t, PRO(t) is the mean over all regions of the fraction
    of the region's pixels with heat ≥ t, and FPR(t) the fraction of all defect-free pixels (of every
    image) with heat ≥ t. The curve is integrated with the trapezoid rule in FPR, linearly interpolated
    at exactly ``max_fpr``. ``valid`` (bool [H, W], a region of interest): only the pixels inside count,
    regions included (a defect is cut to its part inside).
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    fpr, pro = pro_curve(heatmaps, masks, max_thresholds, valid)
    return float(np.clip(_area_up_to(fpr, pro, max_fpr) / max_fpr, 0.0, 1.0))


def pro_curve(
    heatmaps: np.ndarray,
    masks: np.ndarray,
    max_thresholds: int = PRO_MAX_THRESHOLDS,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) with FPR ascending, from (0, 0) to (1, 1), one point per candidate threshold.

    A single sweep: every pixel is binned by the highest candidate threshold it reaches (one
    ``searchsorted``), per-bin normal-pixel counts and per-bin region-overlap weights (1 / (area · #regions)
    per defect pixel) are summed with ``bincount``, and reverse cumulative sums give FPR and PRO at every
    threshold at once — O(P log T) time and O(P) memory instead of T full binarisations. The candidates
    are all distinct heat values (exact curve) or, beyond ``max_thresholds`` of them, that many quantiles of
    the heat values (the curve sampled exactly at those thresholds).
    """
    heat, defect = _pixels(heatmaps, masks)
    inside = np.ones(heat.shape, bool) if valid is None else np.broadcast_to(valid, heat.shape)
    defect = defect & inside
    _binary(heat[inside], defect[inside], "PRO")
    regions, n_regions = _regions(defect)
    regions, heat = regions[inside], heat[inside]
    thresholds = _candidates(heat, max_thresholds)
    bins = np.searchsorted(thresholds, heat, side="right") - 1  # pixel reaches thresholds[0..bins]
    normal = regions == 0
    normal_per_bin = np.bincount(bins[normal], minlength=thresholds.size)
    areas = np.bincount(regions, minlength=n_regions + 1).astype(np.float64)
    weights = 1.0 / (areas[regions[~normal]] * n_regions)
    overlap_per_bin = np.bincount(bins[~normal], weights=weights, minlength=thresholds.size)
    fpr = np.cumsum(normal_per_bin[::-1]) / normal.sum()  # thresholds descending → FPR ascending
    pro = np.cumsum(overlap_per_bin[::-1])
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], np.minimum(pro, 1.0)])


def _pixels(heatmaps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps and masks as [N, H, W] (a single [H, W] or [N, 1, H, W] is accepted); masks > 0.5 = defect."""
    heat, defect = np.asarray(heatmaps, np.float64), np.asarray(masks) > 0.5
    heat = heat[:, 0] if heat.ndim == 4 and heat.shape[1] == 1 else heat
    defect = defect[:, 0] if defect.ndim == 4 and defect.shape[1] == 1 else defect
    heat, defect = (heat[None], defect[None]) if heat.ndim == 2 else (heat, defect)
    if heat.ndim != 3 or heat.shape != defect.shape:
        raise ValueError(f"heatmaps {np.shape(heatmaps)} and masks {np.shape(masks)} must both be [N, H, W]")
    return heat, defect


def _regions(defect: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components per image, numbered 1…R across the whole set (0 = defect-free)."""
    out = np.zeros(defect.shape, np.int64)
    structure = np.ones((3, 3), int)  # 8-connectivity
    total = 0
    for i, mask in enumerate(defect):
        labelled, count = ndimage.label(mask, structure=structure)
        out[i] = np.where(labelled > 0, labelled + total, 0)
        total += count
    return out, total


def _candidates(heat: np.ndarray, max_thresholds: int) -> np.ndarray:
    unique = np.unique(heat)
    if unique.size <= max_thresholds:
        return unique
    picked = np.unique(np.quantile(heat, np.linspace(0.0, 1.0, max_thresholds)))
    picked[0] = unique[0]  # every pixel reaches the lowest threshold: the curve ends at (1, 1)
    return picked


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) on [0, limit]; x ascending (repeats allowed), y interpolated at limit."""
    keep = x <= limit
    xs, ys = x[keep], y[keep]
    if xs[-1] < limit:
        after = np.argmax(x > limit)
        x0, x1, y0, y1 = x[after - 1], x[after], y[after - 1], y[after]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        xs, ys = np.append(xs, limit), np.append(ys, y_lim)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))
