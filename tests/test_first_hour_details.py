"""The small things a newcomer met in the first hour (issue 25, items 5 and 6): saved results
that overwrote each other, doubled epoch lines and silent epochs, a stray `error: 2`, warnings
only in a JSON file, a one-image training set, `score` meaning two things, case-sensitive
model names, float noise in printed metrics, and a download failure that did not say what
works offline."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from stfpm import create_model
from stfpm.training.config import TrainConfig
from test_cli import invoke  # the one CLI-runner helper of the tests

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("details")
    data, model = root / "data", root / "model"
    assert invoke("synth", data, "--n-train", 10, "--n-test", 6, "--size", 64, "--seed", 1)[0] == 0
    code, text = invoke("train", data, "--out", model, "--epochs", 1, "--image-size", 64, "--batch-size", 4)
    assert code == 0, text
    return data, model


def test_saved_results_of_same_named_images_in_different_folders_do_not_overwrite(data_and_model, tmp_path):
    data, model = data_and_model
    image = cv2.imread(str(sorted((data / "test" / "good").glob("*.png"))[0]))
    inputs = []
    for folder in ("good", "broken_small", "contamination", "a/x", "b/x"):
        (tmp_path / "in" / folder).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "in" / folder / "000.png"), image)
        inputs.append(str(tmp_path / "in" / folder / "000.png"))
    out = tmp_path / "out"
    for res in create_model(model_dir=model).predict(inputs, batch_size=2):
        res.save_to_img(save_path=out)
        res.save_to_json(save_path=str(out) + "/")
    expected = {"good_000", "broken_small_000", "contamination_000", "x_000", "x_000_1"}
    assert {p.stem for p in out.glob("*.png")} == expected == {p.stem for p in out.glob("*.json")}
    saved = {json.loads(p.read_text())["res"]["input_path"] for p in out.glob("*.json")}
    assert saved == set(inputs)


def test_epoch_lines_once_with_a_legend_and_progress_within_an_epoch(tmp_path):
    data = tmp_path / "data"
    assert invoke("synth", data, "--n-train", 10, "--n-test", 2, "--size", 64)[0] == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "stfpm.cli", "train", str(data), "--out", str(tmp_path / "m"),
                           "--epochs", "2", "--image-size", "64", "--batch-size", "4"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    for epoch in (1, 2):
        assert len([line for line in lines if f"epoch   {epoch}/2  loss" in line]) == 1, done.stderr
    assert any("`*`: the lowest so far" in line for line in lines), done.stderr  # what the * means

    from stfpm.training.loop import ProgressLog

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("stfpm.training.loop")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        on_batch = ProgressLog(3, every_s=0).within(1, 40)
        on_batch(8, 2.5)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert [r.getMessage() for r in records][0].startswith("epoch   1/3  8/40 images  loss 2.5000")


def test_predict_with_a_missing_path_prints_one_error_and_names_scores_as_the_table_does(data_and_model, tmp_path):
    data, model = data_and_model
    code, text = invoke("predict", model, data / "test" / "good", tmp_path / "missing.png", "--out", tmp_path / "p")
    assert code == 2 and "missing.png" in text
    assert "error: 2" not in text and len([line for line in text.splitlines() if line.startswith("error:")]) == 1
    assert re.search(r"raw_score\s+norm_score", text)
    saved = json.loads(next((tmp_path / "p").glob("*.json")).read_text())["res"]
    assert saved["raw_score"] == saved["score"] and 0 < saved["norm_score"] < 1


def test_check_dataset_prints_its_warnings_and_one_image_cannot_train(tmp_path):
    (tmp_path / "one").mkdir()
    cv2.imwrite(str(tmp_path / "one" / "a.png"), np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    (tmp_path / "one" / "notes.txt").write_text("not an image")
    code, text = invoke("check-dataset", tmp_path / "one", "--out", tmp_path / "check")
    assert code == 0, text
    warnings = [line for line in text.splitlines() if line.startswith("warning:")]
    assert any("only 1 good training image" in w for w in warnings), text
    assert any("notes.txt" in w for w in warnings), text
    report = json.loads((tmp_path / "check" / "check_dataset_result.json").read_text())
    assert len(report["warnings"]) == len(warnings)
    code, text = invoke("train", tmp_path / "one", "--out", tmp_path / "m", "--image-size", 64)
    assert code == 2 and "needs at least 2" in text and "Traceback" not in text, text
    assert len(text.strip().splitlines()) == 1, text


def test_model_names_are_case_insensitive():
    assert TrainConfig(model="PatchCore").model == "patchcore"
    assert TrainConfig(model="STFPM").resolved().model == "stfpm"
    with pytest.raises(ValueError, match="'padim'"):
        TrainConfig(model="PaDiM").resolved()


def test_printed_metrics_carry_no_float_noise(data_and_model, tmp_path):
    data, model = data_and_model
    code, text = invoke("evaluate", model, data, "--out", tmp_path / "eval")
    assert code == 0, text
    printed = text[:text.index("decisions use")]
    assert not re.search(r"\d\.\d{7,}", printed), printed  # 0.6056, not 0.6056000000000001
    full = json.loads((tmp_path / "eval" / "evaluate_result.json").read_text())["metrics"]
    assert json.loads(printed)["image_auroc"] == pytest.approx(full["image_auroc"], abs=1e-6)


def test_the_default_backbone_needs_no_download_and_a_failed_download_names_it(tmp_path, monkeypatch):
    from stfpm.model import weights

    assert TrainConfig().backbone not in weights.ZOO  # nothing to download
    weights.load_teacher_state(TrainConfig().backbone, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    monkeypatch.setattr(weights, "ZOO", {"resnet18": ("http://127.0.0.1:9/resnet18.pdparams", "0" * 32)})
    with pytest.raises(weights.WeightsError, match="--backbone efficientnet_lite0") as err:
        weights.load_teacher_state("resnet18", cache_dir=tmp_path / "cache")
    assert "works offline" in str(err.value)
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
