"""Pins the STFPM definitions of docs/design.md §1 with small numeric checks."""
import numpy as np
import paddle
import pytest

from stfpm.nn import STFPM, anomaly_map, build_backbone, layer_distances, stfpm_loss


def _np_distance(t, s):
    tn = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    sn = s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)
    return 0.5 * ((tn - sn) ** 2).sum(axis=1)


def _feats(rng, n=2, shapes=((8, 16, 16), (16, 8, 8), (32, 4, 4))):
    return [rng.normal(size=(n, *sh)).astype(np.float32) for sh in shapes]


@pytest.mark.parametrize("name,channels", [("resnet18", (64, 128, 256)), ("efficientnet_lite0", (24, 40, 112))])
def test_backbone_pyramid_shapes(name, channels):
    feats = build_backbone(name)(paddle.randn([2, 3, 64, 64]))
    assert [tuple(f.shape) for f in feats] == [(2, c, 64 // s, 64 // s) for c, s in zip(channels, (4, 8, 16))]


def test_resnet18_has_nothing_after_layer3():
    names = {k.split(".")[0] for k in build_backbone("resnet18").state_dict()}
    assert names == {"conv1", "bn1", "layer1", "layer2", "layer3"}


def test_loss_matches_definition_and_is_zero_on_identical_features():
    rng = np.random.default_rng(0)
    t, s = _feats(rng), _feats(rng)
    expected = sum(_np_distance(a, b).mean() for a, b in zip(t, s))
    got = float(stfpm_loss([paddle.to_tensor(x) for x in t], [paddle.to_tensor(x) for x in s]))
    assert got == pytest.approx(expected, rel=1e-5)
    same = [paddle.to_tensor(x) for x in t]
    assert float(stfpm_loss(same, same)) == pytest.approx(0.0, abs=1e-7)
    # scale invariance: the features are L2-normalised along channels
    scaled = [paddle.to_tensor(3.0 * x) for x in t]
    assert float(stfpm_loss(same, scaled)) == pytest.approx(0.0, abs=1e-6)


def test_anomaly_map_is_product_of_upsampled_layer_maps():
    rng = np.random.default_rng(1)
    t, s = _feats(rng), _feats(rng)
    tt, ss = [paddle.to_tensor(x) for x in t], [paddle.to_tensor(x) for x in s]
    dists = layer_distances(tt, ss)
    amap = anomaly_map([d.numpy() for d in dists], (64, 64))
    assert amap.shape == (2, 64, 64) and amap.dtype == np.float32
    import cv2  # bilinear, half-pixel centres: the same as align_corners=False
    expected = np.ones((2, 64, 64), np.float32)
    for a, b in zip(t, s):
        d = _np_distance(a, b)
        expected *= np.stack([cv2.resize(x, (64, 64), interpolation=cv2.INTER_LINEAR) for x in d])
    np.testing.assert_allclose(amap, expected, rtol=1e-4, atol=1e-7)
    # and the same as Paddle's bilinear interpolate with align_corners=False
    ref = None
    for d in dists:
        up = paddle.nn.functional.interpolate(d.unsqueeze(1), size=[64, 64], mode="bilinear", align_corners=False)
        ref = up if ref is None else ref * up
    np.testing.assert_allclose(amap, ref.squeeze(1).numpy(), rtol=1e-4, atol=1e-7)
    assert [tuple(d.shape) for d in dists] == [(2, 16, 16), (2, 8, 8), (2, 4, 4)]
    assert np.all(amap >= 0) and np.all(amap <= 8)


def test_teacher_is_frozen_and_stays_in_eval_mode():
    paddle.seed(0)
    net = STFPM("resnet18")
    before = {k: v.numpy().copy() for k, v in net.teacher.state_dict().items()}
    opt = paddle.optimizer.Momentum(0.1, parameters=net.student.parameters())
    net.train()
    assert not net.teacher.training and net.student.training
    loss = stfpm_loss(*net(paddle.randn([2, 3, 64, 64])))
    loss.backward()
    opt.step()
    after = net.teacher.state_dict()
    for k, v in before.items():  # weights AND batch-norm running statistics
        np.testing.assert_array_equal(v, after[k].numpy(), err_msg=k)
    assert all(p.grad is None for p in net.teacher.parameters())


def test_layer_maps_combine_to_input_resolution():
    net = STFPM("resnet18")
    net.eval()
    *layers, profile = net.inference_outputs(paddle.randn([3, 3, 96, 128]))
    assert [tuple(d.shape) for d in layers] == [(3, 24, 32), (3, 12, 16), (3, 6, 8)]
    # the channel means of the teacher's three taps, then its deepest tap over an 8 x 8 grid of cells
    assert tuple(profile.shape) == (3, 64 + 128 + 256 + 256 * 8 * 8)
    assert anomaly_map([d.numpy() for d in layers], (96, 128)).shape == (3, 96, 128)
    # one sample, and more samples than the 128 channels resized per cv2 call
    assert anomaly_map([np.ones((1, 4, 4), np.float32)], (8, 8)).shape == (1, 8, 8)
    big = np.random.default_rng(0).random((600, 4, 4)).astype(np.float32)
    out = anomaly_map([big], (8, 8))
    np.testing.assert_allclose(out[550], anomaly_map([big[550:551]], (8, 8))[0], rtol=1e-6)


def test_median_layer_norm_divides_each_layer_by_its_image_median():
    rng = np.random.default_rng(2)
    layers = [rng.random((3, 16, 16)).astype(np.float32) + 0.1, rng.random((3, 8, 8)).astype(np.float32) + 0.1]
    got = anomaly_map(layers, (32, 32), layer_norm="median")
    by_hand = anomaly_map([x / np.median(x.reshape(3, -1), axis=1)[:, None, None] for x in layers], (32, 32))
    np.testing.assert_allclose(got, by_hand, rtol=1e-6)
    # an image-wide rise of one image's discrepancy level does not change its normalised map
    shifted = [x.copy() for x in layers]
    for x in shifted:
        x[1] *= 5.0
    np.testing.assert_allclose(anomaly_map(shifted, (32, 32), layer_norm="median"), got, rtol=1e-5)
    assert not np.allclose(anomaly_map(shifted, (32, 32))[1], anomaly_map(layers, (32, 32))[1])
    with pytest.raises(ValueError, match="layer_norm must be one of"):
        anomaly_map(layers, (32, 32), layer_norm="max")


def test_views_map_is_the_larger_of_two_calibrated_maps():
    """layer_norm "views": max(paper's map / s0, median map / s1) at each pixel, with the scales
    training takes from held-out good images (view_scale: each view's median image score)."""
    from stfpm.nn import view_scale

    rng = np.random.default_rng(4)
    layers = [rng.uniform(0.1, 1.0, (3, s, s)).astype(np.float32) for s in (16, 8)]
    plain, median = anomaly_map(layers, (32, 32)), anomaly_map(layers, (32, 32), layer_norm="median")
    got = anomaly_map(layers, (32, 32), layer_norm="views", view_scale=(2.0, 4.0))
    np.testing.assert_allclose(got, np.maximum(plain / 2.0, median / 4.0), rtol=1e-6)
    scales = view_scale(layers, (32, 32))
    assert scales == pytest.approx((float(np.median(plain.reshape(3, -1).max(1))),
                                    float(np.median(median.reshape(3, -1).max(1)))))
    # a defect that raises a whole image (which the median view divides away) still shows
    big = [x.copy() for x in layers]
    for x in big:
        x[0] *= 20.0
    views = anomaly_map(big, (32, 32), layer_norm="views", view_scale=scales).reshape(3, -1).max(1)
    assert views[0] > 10 * views[1:].max()
    with pytest.raises(ValueError, match="view_scale"):
        anomaly_map(layers, (32, 32), layer_norm="views")
    with pytest.raises(ValueError, match="combine 'product'"):
        anomaly_map(layers, (32, 32), layer_norm="views", combine="sum", view_scale=(1.0, 1.0))


def test_holdout_layer_norm_and_sum_combine():
    rng = np.random.default_rng(3)
    layers = [rng.uniform(0.5, 2.0, (2, s, s)).astype(np.float32) * scale for s, scale in ((16, 1.0), (8, 10.0))]
    scale = [1.0, 10.0]
    summed = anomaly_map(layers, (32, 32), layer_norm="holdout", combine="sum", layer_scale=scale)
    by_hand = (anomaly_map([layers[0]], (32, 32)) + anomaly_map([layers[1] / 10.0], (32, 32))) / 2
    np.testing.assert_allclose(summed, by_hand, rtol=1e-5)
    # one constant per layer: a product under "holdout" only rescales the paper's map
    np.testing.assert_allclose(anomaly_map(layers, (32, 32), layer_norm="holdout", layer_scale=scale),
                               anomaly_map(layers, (32, 32)) / 10.0, rtol=1e-5)
    with pytest.raises(ValueError, match="layer_scale"):
        anomaly_map(layers, (32, 32), layer_norm="holdout")
    with pytest.raises(ValueError, match="combine must be one of"):
        anomaly_map(layers, (32, 32), combine="max")


def test_grid_cells_equal_adaptive_pooling_and_export_for_small_maps():
    """The profile's cells: the broadcast that replaces adaptive pooling on maps smaller than
    the grid (a 64-px input) gives the same numbers, for every map size."""
    import paddle.nn.functional as F

    from stfpm.nn.stfpm import PATCH_GRID, _grid_cells

    rng = np.random.default_rng(0)
    for side in (1, 2, 4, 5, 8, 16):
        x = paddle.to_tensor(rng.random((2, 3, side, side), dtype=np.float32))
        np.testing.assert_array_equal(_grid_cells(x).numpy(), F.adaptive_avg_pool2d(x, PATCH_GRID).numpy())
