"""The label-free proxy: synthetic defects on held-out good images, scored per map variant."""
import numpy as np

from stfpm.model.card import Calibration, InputSpec, MapSpec, ModelCard
from stfpm.data import normalize_batch, render_texture
from stfpm.data.synth import texture_family
from stfpm.training.proxy import MAP_VARIANTS, map_variant_proxies, to_rgb_uint8, with_synthetic_defects


def test_defects_change_each_image_and_normalisation_inverts():
    family = texture_family(0)
    good = np.stack([render_texture(np.random.default_rng(i), 64, family) for i in range(6)])
    bad = with_synthetic_defects(good)
    assert all((b != g).any() for b, g in zip(bad, good))
    np.testing.assert_array_equal(bad, with_synthetic_defects(good))  # seeded
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    np.testing.assert_array_equal(to_rgb_uint8(normalize_batch(good, mean, std), mean, std), good)


def test_a_forward_that_sees_the_defects_scores_one_for_every_variant():
    family = texture_family(1)
    good = np.stack([render_texture(np.random.default_rng(i), 32, family) for i in range(10)])
    card = ModelCard(model_name="STFPM", backbone="efficientnet_lite0", input=InputSpec(32, (0.0,) * 3, (1 / 255,) * 3),
                     calibration=Calibration(0.0, 0.0, 1.0), map=MapSpec(layer_scale=(1.0, 1.0), view_scale=(1.0, 1.0)))
    reference = normalize_batch(good, card.input.mean, card.input.std)

    def layer_forward(batch):  # distance to the good image it came from: zero unless a defect is there
        diff = np.abs(batch - reference).mean(1) + 1.0
        return [diff[:, ::2, ::2], diff[:, ::4, ::4]], None  # (layer maps, no feature profiles)

    proxies = map_variant_proxies(card, layer_forward, good)
    assert len(proxies) == len(MAP_VARIANTS) and "median/product" in proxies and "views/product" in proxies
    assert min(proxies.values()) == 1.0
