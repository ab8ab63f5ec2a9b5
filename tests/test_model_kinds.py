"""One model-kind rule everywhere (issue 25): a model directory or export says what it holds,
so every verb works for both kinds without being told, and model names are case-insensitive.
Every CLI verb (train, evaluate, predict, export, score, the audit job) runs on an STFPM and
a PatchCore model trained with the default (offline) backbone on tiny synthetic data.
import-paddlex makes STFPM models only (PaddleX has no PatchCore): tests/test_paddlex_import.py."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stfpm import create_model
from test_cli import invoke  # the one CLI-runner helper of the tests

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_kinds(tmp_path_factory):
    """An STFPM and a PatchCore model, trained through the CLI with `--model` in two spellings
    and no --backbone (the default works offline)."""
    root = tmp_path_factory.mktemp("kinds")
    data = root / "data"
    assert invoke("synth", data, "--n-train", 10, "--n-test", 6, "--size", 64, "--seed", 0)[0] == 0
    models = {}
    for kind, spelling, extra in (("STFPM", "STFPM", ["--epochs", 1, "--batch-size", 4]),
                                  ("PatchCore", "PatchCore", ["--bank-fraction", 0.1])):
        out = root / "models" / kind.lower()
        code, text = invoke("train", data, "--out", out, "--model", spelling, "--image-size", 64, *extra)
        assert code == 0 and "model written" in text, text
        card = json.loads((out / "model.json").read_text())
        assert card["model_name"] == kind and card["backbone"] == "efficientnet_lite0"
        models[kind] = out
    return root, data, models


@pytest.mark.parametrize("kind", ["STFPM", "PatchCore"])
def test_every_verb_on_the_model_dir_alone(two_kinds, kind):
    root, data, models = two_kinds
    model, out = models[kind], root / f"out_{kind}"
    code, text = invoke("evaluate", model, data, "--out", out / "eval")
    assert code == 0 and "image_auroc" in text, text
    code, text = invoke("predict", model, data / "test", "--out", out / "pred", "--batch-size", 4)
    assert code == 0 and "6 images" in text, text
    assert len(list((out / "pred").glob("*.json"))) == 6
    code, text = invoke("export", model, "--out", out / "export")
    assert code == 0 and f"create_model(model_dir={str(out / 'export')!r})" in text, text
    code, text = invoke("predict", out / "export", data / "test" / "good", "--out", out / "pred_export")
    assert code == 0 and "images," in text, text

    # the Python API: what `export` prints works as printed, and a name in any case is accepted
    exported = create_model(model_dir=str(out / "export"))
    assert exported.model_name == kind
    for name in (kind, kind.lower(), kind.upper()):
        assert create_model(name, model_dir=model).model_name == kind
    other = "PatchCore" if kind == "STFPM" else "stfpm"
    with pytest.raises(ValueError, match=f"holds a {kind} model, not {other}") as err:
        create_model(model_name=other, model_dir=model)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown model_name 'PaDiM'"):
        create_model(model_name="PaDiM", model_dir=model)


def test_score_and_the_audit_job_on_both_kinds(two_kinds, monkeypatch):
    """One registry holding both kinds: `stfpm score` (with RAY_ADDRESS=local: the one-machine
    layout, fused actors) and jobs/nightly_audit.py score every category with its own model."""
    root, data, models = two_kinds
    (root / "registry.yaml").write_text(yaml.safe_dump({"models": {c: str(m) for c, m in models.items()}}))
    for category in models:
        shutil.copytree(data / "test", root / "incoming" / category)
    monkeypatch.setenv("RAY_ADDRESS", "local")
    code, text = invoke("score", root / "registry.yaml", root / "incoming", root / "scored",
                        "--partitions", "category,kind", "--batch-size", 4)
    assert code == 0, text
    success = json.loads((root / "scored" / "_SUCCESS").read_text())
    assert success["layout"]["fused"] is True, success["layout"]  # RAY_ADDRESS=local: one machine
    table = pd.read_parquet(root / "scored" / "scores")
    assert (table["status"] == "ok").all(), table["error"].tolist()
    assert table.groupby("category").size().to_dict() == {"PatchCore": 6, "STFPM": 6}

    config = root / "audit.yaml"
    config.write_text(yaml.safe_dump({
        "source": str(root / "incoming"), "partitions": ["category", "kind"], "models": str(root / "registry.yaml"),
        "output": str(root / "audit"), "settle_minutes": 0, "alert": {"anomaly_rate": 1.0, "ood_rate": 1.0},
        "scoring": {"batch_size": 4}}))
    spec = importlib.util.spec_from_file_location("nightly_audit", REPO / "jobs" / "nightly_audit.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["--config", str(config)]) == 0
    (run,) = (root / "audit" / "runs").iterdir()
    summary = json.loads((run / "audit.json").read_text())
    scored = {category: c["ok"] for category, c in summary["categories"].items()}
    assert scored == {"PatchCore": 6, "STFPM": 6}, summary["categories"]
