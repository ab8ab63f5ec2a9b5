"""The model card and the model-directory validator: every broken directory an operator, a
careless edit or a hostile bucket can produce fails with one line naming the file, the key
and the fix, in every loader (load_model, Predictor.open, the scoring driver, the CLI)."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stfpm.model.artifact import load_model, save_model, sha256_file
from stfpm.model.card import MODEL_JSON, Calibration, InputSpec, ModelCard, ModelDirError, parse_card, read_card, weights_version
from stfpm.cli import app
from stfpm.scoring.sources import resolve_models


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import paddle

    from stfpm.nn import STFPM

    paddle.seed(0)
    card = ModelCard(model_name="STFPM", backbone="efficientnet_lite0",
                     input=InputSpec.for_backbone("efficientnet_lite0", 64),
                     calibration=Calibration(0.5, 0.1, 0.9, source="test", details={"quantile": 0.99}))
    path = tmp_path_factory.mktemp("model") / "m"
    save_model(STFPM("efficientnet_lite0"), path, card)
    return path


def broken_copy(model_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of the model directory with model.json's dict passed through `edit`."""
    out = tmp_path / "broken"
    shutil.copytree(model_dir, out)
    doc = json.loads((out / MODEL_JSON).read_text())
    edit(doc)
    (out / MODEL_JSON).write_text(json.dumps(doc))
    return out


def expect_error(path: Path, *needles: str, card_error: bool = True) -> str:
    """Every loader refuses `path` with a ModelDirError holding the file's name and `needles`
    (the scoring driver, which reads only the card, when the card is what is wrong); the CLI
    prints it as one line and exits 2."""
    with pytest.raises(ModelDirError) as caught:
        load_model(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    for needle in needles:
        assert needle in message, message
    if card_error:
        with pytest.raises(ModelDirError):
            resolve_models(str(path))
    result = CliRunner().invoke(app, ["predict", str(path), str(path), "--out", str(path.parent / "out")])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0, result.output
    return message


def test_the_card_round_trips_and_keeps_what_it_does_not_know(model_dir, tmp_path):
    path = broken_copy(model_dir, tmp_path, lambda d: d.update(future_key={"a": 1}))
    card = read_card(path)
    assert card.calibration == Calibration(0.5, 0.1, 0.9, source="test", details={"quantile": 0.99})
    assert card.input.size == 64 and card.map.layer_norm == "none" and card.model_name == "STFPM"
    assert card.model_version == weights_version(card.weights) and set(card.weights) == {
        "teacher.safetensors", "student.safetensors"}
    again = json.loads(card.to_json())
    assert again == json.loads((path / MODEL_JSON).read_text())
    assert again["threshold"] == {"value": 0.5, "score_min": 0.1, "score_max": 0.9, "source": "test",
                                  "quantile": 0.99}


def test_a_card_from_before_the_map_option_reads_as_the_papers_map(model_dir, tmp_path):
    path = broken_copy(model_dir, tmp_path, lambda d: d.pop("map"))
    assert load_model(path).card.map.layer_norm == "none"


@pytest.mark.parametrize("key, fix", [("threshold", "--set-threshold"), ("input", "stfpm train"),
                                      ("model_version", "stfpm train"), ("weights", "stfpm train")])
def test_a_missing_key_is_named(model_dir, tmp_path, key, fix):
    path = broken_copy(model_dir, tmp_path, lambda d: d.pop(key))
    expect_error(path, f"key {key!r} is missing", fix)


def test_a_missing_threshold_value_is_named(model_dir, tmp_path):
    path = broken_copy(model_dir, tmp_path, lambda d: d["threshold"].pop("value"))
    expect_error(path, "key 'threshold.value' is missing", "--set-threshold")


def test_invalid_json_is_named(model_dir, tmp_path):
    path = broken_copy(model_dir, tmp_path, lambda d: None)
    (path / MODEL_JSON).write_text('{"schema_version": 1,')
    expect_error(path, "is not valid JSON")


@pytest.mark.parametrize("size", ["abc", 0, 12.5, True])
def test_a_bad_input_size_is_named(model_dir, tmp_path, size):
    path = broken_copy(model_dir, tmp_path, lambda d: d["input"].update(size=size))
    expect_error(path, "key 'input.size' must be a whole number >= 1", repr(size))


def test_other_bad_values_are_named(model_dir, tmp_path):
    for edit, needle in [(lambda d: d["threshold"].update(value="abc"), "'threshold.value' must be a finite number"),
                         (lambda d: d["input"].update(std=[0, 1, 1]), "'input.std' must be a list of 3 non-zero"),
                         (lambda d: d.update(map={"layer_norm": "mean"}), "'map.layer_norm' is 'mean'"),
                         (lambda d: d.update(map={"layer_norm": "views"}), "'map.view_scale'"),
                         (lambda d: d.update(map={"layer_norm": "views", "view_scale": [1, -2]}), "'map.view_scale' must"),
                         (lambda d: d.update(map={"layer_norm": "views", "view_scale": [1, 2], "combine": "sum"}),
                          "'map.combine'"),
                         (lambda d: d.update(schema_version=7), "'schema_version' is 7"),
                         (lambda d: d.update(model_name="Other"), "'model_name' is 'Other'")]:
        shutil.rmtree(tmp_path / "broken", ignore_errors=True)
        expect_error(broken_copy(model_dir, tmp_path, edit), needle)


def test_a_model_version_that_is_not_the_weights_hash_is_refused(model_dir, tmp_path):
    """model_version names output folders (maps/<model_version>/...): "../../ESCAPED" with
    untouched weights must not get past the card."""
    path = broken_copy(model_dir, tmp_path, lambda d: d.update(model_version="../../ESCAPED"))
    expect_error(path, "key 'model_version' is '../../ESCAPED'", "hash of the weight hashes")


@pytest.mark.parametrize("content, needle", [
    (pickle.dumps({"conv.weight": np.zeros(3)}, protocol=2), "is a Python pickle"),
    (b"\x00garbage that is no safetensors header", "is not a safetensors file")], ids=["pickle", "garbage"])
def test_a_weight_file_that_is_not_safetensors_is_named(model_dir, tmp_path, content, needle):
    """Even with model.json edited to match (sha256 and model_version consistent), a pickle or
    garbage under the safetensors name is refused without unpickling it."""
    path = broken_copy(model_dir, tmp_path, lambda d: None)
    (path / "student.safetensors").write_bytes(content)
    doc = json.loads((path / MODEL_JSON).read_text())
    doc["weights"]["student.safetensors"] = sha256_file(path / "student.safetensors")
    doc["model_version"] = weights_version(doc["weights"])
    (path / MODEL_JSON).write_text(json.dumps(doc))
    expect_error(path, needle, "student.safetensors", card_error=False)


def test_replaced_weights_are_refused(model_dir, tmp_path):
    path = broken_copy(model_dir, tmp_path, lambda d: None)
    (path / "teacher.safetensors").write_bytes(b"\x00" * 64)
    expect_error(path, "does not match the sha256", card_error=False)


def test_parse_card_names_its_source():
    with pytest.raises(ModelDirError, match=r"^s3://b/m/model.json: must be a JSON object"):
        parse_card("[1, 2]", "s3://b/m/model.json")
