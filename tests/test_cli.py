"""The `stfpm` command line, end to end on tiny generated data."""
import json

import cv2
import numpy as np
import yaml
from typer.testing import CliRunner

from stfpm.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_cli_workflow(tmp_path):
    data, model, out = tmp_path / "data", tmp_path / "model", tmp_path / "out"
    code, text = invoke("synth", data, "--n-train", 16, "--n-test", 8, "--size", 64, "--seed", 0)
    assert code == 0, text
    code, text = invoke("check-dataset", data, "--out", out / "check")
    assert code == 0 and "Check dataset passed" in text, text
    assert json.loads((out / "check" / "check_dataset_result.json").read_text())["check_pass"]
    code, text = invoke("train", data, "--out", model, "--backbone", "efficientnet_lite0", "--epochs", 2,
                        "--image-size", 64, "--batch-size", 8)
    assert code == 0 and "model written" in text, text
    code, text = invoke("evaluate", model, data, "--out", out / "eval", "--set-threshold")
    assert code == 0 and "decisions use the model's threshold" in text and "held-out" in text, text
    metrics = json.loads((out / "eval" / "evaluate_result.json").read_text())["metrics"]
    assert {"image_auroc", "pixel_auroc", "aupro", "image_f1_max", "image_f1_threshold",
            "per_defect_type_image_auroc"} <= set(metrics)
    meta = json.loads((model / "model.json").read_text())
    assert meta["threshold"]["source"] == "f1_test" and meta["threshold"]["value"] == metrics["image_f1_threshold"]
    code, text = invoke("predict", model, data / "test", "--out", out / "pred", "--batch-size", 4)
    assert code == 0 and "8 images" in text, text
    names = {f"{p.parent.name}_{p.stem}" for p in (data / "test").rglob("*.png")}  # good_000, blur_000, ...
    assert {p.stem for p in (out / "pred").glob("*.png")} == names == {p.stem for p in (out / "pred").glob("*.json")}
    # a wrong path is named before any work; the good inputs are still scored, then exit 2
    code, text = invoke("predict", model, data / "test" / "good", tmp_path / "missing.png", "--out", out / "pred3")
    assert code == 2 and "missing.png" in text and "Traceback" not in text, text
    assert text.index("images,") < text.index("missing.png") and len(list((out / "pred3").glob("*.png"))) > 0
    code, text = invoke("export", model, "--out", model / "inference")
    assert code == 0 and (model / "inference" / "inference.yml").is_file(), text
    code, text = invoke("predict", model / "inference", data / "test" / "good", "--out", out / "pred2")
    assert code == 0, text
    ramp = tmp_path / "ramp.png"  # nothing like the training textures: predict says so
    cv2.imwrite(str(ramp), np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, :], 64, axis=0))
    code, text = invoke("predict", model, ramp, data / "test" / "good" / "000.png", "--out", out / "pred3")
    assert code == 0 and "  OOD" in text and "warning: 1 of 2 images are unlike this model's training images" in text, text


def test_train_all_writes_a_registry(tmp_path):
    root = tmp_path / "cats"
    for i, name in enumerate(("alpha", "beta")):
        assert invoke("synth", root / name, "--n-train", 8, "--n-test", 4, "--size", 64, "--seed", i)[0] == 0
    (root / "not_a_category").mkdir()
    code, text = invoke("train-all", root, "--out", tmp_path / "models", "--backbone", "efficientnet_lite0",
                        "--epochs", 1, "--image-size", 64, "--batch-size", 8)
    assert code == 0, text
    registry = yaml.safe_load((tmp_path / "models" / "registry.yaml").read_text())
    assert registry == {"models": {"alpha": "alpha", "beta": "beta"}}
    assert (tmp_path / "models" / "beta" / "model.json").is_file()


def test_help_shows_no_value_for_flags():
    code, text = invoke("evaluate", "--help")
    assert code == 0 and "--set-threshold  " in text and "--threshold <float>" in text, text
    assert "<bool>" not in text and "BOOLEAN" not in text  # a flag takes no value


def test_errors_name_what_is_wrong(tmp_path):
    code, text = invoke("train", tmp_path / "nowhere", "--out", tmp_path / "m")
    assert code == 2 and "nowhere" in text and "Traceback" not in text
    code, text = invoke("evaluate", tmp_path / "no_model", tmp_path)
    assert code == 2 and "no_model" in text and "stfpm train" in text
    code, text = invoke("train", tmp_path, "--out", tmp_path / "m", "--backbone", "vgg16")
    assert code == 2 and "vgg16" in text
    for option, value in (("--augment", "spin"), ("--layer-norm", "max")):
        code, text = invoke("train", tmp_path, "--out", tmp_path / "m", "--backbone", "efficientnet_lite0", option, value)
        assert code == 2 and repr(value) in text and option.strip("-").replace("-", "_") in text
    (tmp_path / "empty").mkdir()
    code, text = invoke("check-dataset", tmp_path / "empty", "--out", tmp_path / "chk")
    assert code == 2 and "empty" in text
    code, text = invoke("train-all", tmp_path / "empty", "--out", tmp_path / "models")
    assert code == 2 and "no category folders" in text


def test_the_train_job_takes_every_training_option_of_the_cli():
    """jobs/train.py builds its options from the CLI's list, so none can drift (it lacked
    --augment and --layer-norm before): the same flags give the same TrainConfig."""
    import importlib.util
    from pathlib import Path

    from stfpm.training.options import TRAINING_OPTIONS, train_config

    spec = importlib.util.spec_from_file_location("train_job", Path(__file__).parents[1] / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    flags = ["--backbone", "efficientnet_lite0", "--augment", "d4", "--layer-norm", "median", "--epochs", "3",
             "--holdout", "0.3", "--threshold-quantile", "0.95", "--gpu"]
    args = vars(job.parser().parse_args(["--data", "d", "--out", "o", *flags]))
    assert set(TRAINING_OPTIONS) <= set(args)
    cfg = train_config(args)
    assert (cfg.augment, cfg.layer_norm, cfg.epochs, cfg.holdout_fraction, cfg.threshold_quantile) == (
        "d4", "median", 3, 0.3, 0.95)
    assert args["gpu"] and args["workers"] == 2 and args["max_failures"] == 2  # the job's own defaults
