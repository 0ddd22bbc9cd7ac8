"""mnemo.calibration (numpy-only) and training.calibration on known distributions and small hand cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mnemo.calibration import (
    PIXEL_QUANTILES,
    Calibration,
    PixelCalibration,
    is_anomalous,
    normal_quantiles,
    p_value,
    threshold_for_false_alarm_rate,
    too_few_for_rate,
)
from mnemo.training.calibration import calibrate


def test_threshold_at_one_percent_on_uniform():
    scores = np.random.default_rng(0).uniform(size=10_000)
    threshold = threshold_for_false_alarm_rate(scores, 0.01)
    assert threshold == pytest.approx(0.99, abs=0.005)
    assert is_anomalous(scores, threshold).mean() <= 0.01
    assert threshold == np.sort(scores)[9899]  # s₍₉₉₀₀₎: an observed score, no interpolation


def test_threshold_rule_on_small_cases():
    scores = np.arange(1.0, 11.0)  # 1…10
    assert threshold_for_false_alarm_rate(scores, 0.1) == 9.0  # k = ⌈.9·10⌉ = 9 → only 10 is flagged
    assert threshold_for_false_alarm_rate(scores, 0.15) == 9.0  # k = ⌈8.5⌉ = 9: never above the target
    assert threshold_for_false_alarm_rate(scores, 0.0) == 10.0
    assert threshold_for_false_alarm_rate([5.0, 5.0, 5.0, 1.0], 0.25) == 5.0  # ties at t are not flagged
    with pytest.raises(ValueError, match="no normal scores"):
        threshold_for_false_alarm_rate([], 0.01)


def test_too_few_good_images_for_the_rate_are_warned_about_with_the_rate_to_expect():
    assert too_few_for_rate(100, 0.01) is None and too_few_for_rate(10, 0.1) is None
    assert too_few_for_rate(5, 0.0) is None  # rate 0 asks for the maximum anyway
    warning = too_few_for_rate(4, 0.01)
    assert "4 good images" in warning and "needs 100" in warning and "20%" in warning
    # what it promises: with 4 calibration images the threshold is their maximum, and a fifth good image
    # from the same distribution lands above it one time in five (not one in a hundred)
    rng = np.random.default_rng(0)
    trials = rng.normal(size=(20_000, 5))
    flagged = [is_anomalous(t[4], threshold_for_false_alarm_rate(t[:4], 0.01)) for t in trials]
    assert np.mean(flagged) == pytest.approx(1 / 5, abs=0.01)


def test_p_values_exact_by_hand():
    q = normal_quantiles(np.array([3.0, 1.0, 2.0]))
    assert q.tolist() == [1.0, 2.0, 3.0]
    # k = #{normal ≥ s}; p = (k + 1) / 4
    assert p_value(0.0, q, 3) == 1.0
    assert p_value(2.0, q, 3) == pytest.approx(3 / 4)
    assert p_value(2.5, q, 3) == pytest.approx(2 / 4)
    assert p_value(9.0, q, 3) == pytest.approx(1 / 4)


def test_p_values_monotone_in_range_and_close_to_the_tail_when_compressed():
    scores = np.random.default_rng(1).normal(size=20_000)
    cal = calibrate(scores, false_alarm_rate=0.05)
    assert len(cal.quantiles) == 1001 and cal.n == 20_000
    grid = np.linspace(-6, 6, 2001)
    p = cal.p_value(grid)
    assert np.all(np.diff(p) <= 1e-12) and p.min() > 0 and p.max() <= 1.0
    assert p[0] == 1.0 and p[-1] == pytest.approx(1 / 20_001)
    for s in (-1.0, 0.0, 1.0, 2.0):  # matches the exact tail fraction it compresses
        exact = ((scores >= s).sum() + 1) / 20_001
        assert cal.p_value(s) == pytest.approx(exact, abs=2e-3)
    assert cal.p_value(cal.threshold) == pytest.approx(0.05, abs=2e-3)


def test_calibrate_with_labelled_anomalies_uses_strict_rule():
    normal = np.linspace(0.0, 1.0, 101)
    scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    cal = calibrate(normal, scores=scores, labels=labels)
    assert cal.best_f1 == pytest.approx(0.8)  # best F1 at "score ≥ 0.35"
    assert cal.best_f1_threshold == pytest.approx(0.1)  # same decisions as "score > 0.1"
    assert ((scores > cal.best_f1_threshold) == (scores >= 0.35)).all()
    assert calibrate(normal, scores=scores, labels=np.zeros(4)).best_f1_threshold is None


def test_verdict_rule_is_strict_and_element_wise():
    assert is_anomalous(np.array([0.5, 1.0, 1.5]), 1.0).tolist() == [False, False, True]
    assert is_anomalous(1.0 + 1e-12, 1.0) is True and is_anomalous(1.0, 1.0) is False


def test_round_trip_through_json():
    cal = calibrate(np.random.default_rng(2).gamma(2.0, size=500), false_alarm_rate=0.02)
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back == cal and back.method == "false_alarm_rate" and back.target == 0.02
    assert back.is_anomalous(cal.threshold + 1e-9) and not back.is_anomalous(cal.threshold)
    with pytest.raises(ValueError, match="missing"):
        Calibration.from_dict({"threshold": 1.0})


def test_pixel_level_flags_at_most_its_share_of_normal_pixels_and_round_trips():
    heat = np.random.default_rng(3).gamma(2.0, size=(40, 16, 16))
    cal = calibrate(
        heat.max(axis=(1, 2)), false_alarm_rate=0.05, normal_heatmaps=heat, pixel_false_alarm_rate=1e-3
    )
    pixel = cal.pixel
    assert pixel.n_images == 40 and len(pixel.quantiles) == PIXEL_QUANTILES
    flagged = np.mean(heat > pixel.threshold)
    assert 0 < flagged <= 1e-3  # 10 of 10240 pixels: exactly the share asked for, never more
    assert pixel.quantiles[0] == heat.min() and pixel.quantiles[-1] == heat.max()
    vmin, vmax = pixel.scale
    assert vmin == pytest.approx(np.median(heat)) and vmax == pixel.threshold
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back == cal and isinstance(back.pixel, PixelCalibration)
    assert calibrate(heat.max(axis=(1, 2))).pixel is None  # old-style record: no pixel key at all
    assert "pixel" not in calibrate(heat.max(axis=(1, 2))).to_dict()
    with pytest.raises(ValueError, match="pixel calibration is missing"):
        Calibration.from_dict({**cal.to_dict(), "pixel": {"threshold": 1.0}})
