"""Exports to ONNX and OpenVINO and the engines that run them (stfpm.model.engines): every format
of both models, tiled and not, gives the model directory's maps; an ONNX or OpenVINO export
predicts without Paddle; the in-memory engines of a model directory agree too."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_cli import invoke  # the one CLI-runner helper of the tests

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("paddle2onnx")

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {"paddle": ("inference.json", "inference.pdiparams"), "onnx": ("model.onnx",),
           "openvino": ("model.xml", "model.bin")}
MODELS = ("stfpm", "stfpm_tiled", "patchcore", "patchcore_tiled")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """Tiny Lite0 models (64 px) on 96-px synthetic images: STFPM and PatchCore, each whole and
    in tiles of 64 sharing 16 pixels (2 x 2 tiles per image)."""
    root = tmp_path_factory.mktemp("engines")
    assert invoke("synth", root / "data", "--n-train", 10, "--n-test", 4, "--size", 96, "--seed", 0)[0] == 0
    common = ("--backbone", "efficientnet_lite0", "--image-size", 64)
    kinds = {"stfpm": ("--epochs", 1, "--batch-size", 8), "patchcore": ("--model", "patchcore", "--bank-fraction", 0.1)}
    for name in MODELS:
        kind = kinds[name.split("_")[0]]
        tile = ("--tile", 64, "--tile-overlap", 16) if name.endswith("_tiled") else ()
        code, text = invoke("train", root / "data", "--out", root / name, *common, *kind, *tile)
        assert code == 0, text
    return root


def _images(models: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((models / "data" / "test").rglob("*.png"))]


@pytest.mark.parametrize("name", MODELS)
def test_every_format_gives_the_model_directory_maps(models, name, tmp_path):
    from stfpm.model.inference import Predictor

    images = _images(models)
    reference = Predictor.open(models / name, engine="onednn").predict(images)  # the engine of old
    assert reference[0].anomaly_map.shape == (96, 96)
    scale = max(1.0, max(float(p.anomaly_map.max()) for p in reference))
    for fmt, files in FORMATS.items():
        out = tmp_path / fmt
        code, text = invoke("export", models / name, "--out", out, "--format", fmt)
        assert code == 0, text
        card = json.loads((out / "model.json").read_text())
        assert card["export"]["format"] == {"paddle": "paddle_inference"}.get(fmt, fmt)
        assert set(card["export"]["sha256"]) == set(files) and all((out / f).is_file() for f in files)
        exported = Predictor.open(out).predict(images)
        for ref, got in zip(reference, exported):
            # within 1e-4 of the map's scale (PatchCore's distances are ~10, STFPM's products ~1)
            assert float(np.abs(ref.anomaly_map - got.anomaly_map).max()) <= 1e-4 * scale, (fmt, name)
            assert got.score == pytest.approx(ref.score, rel=1e-5, abs=1e-6)
            assert got.is_anomaly == ref.is_anomaly and (got.ood_score is None) == (ref.ood_score is None)
            if ref.ood_score is not None:
                assert got.ood_score == pytest.approx(ref.ood_score, rel=1e-3, abs=1e-4)  # the profile: within 3e-5


def test_a_model_directory_runs_on_every_cpu_engine(models):
    """The in-memory engines (the network converted to ONNX at load) give oneDNN's maps."""
    from stfpm.model.inference import Predictor

    images = _images(models)[:3]
    for name in ("stfpm", "patchcore_tiled"):
        reference = Predictor.open(models / name, engine="onednn").predict(images)
        for engine in ("onnxruntime", "openvino"):
            got = Predictor.open(models / name, engine=engine).predict(images)
            scale = max(1.0, max(float(p.anomaly_map.max()) for p in reference))
            assert max(float(np.abs(a.anomaly_map - b.anomaly_map).max()) for a, b in zip(reference, got)) <= 1e-4 * scale


def test_the_cpu_default_is_onnx_runtime_and_paddle_stays_selectable(models, monkeypatch):
    """With the onnx extra installed a model directory runs on ONNX Runtime (bench/engines.py);
    STFPM_ENGINE (how scoring actors are told) and engine= still pick Paddle Inference."""
    from stfpm import create_model
    from stfpm.errors import UserError
    from stfpm.model.inference import Predictor

    monkeypatch.delenv("STFPM_ENGINE", raising=False)
    assert Predictor.open(models / "stfpm").engine == "onnxruntime"
    assert create_model(model_dir=models / "stfpm", engine="onednn").predictor.engine == "onednn"
    monkeypatch.setenv("STFPM_ENGINE", "onednn")
    assert Predictor.open(models / "stfpm").engine == "onednn"
    monkeypatch.setenv("STFPM_ENGINE", "tensorrt")
    with pytest.raises(UserError, match="STFPM_ENGINE is 'tensorrt'"):
        Predictor.open(models / "stfpm")
    code, text = invoke("predict", models / "stfpm", models / "data" / "test", "--engine", "cuda")
    assert code == 2 and "--engine is 'cuda'" in text


def test_export_refuses_an_unknown_format_and_a_replaced_file(models, tmp_path):
    from stfpm.model.card import ModelDirError
    from stfpm.model.inference import Predictor

    code, text = invoke("export", models / "stfpm", "--out", tmp_path / "x", "--format", "tensorrt")
    assert code == 2 and "unknown export format 'tensorrt'" in text
    out = tmp_path / "onnx"
    assert invoke("export", models / "stfpm", "--out", out, "--format", "onnx")[0] == 0
    with pytest.raises(ModelDirError, match="runs on onnxruntime or openvino, not on onednn"):
        Predictor.open(out, engine="onednn")
    (out / "model.onnx").write_bytes((out / "model.onnx").read_bytes()[:-10])
    with pytest.raises(ModelDirError, match="model.onnx does not match the sha256"):
        Predictor.open(out)


# Runs `stfpm predict` with `import paddle` made to fail, as on a machine with only the extra.
NO_PADDLE_PREDICT = """
import sys

class NoPaddle:
    def find_spec(self, name, path=None, target=None):
        if name == "paddle" or name.startswith(("paddle.", "paddle2onnx")):
            raise ImportError("paddle is not installed here")

sys.meta_path.insert(0, NoPaddle())
from stfpm.cli import app
try:
    app(sys.argv[1:])
except SystemExit as e:
    assert not [m for m in sys.modules if m == "paddle" or m.startswith("paddle.")], "paddle was imported"
    print("PADDLE-FREE", e.code)
    raise
"""


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_an_onnx_or_openvino_export_predicts_without_paddle(models, fmt, tmp_path):
    """predict on the export, in a process where Paddle cannot be imported, writes the scores
    that predict on the model directory writes."""
    for name in ("stfpm", "patchcore_tiled"):
        exported = tmp_path / f"{name}_{fmt}"
        assert invoke("export", models / name, "--out", exported, "--format", fmt)[0] == 0
        test_dir = models / "data" / "test"
        code, text = invoke("predict", models / name, test_dir, "--out", tmp_path / f"{name}_ref")
        assert code == 0, text
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        done = subprocess.run([sys.executable, "-c", NO_PADDLE_PREDICT, "predict", str(exported), str(test_dir),
                               "--out", str(tmp_path / f"{name}_{fmt}_out")], env=env, capture_output=True, text=True)
        assert done.returncode == 0 and "PADDLE-FREE 0" in done.stdout, done.stdout + done.stderr
        ref_files = sorted((tmp_path / f"{name}_ref").glob("*.json"))
        assert ref_files
        for ref_file in ref_files:
            ref = json.loads(ref_file.read_text())["res"]
            got = json.loads((tmp_path / f"{name}_{fmt}_out" / ref_file.name).read_text())["res"]
            assert got["score"] == pytest.approx(ref["score"], rel=1e-5, abs=1e-6)
            assert got["is_anomaly"] == ref["is_anomaly"]
            assert got["anomaly_map"]["mean"] == pytest.approx(ref["anomaly_map"]["mean"], rel=1e-4)


def test_an_int8_patchcore_export_runs_without_paddle_and_ranks_like_fp32(models, tmp_path):
    """`--precision int8` (PatchCore): model.json records the precision and what it was
    calibrated on (the training data model.json names); predict runs it without Paddle; its
    scores order the test images as float32's do (Spearman >= 0.9) and lie within 15% of
    float32's largest score of them."""
    exported = tmp_path / "pc_int8"
    code, text = invoke("export", models / "patchcore", "--out", exported, "--format", "onnx", "--precision", "int8")
    assert code == 0, text
    card = json.loads((exported / "model.json").read_text())
    assert card["export"]["precision"] == "int8"
    assert card["export"]["int8"]["calibration"]["data"] == str(models / "data")
    assert card["export"]["int8"]["calibration"]["inputs"] == 10  # every training image, up to 64
    graph = __import__("onnx").load(str(exported / "model.onnx")).graph
    producer = {out: n.op_type for n in graph.node for out in n.output}
    fed = lambda op: [producer.get(i) for n in graph.node if n.op_type == op for i in n.input]  # noqa: E731
    assert fed("Conv").count("DequantizeLinear") > 20  # the backbone is quantised ...
    assert "DequantizeLinear" not in fed("MatMul") + fed("ReduceMin")  # ... the nearest-bank search is not,
    stem = [n for n in graph.node if n.op_type == "Conv" and graph.input[0].name in n.input]
    assert len(stem) == 1 and "DequantizeLinear" not in [producer.get(i) for i in stem[0].input]  # nor the stem
    from stfpm.model.inference import Predictor

    test_dir = models / "data" / "test"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", NO_PADDLE_PREDICT, "predict", str(exported), str(test_dir),
                           "--out", str(tmp_path / "int8_out")], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "PADDLE-FREE 0" in done.stdout, done.stdout + done.stderr
    int8 = Predictor.open(exported)
    assert int8.engine == "onnxruntime"
    for out in sorted((tmp_path / "int8_out").glob("*.json")):  # the Paddle-free run is this export's
        res = json.loads(out.read_text())["res"]
        assert res["score"] == pytest.approx(int8.predict([Path(res["input_path"]).read_bytes()])[0].score, rel=1e-5)
    images = [p.read_bytes() for p in sorted((models / "data").rglob("*.png")) if "ground_truth" not in p.parts]
    assert len(images) >= 12  # training and test images: scores from near the bank to far from it
    ref = np.array([p.score for p in Predictor.open(models / "patchcore", engine="onnxruntime").predict(images)])
    got = np.array([p.score for p in int8.predict(images)])
    assert not np.allclose(got, ref, rtol=1e-4)  # it is another forward ...
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(ranks(got), ranks(ref))[0, 1] >= 0.9, (got, ref)  # ... that orders the images alike
    assert np.abs(got - ref).max() <= 0.15 * ref.max(), (got, ref)


def test_int8_is_refused_where_it_was_not_adopted(models, tmp_path):
    """STFPM (int8 moved its dev-set AUROC too far), a format other than ONNX, calibration data
    that is not there, and an int8 export on OpenVINO each get a one-line error."""
    from stfpm.model.card import ModelDirError
    from stfpm.model.inference import Predictor

    code, text = invoke("export", models / "stfpm", "--out", tmp_path / "st", "--format", "onnx", "--precision", "int8")
    assert code == 2 and "int8 is offered for PatchCore only" in text, text
    code, text = invoke("export", models / "patchcore", "--out", tmp_path / "ov", "--format", "openvino",
                        "--precision", "int8")
    assert code == 2 and "use --format onnx" in text, text
    code, text = invoke("export", models / "patchcore", "--out", tmp_path / "pc", "--format", "onnx", "--precision",
                        "int8", "--calibration-data", tmp_path / "nowhere")
    assert code == 2 and "nowhere: not a dataset folder" in text, text
    code, text = invoke("export", models / "patchcore", "--out", tmp_path / "pc", "--format", "onnx", "--precision",
                        "int4")
    assert code == 2 and "unknown precision 'int4'" in text, text
    assert invoke("export", models / "patchcore_tiled", "--out", tmp_path / "pc", "--format", "onnx", "--precision",
                  "int8", "--calibration-data", models / "data")[0] == 0
    with pytest.raises(ModelDirError, match="runs on onnxruntime, not on openvino"):
        Predictor.open(tmp_path / "pc", engine="openvino")
