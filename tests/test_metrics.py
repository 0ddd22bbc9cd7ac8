"""mnemo.training.detection_metrics against values worked out by hand on tiny arrays."""

from __future__ import annotations

import numpy as np
import pytest

from mnemo.training import detection_metrics

SCORES = np.array([0.1, 0.4, 0.35, 0.8])
LABELS = np.array([0, 0, 1, 1])


def test_auroc_perfect_reversed_and_hand_worked():
    y = np.array([0, 0, 1, 1])
    assert detection_metrics.auroc(np.array([0.1, 0.2, 0.8, 0.9]), y) == 1.0
    assert detection_metrics.auroc(np.array([0.9, 0.8, 0.2, 0.1]), y) == 0.0
    # positive/negative pairs: 0.35>0.1 ✓, 0.35>0.4 ✗, 0.8>both ✓✓ → 3/4
    assert detection_metrics.auroc(SCORES, LABELS) == pytest.approx(0.75)


def test_auprc_is_average_precision():
    # descending: 0.8 (TP: P=1, R=.5), 0.4 (FP), 0.35 (TP: P=2/3, R=1) → .5·1 + .5·2/3
    assert detection_metrics.auprc(SCORES, LABELS) == pytest.approx(0.5 + 1 / 3)
    assert detection_metrics.auprc(np.array([0.1, 0.2, 0.8, 0.9]), LABELS) == pytest.approx(1.0)


def test_best_f1_and_its_threshold():
    # t=0.35: TP 2, FP 1 → P=2/3, R=1, F1=0.8; t=0.8: P=1, R=.5 → 2/3; t=0.1: P=.5, R=1 → 2/3
    f1, threshold = detection_metrics.best_f1(SCORES, LABELS)
    assert f1 == pytest.approx(0.8) and threshold == pytest.approx(0.35)
    report = detection_metrics.image_metrics(SCORES, LABELS)
    assert set(report) == {"auroc", "auprc", "f1", "f1_threshold"}
    assert all(0.0 <= v <= 1.0 for v in report.values())


def test_one_class_only_is_a_clear_error():
    with pytest.raises(ValueError, match="both normal and anomalous"):
        detection_metrics.auroc(np.array([0.1, 0.2]), np.array([0, 0]))
    with pytest.raises(ValueError, match="all 2 are anomalous"):
        detection_metrics.image_metrics(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="both normal and anomalous"):
        detection_metrics.pixel_auroc(np.ones((1, 2, 2)), np.zeros((1, 2, 2)))


# One 2×4 image, two regions: A = {0.9, 0.8} (2 px), B = {0.6} (1 px); normal pixels 0.1 0.7 0.2 0.3 0.05.
HEAT = np.array([[[0.9, 0.8, 0.1, 0.7], [0.2, 0.3, 0.05, 0.6]]])
MASK = np.array([[[1, 1, 0, 0], [0, 0, 0, 1]]], bool)


def test_pro_two_regions_by_hand():
    # Thresholds downwards: 0.9 → PRO ½(½+0)=.25, FPR 0; 0.8 → .5, 0; 0.7 → .5, .2; 0.6 → 1, .2; 0.3 → 1, .4.
    # Area to FPR .3: .2·.5 + .1·1 = .2 → normalised by .3 → 2/3.
    fpr, pro = detection_metrics.pro_curve(HEAT, MASK)
    assert fpr[0] == 0 and pro[0] == 0 and fpr[-1] == pytest.approx(1) and pro[-1] == pytest.approx(1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)
    assert detection_metrics.pro_score(HEAT, MASK) == pytest.approx(2 / 3)
    # on [0, .2] the region mean is ½ (A half-found, B missed); a pixel-weighted overlap would be 1/3
    assert detection_metrics.pro_score(HEAT, MASK, max_fpr=0.2) == pytest.approx(0.1 / 0.2)


def test_pro_regions_are_per_image_and_eight_connected():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region
    masks[1, 2:, 2:] = True  # a second image, a second region
    heat = masks.astype(float)
    heat[0, 1, 1] = 0.0  # half of region 1 missed at every threshold above 0
    # At FPR 0 the PRO is mean(½, 1) = .75 (4-connectivity would give mean(1, 0, 1) = 2/3).
    fpr, pro = detection_metrics.pro_curve(heat, masks)
    assert pro[fpr == 0].max() == pytest.approx(0.75)


def test_pro_perfect_and_capped_thresholds():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 16, 16), bool)
    masks[:, 4:8, 4:8] = True
    heat = rng.random(masks.shape) * 0.5 + masks
    assert detection_metrics.pro_score(heat, masks) == pytest.approx(1.0)
    assert detection_metrics.pixel_auroc(heat, masks) == pytest.approx(1.0)
    noisy = rng.random(masks.shape) + 0.3 * masks
    exact = detection_metrics.pro_score(noisy, masks)
    capped = detection_metrics.pro_score(noisy, masks, max_thresholds=200)
    assert 0.0 < exact < 1.0 and capped == pytest.approx(exact, abs=0.02)


def test_pixel_auroc_by_hand():
    # defect heats {.9,.8,.6} vs normal {.1,.7,.2,.3,.05}: 15 pairs, only .6<.7 lost → 14/15
    assert detection_metrics.pixel_auroc(HEAT, MASK) == pytest.approx(14 / 15)
    # [N, 1, H, W] too
    assert detection_metrics.pixel_auroc(HEAT[:, None], MASK[:, None]) == pytest.approx(14 / 15)
    with pytest.raises(ValueError, match="must both be"):
        detection_metrics.pixel_auroc(HEAT, MASK[:, :1])
