"""Build the bundle's ``Calibration`` record from scores of held-out images.

The numbers themselves (threshold rule, quantiles, p-values) live in the torch-free ``mnemo.calibration``
so that the service computes p-values exactly as they were defined here; this module only gathers them,
adding the best-F1 threshold when labelled anomalies exist (``training.detection_metrics.best_f1``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mnemo.calibration import DEFAULT_PIXEL_FALSE_ALARM_RATE, N_QUANTILES, Calibration, calibrate_normal
from mnemo.training import detection_metrics


def calibrate(
    normal_scores: np.ndarray,
    *,
    false_alarm_rate: float = 0.01,
    n_quantiles: int = N_QUANTILES,
    scores: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    normal_heatmaps: np.ndarray | None = None,
    pixel_false_alarm_rate: float = DEFAULT_PIXEL_FALSE_ALARM_RATE,
) -> Calibration:
    """Threshold for ``false_alarm_rate`` on held-out normal scores (``mnemo.calibration``), their stored
    distribution, and — when ``scores``/``labels`` hold both classes — the best-F1 threshold on them.
    With ``normal_heatmaps`` the pixel level too (regions, heatmap colours) at ``pixel_false_alarm_rate``.

    ``detection_metrics.best_f1`` reports t* for the rule "score ≥ t*"; it is stored for Mnemo's rule
    "score > threshold" as the largest labelled score below t* (the same decisions on that set), or, when
    t* is the lowest score, as the next float below it.
    """
    calibration = calibrate_normal(
        normal_scores, false_alarm_rate, normal_heatmaps, pixel_false_alarm_rate, n_quantiles
    )
    if scores is None or labels is None:
        return calibration
    y = np.asarray(labels).ravel()
    if not 0 < y.sum() < y.size:
        return calibration
    best, t_star = detection_metrics.best_f1(scores, y)
    best_threshold = strict_threshold(np.asarray(scores, np.float64), t_star)
    return dataclasses.replace(calibration, best_f1_threshold=best_threshold, best_f1=best)


def strict_threshold(scores: np.ndarray, t_star: float) -> float:
    """A threshold t with ``score > t`` ⇔ ``score ≥ t_star`` for every score in ``scores``."""
    below = scores[scores < t_star]
    return float(below.max()) if below.size else float(np.nextafter(t_star, -np.inf))
