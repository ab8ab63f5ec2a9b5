"""The in-distribution check: does an image look like the model's training images at all?

A model that never saw anything like an image can score it low and call it OK (a real
bottle photo through a model of synthetic textures scores below every good texture). The
forward already returns a small feature profile per image (for STFPM the channel means of
the teacher's tapped feature maps); training stores the per-channel mean and spread of the
training split's profiles. An image's distance is the mean squared z-score of its profile;
`ood_score` is that distance over the limit, a margin above the largest distance of the
held-out good images (which the statistics were not fitted on), and `ood` = ood_score > 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MARGIN = 2.5            # limit = MARGIN x the largest held-out distance (bench/RESULTS.md)
SPREAD_FLOOR = 0.01     # per-channel variance floor, as a fraction of the mean variance


@dataclass(frozen=True, eq=False)
class InDistribution:
    mean: np.ndarray    # (D,) training profiles' mean
    std: np.ndarray     # (D,) their spread, floored so a constant channel cannot dominate
    limit: float        # distance at which ood_score = 1

    @classmethod
    def fit(cls, train_profiles: np.ndarray, holdout_profiles: np.ndarray, margin: float = MARGIN) -> InDistribution:
        train = np.asarray(train_profiles, np.float64)
        var = train.var(axis=0)
        check = cls(train.mean(axis=0), np.sqrt(var + SPREAD_FLOOR * var.mean()), 1.0)
        held = check.distance(holdout_profiles)
        return cls(check.mean, check.std, float(margin * held.max()) if len(held) else float("inf"))

    @classmethod
    def from_dict(cls, stored: dict) -> InDistribution:
        """What `to_dict` wrote (model.json's `threshold.ood`)."""
        return cls(np.asarray(stored["mean"], np.float64), np.asarray(stored["std"], np.float64),
                   float(stored["limit"]))

    def to_dict(self) -> dict:
        return {"profile": "channel means of the teacher's tapped features", "distance": "mean squared z-score",
                "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std], "limit": self.limit}

    def distance(self, profiles: np.ndarray) -> np.ndarray:
        z = (np.asarray(profiles, np.float64) - self.mean) / self.std
        return np.mean(z * z, axis=1)

    def score(self, profiles: np.ndarray) -> np.ndarray:
        """(N, D) profiles -> (N,) ood scores; above 1 is out of distribution."""
        return self.distance(profiles) / self.limit
