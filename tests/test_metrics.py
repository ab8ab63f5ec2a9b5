import cv2
import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score

from stfpm.metrics import PixelMetrics, aupro_exact, auroc, f1_max


def image_scores(seed: int, with_ties: bool):
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.3
    scores = rng.lognormal(-2.0, 1.0, 200) * np.where(labels, 3.0, 1.0)
    return labels, np.round(scores, 1) if with_ties else scores


def blob_maps(seed: int, with_ties: bool, n_images: int = 20, size: int = 64):
    """Lognormal score maps; most images get a few random discs (touching ones merge into one
    region) whose pixels score higher; rounding makes ties and exact zeros."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for _ in range(n_images):
        mask = np.zeros((size, size), np.uint8)
        for _ in range(rng.integers(0, 4)):
            center = tuple(int(c) for c in rng.integers(0, size, 2))
            cv2.circle(mask, center, int(rng.integers(1, 8)), 255, thickness=-1)
        anomaly_map = rng.lognormal(-3.0, 1.0, (size, size)) * np.where(mask > 0, 4.0, 1.0)
        maps.append(np.round(anomaly_map, 3) if with_ties else anomaly_map)
        masks.append(mask)
    return maps, masks


@pytest.mark.parametrize("with_ties", [False, True])
def test_auroc_matches_sklearn(with_ties):
    labels, scores = image_scores(0, with_ties)
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_of_separating_scores():
    labels = np.array([0, 0, 0, 1, 1])
    assert auroc(labels, [0.1, 0.2, 0.3, 0.4, 0.5]) == 1.0
    assert auroc(labels, [0.5, 0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auroc(labels, [1.0] * 5) == 0.5


def test_auroc_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        auroc([1, 1, 1], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("with_ties", [False, True])
def test_f1_max_matches_precision_recall_curve(with_ties):
    labels, scores = image_scores(1, with_ties)
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        expected = np.nanmax(2 * precision * recall / (precision + recall))
    f1, threshold = f1_max(labels, scores)
    assert f1 == pytest.approx(expected, abs=1e-12)
    assert f1_score(labels, scores >= threshold) == pytest.approx(f1, abs=1e-12)


def test_f1_max_of_separating_scores():
    assert f1_max([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == (1.0, 0.3)


@pytest.mark.parametrize("with_ties", [False, True])
def test_binned_pixel_metrics_match_exact(with_ties):
    maps, masks = blob_maps(2, with_ties)
    metrics = PixelMetrics()
    for anomaly_map, mask in zip(maps, masks):
        metrics.update(anomaly_map, mask)
    labels = np.concatenate([m.ravel() > 0 for m in masks])
    scores = np.concatenate([m.ravel() for m in maps])
    assert metrics.n_images == 20
    assert metrics.pixel_auroc() == pytest.approx(roc_auc_score(labels, scores), abs=1e-3)
    for fpr_limit in (0.3, 0.05):
        exact = aupro_exact(maps, masks, fpr_limit)
        assert metrics.aupro(fpr_limit) == pytest.approx(exact, abs=5e-3)


# Two regions: A (0.9, 0.5) is one region only under 8-connectivity, B (0.7) has one pixel.
# Twelve normal pixels: 0.8, 0.7 and ten at 0.1. Going down in threshold, (FPR, PRO) passes
# (0, 1/4) at 0.9, (1/12, 1/4) at 0.8, (2/12, 3/4) at 0.7 (B and a normal pixel tie: a sloped
# segment), (2/12, 1) at 0.5, (1, 1) at 0.1.
HAND_MAP = np.array([[0.9, 0.8, 0.1, 0.1, 0.7], [0.7, 0.5, 0.1, 0.1, 0.1], [0.1] * 5])
HAND_MASK = np.array([[255, 0, 0, 0, 255], [0, 255, 0, 0, 0], [0] * 5], np.uint8)
# Up to 0.3: 1/12 * 1/4 + 1/12 * (1/4 + 3/4) / 2 + (0.3 - 2/12) * 1 = 47/240, / 0.3 = 47/72.
# Up to 1/8 (PRO 1/2 there, half-way up the slope): 1/48 + 1/24 * (1/4 + 1/2) / 2 = 7/192,
# / (1/8) = 7/24.
HAND_AUPRO = {0.3: 47 / 72, 1 / 8: 7 / 24}


@pytest.mark.parametrize("fpr_limit", HAND_AUPRO)
def test_aupro_by_hand(fpr_limit):
    assert aupro_exact([HAND_MAP], [HAND_MASK], fpr_limit) == pytest.approx(HAND_AUPRO[fpr_limit])
    metrics = PixelMetrics()
    metrics.update(HAND_MAP, HAND_MASK)
    metrics.update(np.full((4, 4), 0.1), np.zeros((4, 4), bool))  # a good image: more FPR mass
    exact = aupro_exact([HAND_MAP, np.full((4, 4), 0.1)], [HAND_MASK, np.zeros((4, 4))], fpr_limit)
    assert metrics.aupro(fpr_limit) == pytest.approx(exact, abs=1e-12)


def test_pixel_metrics_errors():
    metrics = PixelMetrics()
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        metrics.update(np.zeros((4, 4)), np.zeros((4, 5)))
    metrics.update(np.ones((4, 4)), np.zeros((4, 4)))
    for metric in (metrics.pixel_auroc, metrics.aupro):
        with pytest.raises(ValueError, match="both normal and anomalous"):
            metric()
    only_anomalous = PixelMetrics()
    only_anomalous.update(np.ones((4, 4)), np.ones((4, 4)))
    with pytest.raises(ValueError, match="both normal and anomalous"):
        only_anomalous.pixel_auroc()
    with pytest.raises(ValueError, match="both normal and anomalous"):
        aupro_exact([np.ones((4, 4))], [np.zeros((4, 4))])
