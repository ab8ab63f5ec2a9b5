"""The normalised score: a strictly increasing map of raw scores onto [0, 1] with 0.5 at the
threshold, fitted on the calibration (held-out good) images' scores, and its exact inverse.

With r = raw / threshold (raw scores are >= 0: maps are products of distances):

    s = 0.5 * r ** (1 / b)       r <= 1   below the threshold, b fitted on the good images
    s = 1 - 0.5 / r              r >= 1   above: k times the threshold gives 1 - 1 / (2k)

b = log2(threshold / median calibration score) puts the median good image at 0.25. The upper
tail counts multiples of the threshold rather than units of the good images' spread: a
defect's peak is often 5-20x the threshold (the map is a product of three layer maps), and
a tail scaled by the narrow good-score spread reaches 1.0 in 8 bits, and for the largest
scores in float64, long before that (bench/RESULTS.md). Neither piece clips, so every raw
score keeps its rank. A threshold given at inference moves the 0.5 point; b stays.
b is stored in model.json (`threshold.score_scale`, stfpm.model.card.Calibration); a model
trained before it gets b from the midpoint of its stored `score_min` / `score_max`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_LOG_SCALE = 0.05  # b when the median good score is at or above the threshold
KIND = "power_below_inverse_above"


@dataclass(frozen=True)
class ScoreScale:
    log_scale: float                    # b: s halves every b halvings of the raw score below the threshold
    median_good: float | None = None    # the calibration images' median raw score it was fitted on

    @classmethod
    def fit(cls, good_scores, threshold: float) -> ScoreScale:
        return cls.from_median(float(np.median(np.asarray(good_scores, dtype=np.float64))), threshold)

    @classmethod
    def from_median(cls, median_good: float, threshold: float) -> ScoreScale:
        b = math.log2(threshold / median_good) if threshold > 0 and median_good > 0 else 0.0
        return cls(log_scale=max(b, MIN_LOG_SCALE), median_good=float(median_good))

    @classmethod
    def from_range(cls, score_min: float, score_max: float, threshold: float) -> ScoreScale:
        """Models trained before the scale was stored: the range's midpoint stands for the median."""
        return cls.from_median(0.5 * (score_min + score_max), threshold)

    def to_dict(self) -> dict:
        return {"kind": KIND, "log_scale": self.log_scale, "median_good": self.median_good}

    def normalize(self, raw, threshold: float) -> np.ndarray:
        """Raw scores (any shape, e.g. a map) -> normalised scores in [0, 1], 0.5 at `threshold`."""
        r = np.maximum(np.asarray(raw, dtype=np.float64), 0.0) / max(float(threshold), 1e-30)
        return np.where(r <= 1.0, 0.5 * np.minimum(r, 1.0) ** (1.0 / self.log_scale), 1.0 - 0.5 / np.maximum(r, 1.0))

    def to_raw(self, normalized, threshold: float) -> np.ndarray:
        """The exact inverse of `normalize` (0 -> 0, 1 -> inf)."""
        s = np.clip(np.asarray(normalized, dtype=np.float64), 0.0, 1.0)
        with np.errstate(divide="ignore"):
            return float(threshold) * np.where(s <= 0.5, (2.0 * np.minimum(s, 0.5)) ** self.log_scale,
                                               0.5 / (1.0 - np.maximum(s, 0.5)))
