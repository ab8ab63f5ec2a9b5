"""The in-distribution check: does an image look like the model's training images at all?

A model that never saw anything like an image can score it low and call it OK (a real
bottle photo through a model of synthetic textures scores below every good texture). The
forward already returns a small feature profile per image (`stfpm.nn.feature_profile`: the
channel means of the teacher's tapped feature maps, then its deepest map averaged over an
8 x 8 grid of cells). The check asks how much of the image is unlike the training images:

- "cell_share" (training writes it since issue 25): training stores the mean and the
  whitening matrix (Cholesky factor of the shrunk inverse covariance) of the training split's
  cells and a cell's normal level, the 0.999 quantile of the held-out good images' cell
  distances (Mahalanobis, per channel); an image's distance is the share of its cells above
  that level. A defect covers a few cells, a wrong category or a
  changed camera nearly all of them, so real defects are not taken for "wrong model"
  (bench/RESULTS.md). The limit is half the image (or more, when held-out good images come
  near it): `ood_score` = share / limit.
- "channel_mean" (cards written before it): the image's channel means against the training
  split's, distance the mean squared z-score, limit MARGIN x the largest held-out distance.
  A large defect moves the means, so it flagged up to half of bottle's defects.

`ood` = ood_score > 1. The check's kind is recorded in model.json (`profile`); directories
and exports from before keep loading and scoring as they did.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MARGIN = 2.5            # limit = MARGIN x the largest held-out distance (bench/RESULTS.md)
SPREAD_FLOOR = 0.01     # per-channel variance floor, as a fraction of the mean variance
CELL_LEVEL_QUANTILE = 0.999  # a cell is unlike training above this quantile of held-out cells' distances
SHARE_LIMIT = 0.5            # ood when more than this share of the image's cells is unlike training
SHARE_CAP = 0.95             # the limit never rises above this, however spread the held-out images are
SHRINK = 0.1                 # the cells' covariance is shrunk this far towards its mean variance (well-conditioned)
PROFILES = {"channel_mean": "channel means of the teacher's tapped features",
            "cell_share": "share of the 8x8 cells of the teacher's deepest tap unlike the training images' cells"}
PROFILE = "cell_share"             # what training fits
LEGACY_PROFILE = "channel_mean"    # what a card without a profile name holds


def profile_of(stored: dict) -> str:
    """The kind of a stored check (model.json `threshold.ood`): its `profile` is the name, or
    in cards from before names the description of the channel means."""
    text = stored.get("profile")
    if text is None or text == PROFILES[LEGACY_PROFILE]:
        return LEGACY_PROFILE
    if text not in PROFILES:
        raise ValueError(f"unknown feature profile {text!r}; this stfpm knows {', '.join(PROFILES)}")
    return text


@dataclass(frozen=True, eq=False)
class InDistribution:
    mean: np.ndarray    # (D,) training profiles' (or cells') mean
    std: np.ndarray     # (D,) channel_mean: their spread, floored so a constant channel cannot dominate;
                        # cell_share: (D, D) whitening matrix, z = (x - mean) @ std
    limit: float        # distance at which ood_score = 1
    profile: str = LEGACY_PROFILE  # PROFILES
    cells: int = 0      # cell_share: cells per image (the profile's last cells * D values)
    level: float = 0.0  # cell_share: a cell's distance above which it is unlike training

    @classmethod
    def fit(cls, train_profiles: np.ndarray, holdout_profiles: np.ndarray, channels: int, cells: int,
            profile: str = PROFILE, margin: float = MARGIN) -> InDistribution:
        """Statistics of the forward's `train_profiles`, level and limit from
        `holdout_profiles` (good images the statistics were not fitted on). `channels`: the
        deepest tap's channels, `cells`: its cells per image (stfpm.nn.feature_profile)."""
        if profile == LEGACY_PROFILE:
            train = np.asarray(train_profiles, np.float64)
            train = _means(train, train.shape[1] - channels * cells)
            check = cls(train.mean(axis=0), _spread(train), 1.0)
            held = check.distance(holdout_profiles)
            return cls(check.mean, check.std, float(margin * held.max()) if len(held) else float("inf"))
        train = _cells(train_profiles, channels, cells).reshape(-1, channels)
        check = cls(train.mean(axis=0), _whitening(train), 1.0, profile, cells)
        held = check.cell_distances(holdout_profiles)
        level = float(np.quantile(held, CELL_LEVEL_QUANTILE)) if held.size else float("inf")
        shares = (held > level).mean(axis=1) if held.size else np.zeros(0)
        limit = min(SHARE_CAP, max(SHARE_LIMIT, margin * float(shares.max(initial=0.0))))
        return cls(check.mean, check.std, limit, profile, cells, level)

    @classmethod
    def from_dict(cls, stored: dict) -> InDistribution:
        """What `to_dict` wrote (model.json's `threshold.ood`), or a card's from before profile names."""
        profile = profile_of(stored)
        return cls(np.asarray(stored["mean"], np.float64), np.asarray(stored["std"], np.float64),
                   float(stored["limit"]), profile, int(stored.get("cells", 0)), float(stored.get("level", 0.0)))

    def to_dict(self) -> dict:
        if self.profile == LEGACY_PROFILE:
            return {"profile": PROFILES[LEGACY_PROFILE], "distance": "mean squared z-score",
                    "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std], "limit": self.limit}
        return {"profile": self.profile, "profile_doc": PROFILES[self.profile],
                "distance": "share of cells whose Mahalanobis distance per channel is above level",
                "cells": self.cells, "level": self.level, "mean": [float(v) for v in self.mean],
                "std": [[float(v) for v in row] for row in self.std], "limit": self.limit}

    def cell_distances(self, profiles: np.ndarray) -> np.ndarray:
        """cell_share: (N, cells) squared Mahalanobis distance per channel of each cell of each image."""
        z = (_cells(profiles, len(self.mean), self.cells) - self.mean) @ self.std
        return np.mean(z * z, axis=2)

    def distance(self, profiles: np.ndarray) -> np.ndarray:
        """(N,) the share of cells unlike training (cell_share), or the mean squared z-score
        of the channel means (channel_mean), of the forward's profiles."""
        if self.profile == LEGACY_PROFILE:
            z = (_means(profiles, len(self.mean)) - self.mean) / self.std
            return np.mean(z * z, axis=1)
        return (self.cell_distances(profiles) > self.level).mean(axis=1)

    def score(self, profiles: np.ndarray) -> np.ndarray:
        """(N, width) profiles -> (N,) ood scores; above 1 is out of distribution."""
        return self.distance(profiles) / self.limit


def _spread(values: np.ndarray) -> np.ndarray:
    var = values.var(axis=0)
    return np.sqrt(var + SPREAD_FLOOR * var.mean())


def _whitening(values: np.ndarray) -> np.ndarray:
    """(D, D) W with (x - mean) @ W whitened: the Cholesky factor of the inverse of the
    covariance of `values` (rows), shrunk SHRINK towards its mean variance."""
    cov = np.cov(values, rowvar=False)
    cov = (1 - SHRINK) * cov + SHRINK * np.trace(cov) / len(cov) * np.eye(len(cov))
    return np.linalg.cholesky(np.linalg.inv(cov))


def _means(profiles: np.ndarray, width: int) -> np.ndarray:
    """The channel means: the profile's first `width` values (all of an export from before the cells)."""
    return np.asarray(profiles, np.float64)[:, :width]


def _cells(profiles: np.ndarray, channels: int, cells: int) -> np.ndarray:
    """(N, cells, channels): the profile's last channels * cells values, channel-major."""
    profiles = np.asarray(profiles, np.float64)
    if profiles.shape[1] < channels * cells + channels:
        raise ValueError(f"the network's feature profile has {profiles.shape[1]} values, too few for a check of "
                         f"{cells} cells of {channels} channels; re-export the model with this stfpm")
    return profiles[:, -channels * cells:].reshape(len(profiles), channels, cells).transpose(0, 2, 1)
