"""The frozen teacher's features cached across epochs (stfpm.training.loop.TeacherCache): the same
loss curve as computing them every step. (Ray Train workers use the same cache; their batch
order differs from run to run, so two Ray runs cannot be compared to 1e-4: test_ray_train
runs them with the cache on.)"""
import numpy as np
import paddle
import pytest

from stfpm.data import make_synthetic_dataset
from stfpm.training.config import TrainConfig
from stfpm.training.loop import TeacherCache, build_network
from stfpm.training.run import train

CFG = dict(backbone="efficientnet_lite0", epochs=3, image_size=64, batch_size=8, seed=0,
           augment="none")  # the cache needs unaugmented images


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache") / "data"
    make_synthetic_dataset(root, n_train=20, n_test=6, size=64, seed=2)
    return root


def curves(result) -> np.ndarray:
    return np.array([[r["loss"], r["holdout_loss"]] for r in result.history])


def test_cached_features_are_the_teachers_and_the_budget_holds():
    network = build_network("efficientnet_lite0")
    batch = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    one_image = sum(t[0].size * 4 for t in network.teacher(paddle.to_tensor(batch[:1])))
    cache = TeacherCache(network.teacher, max_bytes=2 * one_image)
    first = cache.features(batch, ["a", "b", "c"])
    assert sorted(cache.store) == ["a", "b"] and cache.used == 2 * one_image  # "c" did not fit
    again = cache.features(batch[::-1].copy(), ["c", "b", "a"])
    for tap_first, tap_again in zip(first, again):
        np.testing.assert_allclose(tap_again.numpy()[::-1], tap_first.numpy(), atol=1e-5)


def test_one_process_training_with_the_cache_follows_the_same_loss_curve(data, tmp_path):
    cached = train(str(data), str(tmp_path / "cached"), TrainConfig(**CFG), progress=False)
    plain = train(str(data), str(tmp_path / "plain"), TrainConfig(**CFG, teacher_cache_mb=0), progress=False)
    np.testing.assert_allclose(curves(cached), curves(plain), atol=1e-4, rtol=0)
    assert curves(plain)[-1, 0] < curves(plain)[0, 0]
