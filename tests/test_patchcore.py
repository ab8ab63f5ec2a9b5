"""PatchCore: its pieces (features, coreset, bank bound) and one tiny model through every path:
train, predict, evaluate, export, and `stfpm score` with a registry mixing STFPM and PatchCore."""
import json
import shutil

import numpy as np
import paddle
import paddle.nn.functional as F
import pandas as pd
import pytest
import ray

from stfpm.nn.maps import images_per_forward
from stfpm.nn.patchcore import _upsample2x, greedy_coreset, subsample_patches
from test_cli import invoke  # the one CLI-runner helper of the tests


def test_upsampling_is_bilinear_with_half_pixel_centres():
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((2, 3, 7, 5)).astype(np.float32))
    reference = F.interpolate(x, size=[14, 10], mode="bilinear", align_corners=False)
    assert float((_upsample2x(_upsample2x(x, 2), 3) - reference).abs().max()) < 1e-5


def test_greedy_coreset_covers_every_cluster_before_repeating_one():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 16)) * 100
    points = np.concatenate([c + rng.standard_normal((200, 16)) for c in centres]).astype(np.float32)
    picked = greedy_coreset(points, 5, projection_dim=8)
    assert sorted(set(picked // 200)) == [0, 1, 2, 3, 4]


def test_subsampling_bounds_the_pool_and_the_forward_batch():
    features = np.random.default_rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32)
    rows = subsample_patches(features, 10, np.random.default_rng(0))
    assert rows.shape == (30, 4)
    all_rows = features.transpose(0, 2, 3, 1).reshape(-1, 4)
    assert all(any(np.array_equal(r, a) for a in all_rows) for r in rows[:5])
    assert images_per_forward(bank_size=4096, patches_per_image=1024, budget_bytes=64 << 20) == 4
    assert images_per_forward(bank_size=10 ** 7, patches_per_image=1024) == 1


@pytest.fixture
def ray_two_cpus():
    for attempt in range(3):  # Ray waits a fixed 30 s for its raylet: a loaded machine may need another go
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False)  # never another process's Ray
            break
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for the startup timeout
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
    yield
    ray.shutdown()


def test_patchcore_model_through_every_path(tmp_path, ray_two_cpus):
    from stfpm import create_model
    from stfpm.model.artifact import load_model, save_model
    from stfpm.model.card import Calibration, InputSpec, ModelCard, ModelDirError
    from stfpm.nn import STFPM

    data, pc = tmp_path / "data", tmp_path / "models" / "pc"
    assert invoke("synth", data, "--n-train", 16, "--n-test", 8, "--size", 64, "--seed", 0)[0] == 0
    code, text = invoke("train", data, "--out", pc, "--model", "patchcore", "--backbone", "efficientnet_lite0",
                        "--image-size", 64, "--bank-fraction", 0.1)
    assert code == 0 and "memory bank of" in text, text
    meta = json.loads((pc / "model.json").read_text())
    assert meta["model_name"] == "PatchCore" and set(meta["weights"]) == {"teacher.safetensors", "bank.safetensors"}
    # 13 training images x 8x8 patches at stride 8, 10% of them
    assert meta["patchcore"]["bank_size"] == int(np.ceil(0.1 * meta["training"]["n_train"] * 64))
    assert meta["threshold"]["source"] == "holdout_quantile" and meta["metrics"]["image_auroc"] is not None

    image = sorted((data / "test").rglob("*.png"))[-1]
    model = create_model(model_name="PatchCore", model_dir=pc)
    predicted = next(iter(model.predict(str(image))))
    assert predicted["anomaly_map"].shape == (64, 64)

    assert invoke("evaluate", pc, data, "--out", tmp_path / "eval")[0] == 0
    records = json.loads((tmp_path / "eval" / "evaluate_result.json").read_text())["images"]
    evaluated = next(r["score"] for r in records if r["image"] == str(image))

    code, text = invoke("export", pc, "--out", tmp_path / "export")
    assert code == 0, text
    exported = next(iter(create_model(model_name="PatchCore", model_dir=tmp_path / "export").predict(str(image))))

    paddle.seed(0)
    save_model(STFPM("efficientnet_lite0"), tmp_path / "models" / "st",
               ModelCard(model_name="STFPM", backbone="efficientnet_lite0", calibration=Calibration(0.5, 0.0, 1.0),
                         input=InputSpec.for_backbone("efficientnet_lite0", 64)))
    (tmp_path / "models" / "registry.yaml").write_text("models:\n  pc: pc\n  st: st\n")
    for category in ("pc", "st"):
        (tmp_path / "inputs" / category).mkdir(parents=True)
        shutil.copy(image, tmp_path / "inputs" / category / image.name)
    code, text = invoke("score", tmp_path / "models" / "registry.yaml", tmp_path / "inputs", tmp_path / "out",
                        "--batch-size", 4)
    assert code == 0, text
    table = pd.read_parquet(tmp_path / "out" / "scores").set_index("category")
    assert (table["status"] == "ok").all(), table["error"].tolist()
    assert table.loc["pc", "model_version"] == meta["model_version"]
    assert table.loc["st", "model_version"] != meta["model_version"]
    scored = table.loc["pc", "raw_score"]

    np.testing.assert_allclose([evaluated, exported["score"], scored], predicted["score"], rtol=1e-4)

    with pytest.raises(ValueError, match="holds a PatchCore model"):
        create_model(model_name="STFPM", model_dir=pc)
    bank = pc / "bank.safetensors"
    bank.write_bytes(bank.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ModelDirError, match="bank.safetensors does not match the sha256"):
        load_model(pc)


def test_a_patchcore_card_must_describe_its_bank():
    from stfpm.model.card import ModelDirError, parse_card, weights_version

    weights = {"teacher.safetensors": "a" * 64, "bank.safetensors": "b" * 64}
    card = {"schema_version": 1, "model_name": "PatchCore", "backbone": "efficientnet_lite0",
            "input": {"size": 64, "mean": [0.5] * 3, "std": [0.5] * 3},
            "threshold": {"value": 1.0, "score_min": 0.0, "score_max": 2.0}, "map": {"smooth_sigma": 4},
            "weights": weights, "model_version": weights_version(weights),
            "patchcore": {"taps": [1, 2], "bank_size": 10, "patches_per_image": 64}}
    assert parse_card(json.dumps(card), "m/model.json").patchcore["bank_size"] == 10
    for key, value, named in (("patchcore", None, "'patchcore' is missing"),
                              ("patchcore", {**card["patchcore"], "taps": [2, 1]}, "'patchcore.taps'"),
                              ("map", {"smooth_sigma": -1}, "'map.smooth_sigma'")):
        broken = {k: v for k, v in card.items() if k != key}
        if value is not None:
            broken[key] = value
        with pytest.raises(ModelDirError, match=named):
            parse_card(json.dumps(broken), "m/model.json")
