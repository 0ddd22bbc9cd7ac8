"""Decision threshold and p-values from held-out normal scores (numpy only: the service imports it).

The decision rule everywhere in Mnemo: an image is **anomalous iff score > threshold**.

* Threshold for a target false-alarm rate α: the (1-α) empirical quantile by the *inverted CDF* rule, i.e.
  the order statistic s₍ₖ₎ with k = ⌈(1-α)·n⌉ (1-based) of the n held-out normal scores. No interpolation:
  the threshold is an observed score, and because the rule is strict, at most ⌊α·n⌋ held-out normal
  scores exceed it (ties at the threshold are never flagged), so the held-out false-alarm rate is ≤ α.
* Stored distribution: the sorted scores themselves when n ≤ ``N_QUANTILES`` (exact), otherwise
  ``N_QUANTILES`` evenly spaced quantiles (numpy's default linear rule) — a fixed-size manifest entry.
* p-value of a new score s: (k + 1) / (n + 1) with k = #{held-out normal scores ≥ s}. The +1 is the
  conformal correction: under exchangeability P(p ≤ u) ≤ u for a new normal image, and p is never 0
  (a score above every normal one gets 1/(n+1), not an impossible "0 % chance"). From compressed
  quantiles k is estimated by inverting the stored quantile function linearly (see ``p_value``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

N_QUANTILES = 1001
PIXEL_QUANTILES = 101  # percentiles of the normal pixel scores: a fixed-size manifest entry
DEFAULT_PIXEL_FALSE_ALARM_RATE = 1e-4  # ~1.6 flagged pixels per normal 128 px map: regions stay rare


def _finite(value: Any, what: str) -> float:
    """``value`` as a float when it is a finite real number; a manifest's NaN threshold would let every
    image through, and a string would fail each request instead of the bundle's load."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what} must be finite numbers, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class PixelCalibration:
    """The normal pixels' scores: ``threshold`` flags a share ``false_alarm_rate`` of them (strict ``>``,
    as for images); ``quantiles`` are their percentiles 0, 1, … 100 over ``n_images`` heatmaps."""

    threshold: float
    false_alarm_rate: float
    quantiles: tuple[float, ...]
    n_images: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _finite(self.threshold, "pixel threshold"))
        object.__setattr__(self, "quantiles", tuple(_finite(q, "pixel quantiles") for q in self.quantiles))
        if self.n_images < 1 or len(self.quantiles) != PIXEL_QUANTILES:
            raise ValueError(f"a pixel calibration needs {PIXEL_QUANTILES} quantiles of at least one heatmap")

    @property
    def scale(self) -> tuple[float, float]:
        """Heatmap colours: the normal median at the cold end, the region level at the hot end, so a
        normal part looks calm and anything a region would flag saturates."""
        low = self.quantiles[PIXEL_QUANTILES // 2]
        return low, max(self.threshold, low)

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": float(self.threshold),
            "false_alarm_rate": float(self.false_alarm_rate),
            "quantiles": list(self.quantiles),
            "n_images": int(self.n_images),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PixelCalibration:
        missing = sorted({"threshold", "false_alarm_rate", "quantiles", "n_images"} - set(raw))
        if missing:
            raise ValueError(f"pixel calibration is missing key(s) {missing}")
        return cls(raw["threshold"], raw["false_alarm_rate"], raw["quantiles"], raw["n_images"])


def pixel_calibration(
    normal_heatmaps: np.ndarray, rate: float = DEFAULT_PIXEL_FALSE_ALARM_RATE
) -> PixelCalibration:
    """From held-out normal heatmaps [N, H, W] (any shape with N first): region level and percentiles."""
    heat = np.asarray(normal_heatmaps)
    pixels = heat.reshape(len(heat), -1) if heat.ndim > 1 else heat[None]
    return PixelCalibration(
        threshold=threshold_for_false_alarm_rate(pixels, rate),
        false_alarm_rate=float(rate),
        quantiles=tuple(np.quantile(_clean(pixels), np.linspace(0.0, 1.0, PIXEL_QUANTILES)).tolist()),
        n_images=len(pixels),
    )


@dataclass(frozen=True)
class Calibration:
    """What the bundle manifest stores about thresholding. ``method`` says how ``threshold`` was chosen:
    ``"false_alarm_rate"`` with ``target`` = α. ``best_f1_threshold`` (same strict ``>`` rule) is set when
    labelled anomalies were available, with the F1 it reached."""

    threshold: float
    method: str
    target: float
    quantiles: tuple[float, ...]
    n: int
    best_f1_threshold: float | None = None
    best_f1: float | None = None
    pixel: PixelCalibration | None = None  # None in bundles exported before issue 14

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _finite(self.threshold, "threshold"))
        object.__setattr__(self, "quantiles", tuple(_finite(q, "quantiles") for q in self.quantiles))
        if isinstance(self.pixel, dict):
            object.__setattr__(self, "pixel", PixelCalibration.from_dict(self.pixel))
        if self.n < 1 or not self.quantiles:
            raise ValueError("a calibration needs at least one normal score")
        if any(b < a for a, b in zip(self.quantiles, self.quantiles[1:])):
            raise ValueError("quantiles must be sorted ascending")

    def is_anomalous(self, score: float) -> bool:
        return bool(is_anomalous(score, self.threshold))

    def p_value(self, score: float | np.ndarray) -> float | np.ndarray:
        return p_value(score, self.quantiles, self.n)

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": float(self.threshold),
            "method": self.method,
            "target": float(self.target),
            "quantiles": list(self.quantiles),
            "n": int(self.n),
            "best_f1_threshold": self.best_f1_threshold,
            "best_f1": self.best_f1,
            **({"pixel": self.pixel.to_dict()} if self.pixel else {}),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Calibration:
        known = {f for f in cls.__dataclass_fields__}
        missing = sorted({"threshold", "method", "target", "quantiles", "n"} - set(raw))
        if missing:
            raise ValueError(f"calibration is missing key(s) {missing}")
        return cls(**{k: v for k, v in raw.items() if k in known})


def calibrate_normal(
    normal_scores: np.ndarray,
    false_alarm_rate: float,
    normal_heatmaps: np.ndarray | None = None,
    pixel_false_alarm_rate: float = DEFAULT_PIXEL_FALSE_ALARM_RATE,
    n_quantiles: int = N_QUANTILES,
) -> Calibration:
    """The calibration good images alone give: threshold, stored distribution, and with their heatmaps
    the pixel level (``training.calibration.calibrate`` adds the best-F1 threshold of a labelled set)."""
    normal = _clean(normal_scores)
    return Calibration(
        threshold=threshold_for_false_alarm_rate(normal, false_alarm_rate),
        method="false_alarm_rate",
        target=float(false_alarm_rate),
        quantiles=tuple(normal_quantiles(normal, n_quantiles).tolist()),
        n=int(normal.size),
        pixel=None if normal_heatmaps is None else pixel_calibration(normal_heatmaps, pixel_false_alarm_rate),
    )


def is_anomalous(scores: float | np.ndarray, threshold: float) -> bool | np.ndarray:
    """Mnemo's decision rule, anomalous iff score > threshold, element-wise. Strict: a score tied with the
    threshold (itself an observed normal score) is normal, which is what bounds the false-alarm rate by α."""
    flagged = np.asarray(scores) > threshold
    return bool(flagged) if flagged.ndim == 0 else flagged


def threshold_for_false_alarm_rate(normal_scores: np.ndarray, rate: float) -> float:
    """s₍ₖ₎ with k = ⌈(1 - rate)·n⌉ (inverted-CDF quantile); with ``score > threshold`` at most
    ⌊rate·n⌋ of these scores are flagged. ``rate`` = 0 gives the maximum normal score."""
    scores = _clean(normal_scores)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"false-alarm rate must be in [0, 1), got {rate}")
    n = scores.size
    k = max(1, math.ceil(round((1.0 - rate) * n, 9)))  # round: 0.99·100 must be 99, not 99.00000000000001
    return float(np.sort(scores)[k - 1])


def too_few_for_rate(n: int, rate: float) -> str | None:
    """A warning when ``n`` good images cannot resolve the false-alarm ``rate`` (n·rate < 1), else None.

    Then ``threshold_for_false_alarm_rate`` is their largest score, and by exchangeability a new good
    image scores above the largest of ``n`` with probability 1/(n+1): that, not ``rate``, is the false-alarm
    rate to expect (a small training folder keeps only a few images for calibration)."""
    if rate <= 0.0 or n * rate >= 1.0:
        return None
    images, largest = ("1 good image", "its score") if n == 1 else (f"{n} good images", "their largest score")
    return (
        f"the threshold was calibrated on {images}, too few for a false-alarm rate of {rate:g} (that needs "
        f"{math.ceil(1 / rate)}): it is {largest}, so expect about {1 / (n + 1):.0%} of new good images to "
        "be flagged; calibrate on more good images"
    )


def normal_quantiles(normal_scores: np.ndarray, n_points: int = N_QUANTILES) -> np.ndarray:
    """Sorted scores when there are at most ``n_points`` of them, else quantiles at i/(n_points-1)."""
    scores = np.sort(_clean(normal_scores))
    if scores.size <= n_points:
        return scores
    return np.quantile(scores, np.linspace(0.0, 1.0, n_points))


def p_value(
    score: float | np.ndarray, quantiles: np.ndarray | tuple[float, ...], n: int
) -> float | np.ndarray:
    """(k + 1) / (n + 1), k = number of the n held-out normal scores ≥ ``score``; in (0, 1], non-increasing.

    Exact when ``len(quantiles) == n`` (the sorted scores were stored). Otherwise the fraction of normal
    scores strictly below ``score`` is read off the stored quantile function q(pᵢ), pᵢ = i/(m-1): linearly
    interpolated between neighbouring quantiles, and at a run of tied quantiles the smallest pᵢ of the run;
    then k = n · (1 - fraction), which need not be an integer.
    """
    q = np.asarray(quantiles, np.float64)
    s = np.asarray(score, np.float64)
    k = n - np.searchsorted(q, s, side="left") if q.size == n else n * (1.0 - _fraction_below(q, s))
    result = (k + 1.0) / (n + 1.0)
    return float(result) if result.ndim == 0 else result


def _fraction_below(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    probs = np.linspace(0.0, 1.0, q.size)
    left = np.searchsorted(q, s, side="left")
    right = np.searchsorted(q, s, side="right")
    lo = np.clip(left - 1, 0, q.size - 1)
    hi = np.clip(left, 0, q.size - 1)
    span = np.where(q[hi] > q[lo], q[hi] - q[lo], 1.0)
    between = probs[lo] + (probs[hi] - probs[lo]) * np.clip((s - q[lo]) / span, 0.0, 1.0)
    tied = probs[np.clip(left, 0, q.size - 1)]
    frac = np.where(right > left, tied, between)
    frac = np.where(s < q[0], 0.0, frac)
    return np.where(s > q[-1], 1.0, frac)


def _clean(scores: np.ndarray) -> np.ndarray:
    arr = np.asarray(scores, np.float64).ravel()
    if arr.size == 0:
        raise ValueError("no normal scores to calibrate on")
    if not np.all(np.isfinite(arr)):
        raise ValueError("normal scores contain NaN or infinity")
    return arr
