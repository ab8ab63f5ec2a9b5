"""The normalised score (stfpm.model.score_scale) and the in-distribution check (stfpm.model.ood): pure numpy."""
import json

import numpy as np
import pytest

from stfpm.model.card import Calibration
from stfpm.model.ood import InDistribution
from stfpm.model.score_scale import ScoreScale


def test_normalised_score_keeps_every_rank_and_half_at_the_threshold():
    rng = np.random.default_rng(0)
    good = rng.uniform(11.5, 23.7, 13)
    scale = ScoreScale.fit(good, threshold=24.24)
    assert scale.normalize(np.median(good), 24.24) == pytest.approx(0.25)
    raw = np.concatenate([[0.0, 1e-6], np.sort(rng.uniform(0, 30, 200)), [24.24, 60, 415.0, 418.0, 1e6, 1e12]])
    s = scale.normalize(np.sort(raw), 24.24)
    assert s[0] == 0.0 and (s < 1).all() and (np.diff(s) > 0).all()  # strictly increasing, never clipped
    assert scale.normalize(24.24, 24.24) == 0.5
    assert scale.normalize(2 * 24.24, 24.24) == pytest.approx(0.75)
    # a threshold given at inference moves the 0.5 point, ranks stay
    assert scale.normalize(30.0, 30.0) == 0.5 and (np.diff(scale.normalize(np.sort(raw), 30.0)) > 0).all()


def test_to_raw_is_the_exact_inverse_and_round_trips_8_bit_maps():
    scale = ScoreScale(log_scale=0.45)
    raw = np.geomspace(1e-3, 1e4, 500)
    np.testing.assert_allclose(scale.to_raw(scale.normalize(raw, 7.0), 7.0), raw, rtol=1e-9)
    pixels = np.rint(255 * scale.normalize(raw, 7.0)).astype(np.uint8)
    back = scale.normalize(scale.to_raw(pixels / 255.0, 7.0), 7.0)
    np.testing.assert_allclose(back, pixels / 255.0, atol=1e-12)
    assert np.abs(back - scale.normalize(raw, 7.0)).max() <= 0.5 / 255 + 1e-12
    assert scale.to_raw(0.0, 7.0) == 0.0 and scale.to_raw(0.5, 7.0) == 7.0 and np.isinf(scale.to_raw(1.0, 7.0))


def test_models_without_a_stored_scale_use_their_stored_range():
    old = Calibration(threshold=24.0, score_min=8.0, score_max=16.0)
    assert old.scale.log_scale == pytest.approx(np.log2(24.0 / 12.0))
    assert old.normalize(24.0) == 0.5 and old.normalize(48.0) == 0.75
    new = Calibration(threshold=24.0, score_min=8.0, score_max=16.0, score_scale=ScoreScale(0.3))
    assert new.scale.log_scale == 0.3
    assert ScoreScale.fit([30.0, 40.0], threshold=20.0).log_scale > 0  # median above the threshold: floored


def test_in_distribution_check_flags_shifted_profiles_only():
    rng = np.random.default_rng(1)
    train, held, same = (rng.normal(0, 1, (n, 64)) * np.linspace(0.1, 3, 64) + 5 for n in (120, 30, 200))
    # the channel-mean check (cards from before issue 25's cells): profiles of means only
    check = InDistribution.fit(train, held, channels=0, cells=0, profile="channel_mean")
    assert check.score(held).max() == pytest.approx(1 / 2.5)
    assert (check.score(same) <= 1).mean() >= 0.99
    assert (check.score(same + 3 * np.linspace(0.1, 3, 64)) > 1).all()
    restored = InDistribution.from_dict(json.loads(json.dumps(check.to_dict())))
    np.testing.assert_allclose(restored.score(same), check.score(same))
