"""`stfpm import-paddlex`: a checkpoint with PaddleSeg's STFPM naming, written by paddle.save,
becomes a model directory whose maps are PaddleSeg's own STFPM maps (on our 0.5 scale)."""
from __future__ import annotations

import os
import pickle

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import nn

from stfpm.model.artifact import load_model
from stfpm.data import load_dataset, make_synthetic_dataset
from stfpm.model.inference import Predictor
from stfpm.training.config import load_images
from test_cli import invoke  # the one CLI-runner helper of the tests

SIZE = 64


class ResNetMS3(nn.Layer):
    """PaddleSeg's ResNet_MS3 (paddleseg/models/backbones/resnet_ms3.py): paddle.vision
    ResNet18's children without avgpool and fc in a Sequential; features after '4', '5', '6'."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(*list(paddle.vision.models.resnet18().children())[:-2])

    def forward(self, x):
        features = []
        for name, layer in self.model.named_children():
            x = layer(x)
            if name in ("4", "5", "6"):
                features.append(x)
        return features


class PaddleSegSTFPM(nn.Layer):
    """PaddleSeg's STFPM (paddleseg/models/stfpm.py): `student` and `teacher` ResNet_MS3, and
    its eval-mode map: per layer sum of squared normalised differences, upsampled, multiplied."""

    def __init__(self):
        super().__init__()
        self.student, self.teacher = ResNetMS3(), ResNetMS3()

    def score_map(self, x):
        score = 1.0
        for t, s in zip(self.teacher(x), self.student(x)):
            layer = paddle.sum((F.normalize(t, axis=1) - F.normalize(s, axis=1)) ** 2, 1, keepdim=True)
            score = score * F.interpolate(layer, size=x.shape[2:], mode="bilinear", align_corners=False)
        return score[:, 0]


@pytest.fixture(scope="module")
def paddleseg_checkpoint(tmp_path_factory):
    """(path of best_model.pdparams, the network it holds); random weights and batch-norm statistics."""
    paddle.seed(1)
    network = PaddleSegSTFPM()
    rng = np.random.default_rng(1)
    for name, value in network.state_dict().items():
        if name.endswith("._mean"):
            value.set_value(rng.normal(0, 0.1, value.shape).astype("float32"))
        elif name.endswith("._variance"):
            value.set_value(rng.uniform(0.5, 2.0, value.shape).astype("float32"))
    network.eval()
    folder = tmp_path_factory.mktemp("paddlex_output") / "best_model"
    folder.mkdir()
    paddle.save(network.state_dict(), str(folder / "best_model.pdparams"))
    return folder / "best_model.pdparams", network


@pytest.fixture(scope="module")
def good_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    make_synthetic_dataset(root / "data", n_train=6, n_test=4, size=SIZE, seed=3)
    return root / "data"


def test_imported_model_gives_paddleseg_maps(paddleseg_checkpoint, good_images, tmp_path):
    path, network = paddleseg_checkpoint
    code, text = invoke("import-paddlex", path.parent, "--out", tmp_path / "model", "--good", good_images,
                        "--image-size", SIZE)
    assert code == 0, text
    model = load_model(tmp_path / "model")
    card = model.card
    assert card.backbone == "resnet18" and card.training["imported_from"] == str(path)

    test_images, _ = load_images([s.image for s in load_dataset(good_images).test], SIZE,
                                 card.input.mean, card.input.std)
    ours, _ = Predictor.from_model(model).forward(test_images)
    with paddle.no_grad():
        theirs = network.score_map(paddle.to_tensor(test_images)).numpy() / 8  # their sum, our 0.5 per layer
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.max()))

    # the threshold is training's calibration: the 0.99 quantile of the good images' scores
    good, _ = load_images([s.image for s in load_dataset(good_images).train], SIZE,
                          card.input.mean, card.input.std)
    with paddle.no_grad():
        good_scores = (network.score_map(paddle.to_tensor(good)).numpy() / 8).reshape(len(good), -1).max(axis=1)
    calibration = card.calibration
    assert calibration.details["n_images"] == 6 and calibration.source == "imported_good_quantile"
    assert calibration.threshold == pytest.approx(np.quantile(good_scores, 0.99), rel=1e-5)
    # the in-distribution check (issue 25): over the 8 x 8 cells of the deepest tap (256 channels)
    assert calibration.details["n_ood_reference"] == 6 and len(calibration.ood.mean) == 256
    assert calibration.ood.cells == 64


def test_inference_directories_and_foreign_files_are_refused(good_images, tmp_path):
    inference = tmp_path / "inference"
    inference.mkdir()
    (inference / "inference.pdiparams").write_bytes(b"\0" * 16)
    (inference / "inference.yml").write_text("Global:\n  model_name: STFPM\n")
    code, text = invoke("import-paddlex", inference, "--out", tmp_path / "m", "--good", good_images)
    assert code == 2 and "inference directory" in text and "best_model.pdparams" in text, text
    assert "Traceback" not in text and not (tmp_path / "m").exists()

    classifier = tmp_path / "resnet18.pdparams"
    paddle.save(paddle.vision.models.resnet18().state_dict(), str(classifier))
    code, text = invoke("import-paddlex", classifier, "--out", tmp_path / "m", "--good", good_images)
    assert code == 2 and "teacher.model.N" in text and "conv1.weight" in text, text

    class RunsCode:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    evil = tmp_path / "evil.pdparams"
    evil.write_bytes(pickle.dumps({"student.model.0.weight": RunsCode()}))
    code, text = invoke("import-paddlex", evil, "--out", tmp_path / "m", "--good", good_images)
    assert code == 2 and "refusing to load posix.system" in text, text
