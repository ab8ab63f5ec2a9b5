"""A student of another backbone than the teacher's (`--student`): projected to the teacher's
tap widths, trained, recorded in model.json, rebuilt by every loader and exported alike."""
from __future__ import annotations

import json
import shutil

import numpy as np
import paddle
import pytest
from typer.testing import CliRunner

from stfpm.model.artifact import load_model
from stfpm.model.card import MODEL_JSON, ModelDirError, read_card
from stfpm.cli import app
from stfpm.nn import STFPM, stfpm_loss
from stfpm.nn.stfpm import ProjectedStudent
from stfpm.training.config import TrainConfig


def test_a_student_of_other_widths_is_projected_to_the_teacher_taps():
    paddle.seed(0)
    net = STFPM("efficientnet_lite0", "resnet18")
    assert isinstance(net.student, ProjectedStudent)
    teacher, student = net(paddle.randn([2, 3, 64, 64]))
    assert [t.shape for t in teacher] == [s.shape for s in student] == [[2, 24, 16, 16], [2, 40, 8, 8], [2, 112, 4, 4]]
    stfpm_loss(teacher, student).backward()
    assert all(p.grad is not None for p in net.student.project.parameters())  # the projections are trained
    assert all(p.grad is None for p in net.teacher.parameters())
    # the same widths need no projection: the student is the other backbone itself
    assert not isinstance(STFPM("efficientnet_lite0", "efficientnet_lite1").student, ProjectedStudent)


def test_train_config_names_a_bad_student():
    with pytest.raises(ValueError, match="unknown backbone 'vgg99'"):
        TrainConfig(backbone="efficientnet_lite0", student="vgg99").resolved()
    with pytest.raises(ValueError, match="student applies to model 'stfpm' only"):
        TrainConfig(backbone="efficientnet_lite0", model="patchcore", student="resnet18").resolved()


@pytest.fixture(scope="module")
def student_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("student")
    runner = CliRunner()
    done = runner.invoke(app, ["synth", str(root / "data"), "--n-train", "10", "--n-test", "4", "--size", "96"])
    assert done.exit_code == 0, done.output
    done = runner.invoke(app, ["train", str(root / "data"), "--out", str(root / "model"), "--backbone",
                               "efficientnet_lite0", "--student", "resnet18", "--epochs", "1", "--image-size", "64"])
    assert done.exit_code == 0, done.output
    return root


def test_the_student_is_recorded_and_rebuilt_by_every_loader(student_model, tmp_path):
    from stfpm.model.export import export_model
    from stfpm.model.inference import Predictor

    model = student_model / "model"
    card = read_card(model)
    assert card.student == "resnet18" and card.recipe["student"] == "resnet18"
    assert isinstance(load_model(model).network.student, ProjectedStudent)
    images = [p.read_bytes() for p in sorted((student_model / "data" / "test").rglob("*.png"))]
    direct = Predictor.open(model).predict(images)
    export_model(str(model), str(tmp_path / "exported"))
    exported = Predictor.open(tmp_path / "exported").predict(images)
    np.testing.assert_allclose([p.score for p in exported], [p.score for p in direct], rtol=1e-4)


@pytest.mark.parametrize("student", ["vgg99", ["resnet18"], 5])
def test_a_card_naming_an_unknown_student_is_refused(student_model, tmp_path, student):
    broken = tmp_path / "broken"
    shutil.copytree(student_model / "model", broken)
    doc = json.loads((broken / MODEL_JSON).read_text())
    doc["student"] = student
    (broken / MODEL_JSON).write_text(json.dumps(doc))
    with pytest.raises(ModelDirError, match=f"key 'student' is {student!r}".replace("[", r"\[").replace("]", r"\]")):
        load_model(broken)
