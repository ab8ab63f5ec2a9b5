"""Issue 25 item 3: the in-distribution check reads the share of an image's cells unlike the
training cells, so a local defect (a few cells far off) is not "wrong model" while an image
whose every cell has moved is; model.json records the check's kind and a card from before
(channel means) keeps its check. Profiles here are synthetic, laid out as
stfpm.nn.feature_profile lays them out: channel means, then the cells channel-major."""
from __future__ import annotations

import numpy as np
import pytest

from stfpm.model.ood import PROFILES, SHARE_LIMIT, InDistribution

CHANNELS, CELLS, MEANS = 6, 64, 10


def _profiles(rng, n: int, shift: float = 0.0, share: float = 0.0) -> np.ndarray:
    """n profiles; `shift` added to every channel of the first `share` of each image's cells,
    correlated channels as real features are."""
    mixing = np.eye(CHANNELS) + 0.5
    cells = rng.normal(size=(n, CELLS, CHANNELS)) @ mixing
    k = int(round(CELLS * share))
    cells[:, :k] += shift
    means = rng.normal(size=(n, MEANS)) + shift * share
    return np.concatenate([means, cells.transpose(0, 2, 1).reshape(n, -1)], axis=1)


def test_a_local_defect_is_in_distribution_and_a_changed_image_is_not():
    rng = np.random.default_rng(0)
    check = InDistribution.fit(_profiles(rng, 200), _profiles(rng, 50), CHANNELS, CELLS)
    assert check.profile == "cell_share" and check.limit == SHARE_LIMIT
    assert (check.score(_profiles(rng, 100)) > 1).mean() == 0            # good images
    assert (check.score(_profiles(rng, 100, 16.0, 0.25)) > 1).mean() == 0  # a quarter of the image far off
    assert (check.score(_profiles(rng, 100, 16.0, 0.9)) > 1).all()        # most of it: another product
    legacy = InDistribution.fit(_profiles(rng, 200), _profiles(rng, 50), CHANNELS, CELLS, profile="channel_mean")
    assert (legacy.score(_profiles(rng, 100, 16.0, 0.25)) > 1).all()      # the channel means took the defect for ood


def test_the_stored_check_says_its_kind_and_a_card_from_before_keeps_its_own():
    rng = np.random.default_rng(1)
    check = InDistribution.fit(_profiles(rng, 100), _profiles(rng, 30), CHANNELS, CELLS)
    stored = check.to_dict()
    assert stored["profile"] == "cell_share" and stored["cells"] == CELLS and np.shape(stored["std"]) == (6, 6)
    probe = _profiles(rng, 5, 3.0, 0.6)
    np.testing.assert_allclose(InDistribution.from_dict(stored).score(probe), check.score(probe))
    before = {"profile": PROFILES["channel_mean"], "distance": "mean squared z-score",  # as issue 13 wrote it
              "mean": [0.0] * MEANS, "std": [1.0] * MEANS, "limit": 4.0}
    old = InDistribution.from_dict(before)
    assert old.profile == "channel_mean"
    np.testing.assert_allclose(old.score(probe), np.mean(probe[:, :MEANS] ** 2, axis=1) / 4.0)
    np.testing.assert_allclose(old.score(probe[:, :MEANS]), old.score(probe))  # an export from before: means only
    with pytest.raises(ValueError, match="unknown feature profile 'cell_median'"):
        InDistribution.from_dict({**stored, "profile": "cell_median"})
    with pytest.raises(ValueError, match="too few for a check of 64 cells of 6 channels"):
        check.score(probe[:, :MEANS])  # a means-only profile cannot feed a cell check
