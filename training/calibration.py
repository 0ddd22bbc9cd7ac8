"""Build the bundle's ``Calibration`` record from scores of held-out images.

The numbers themselves (threshold rule, quantiles, p-values) live in the torch-free ``mnemo.calibration``
so that the service computes p-values exactly as they were defined here; this module only gathers them,
adding the best-F1 threshold when labelled anomalies exist (``training.detection_metrics.best_f1``).
"""

from __future__ import annotations

import numpy as np

from mnemo.calibration import N_QUANTILES, Calibration, normal_quantiles, threshold_for_false_alarm_rate
from mnemo.training import detection_metrics


def calibrate(
    normal_scores: np.ndarray,
    *,
    false_alarm_rate: float = 0.01,
    n_quantiles: int = N_QUANTILES,
    scores: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> Calibration:
    """Threshold for ``false_alarm_rate`` on held-out normal scores (``mnemo.calibration``), their stored
    distribution, and — when ``scores``/``labels`` hold both classes — the best-F1 threshold on them.

    ``detection_metrics.best_f1`` reports t* for the rule "score ≥ t*"; it is stored for Mnemo's rule
    "score > threshold" as the largest labelled score below t* (the same decisions on that set), or, when
    t* is the lowest score, as the next float below it.
    """
    normal = np.asarray(normal_scores, np.float64).ravel()
    best_threshold, best = None, None
    if scores is not None and labels is not None:
        y = np.asarray(labels).ravel()
        if 0 < y.sum() < y.size:
            best, t_star = detection_metrics.best_f1(scores, y)
            best_threshold = strict_threshold(np.asarray(scores, np.float64), t_star)
    return Calibration(
        threshold=threshold_for_false_alarm_rate(normal, false_alarm_rate),
        method="false_alarm_rate",
        target=float(false_alarm_rate),
        quantiles=tuple(normal_quantiles(normal, n_quantiles).tolist()),
        n=int(normal.size),
        best_f1_threshold=best_threshold,
        best_f1=best,
    )


def strict_threshold(scores: np.ndarray, t_star: float) -> float:
    """A threshold t with ``score > t`` ⇔ ``score ≥ t_star`` for every score in ``scores``."""
    below = scores[scores < t_star]
    return float(below.max()) if below.size else float(np.nextafter(t_star, -np.inf))
