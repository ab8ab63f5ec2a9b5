"""Issue 25 item 3: the in-distribution check reads the share of an image's cells unlike the
training cells, so a local defect (a few cells far off) is not "wrong model" while an image
whose every cell has moved is, and the per-channel median over the cells, so another texture
whose cells one by one pass for training cells is "wrong model" too; model.json records the check's kind and a card from before
(channel means) keeps its check. Profiles here are synthetic, laid out as
stfpm.nn.feature_profile lays them out: channel means, then the cells channel-major."""
from __future__ import annotations

import numpy as np
import pytest

from stfpm.model.ood import PROFILE, PROFILES, SHARE_LIMIT, InDistribution

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
    assert check.profile == PROFILE == "cell_median" and check.limit == SHARE_LIMIT
    assert (check.score(_profiles(rng, 100)) > 1).mean() == 0            # good images
    assert (check.score(_profiles(rng, 100, 24.0, 0.15)) > 1).mean() == 0  # a seventh of the image far off
    assert (check.score(_profiles(rng, 100, 16.0, 0.9)) > 1).all()        # most of it: another product
    legacy = InDistribution.fit(_profiles(rng, 200), _profiles(rng, 50), CHANNELS, CELLS, profile="channel_mean")
    assert (legacy.score(_profiles(rng, 100, 24.0, 0.15)) > 1).all()      # the channel means took the defect for ood


def test_another_texture_whose_cells_each_look_normal_is_flagged():
    """A texture model given another texture: every cell moved a little, each still within the
    training cells' spread (the cell share misses it, as screw's model missed magnetic tile),
    but the image's median over its cells is far from every training image's."""
    rng = np.random.default_rng(2)
    train, held = _profiles(rng, 200), _profiles(rng, 50)
    other_texture = _profiles(rng, 100, 3.0, 1.0)
    cells_only = InDistribution.fit(train, held, CHANNELS, CELLS, profile="cell_share")
    assert (cells_only.score(other_texture) > 1).mean() < 0.05
    check = InDistribution.fit(train, held, CHANNELS, CELLS)
    assert (check.score(other_texture) > 1).all()
    assert (check.score(_profiles(rng, 100, 24.0, 0.15)) > 1).mean() == 0  # a local defect still passes
    assert (check.score(_profiles(rng, 100)) > 1).mean() == 0


def test_the_stored_check_says_its_kind_and_a_card_from_before_keeps_its_own():
    rng = np.random.default_rng(1)
    check = InDistribution.fit(_profiles(rng, 100), _profiles(rng, 30), CHANNELS, CELLS)
    stored = check.to_dict()
    assert stored["profile"] == "cell_median" and stored["cells"] == CELLS and np.shape(stored["std"]) == (6, 6)
    assert len(stored["median_mean"]) == CHANNELS and stored["median_limit"] > 0
    probe = np.concatenate([_profiles(rng, 5, 3.0, 0.6), _profiles(rng, 5, 3.0, 1.0)])
    np.testing.assert_allclose(InDistribution.from_dict(stored).score(probe), check.score(probe))
    cells_card = InDistribution.fit(_profiles(rng, 100), _profiles(rng, 30), CHANNELS, CELLS, profile="cell_share")
    stored_cells = cells_card.to_dict()  # a card from before the median guard: its cell share only
    assert stored_cells["profile"] == "cell_share" and "median_limit" not in stored_cells
    np.testing.assert_allclose(InDistribution.from_dict(stored_cells).score(probe), cells_card.score(probe))
    before = {"profile": PROFILES["channel_mean"], "distance": "mean squared z-score",  # as issue 13 wrote it
              "mean": [0.0] * MEANS, "std": [1.0] * MEANS, "limit": 4.0}
    old = InDistribution.from_dict(before)
    assert old.profile == "channel_mean"
    np.testing.assert_allclose(old.score(probe), np.mean(probe[:, :MEANS] ** 2, axis=1) / 4.0)
    np.testing.assert_allclose(old.score(probe[:, :MEANS]), old.score(probe))  # an export from before: means only
    with pytest.raises(ValueError, match="unknown feature profile 'cell_mode'"):
        InDistribution.from_dict({**stored, "profile": "cell_mode"})
    with pytest.raises(ValueError, match="too few for a check of 64 cells of 6 channels"):
        check.score(probe[:, :MEANS])  # a means-only profile cannot feed a cell check
