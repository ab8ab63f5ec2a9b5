"""The synthetic defect generator and the PaddleX-style dataset check."""
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from stfpm.data import (DEFECT_KINDS, DatasetError, add_defect, check_dataset, make_synthetic_dataset,
                        read_mask, render_texture)
from stfpm.data.synth import texture_family

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared beside the checkout


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "fabric"
    make_synthetic_dataset(root, n_train=6, n_test=12, size=96, seed=7)
    return root


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_layout_and_masks(synth):
    ds = make_synthetic_dataset(synth.parent / "again", n_train=6, n_test=12, size=96, seed=7)
    assert len(ds.train) == 6 and len(ds.test) == 12 and ds.warnings == []
    assert sum(s.label for s in ds.test) == 6
    assert {s.defect_type for s in ds.test if s.label} == set(DEFECT_KINDS)
    for sample in ds.test:
        assert (sample.mask is not None) == bool(sample.label)
        if sample.mask:
            raw = cv2.imread(sample.mask, cv2.IMREAD_UNCHANGED)
            assert raw.shape == (96, 96) and set(np.unique(raw)) == {0, 255}
            assert 0.01 <= (raw > 0).mean() <= 0.06, sample.mask


def test_synth_is_byte_identical_for_a_seed(synth, tmp_path):
    make_synthetic_dataset(tmp_path / "same", n_train=6, n_test=12, size=96, seed=7)
    make_synthetic_dataset(tmp_path / "other", n_train=6, n_test=12, size=96, seed=8)
    assert files(tmp_path / "same") == files(synth)
    assert files(tmp_path / "other") != files(synth)


def test_synth_refuses_a_non_empty_folder(synth):
    with pytest.raises(FileExistsError, match="not empty"):
        make_synthetic_dataset(synth, n_train=1, n_test=0)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defects_are_inside_their_masks_and_visible(kind):
    for i in range(4):
        rng = np.random.default_rng([1, i])
        clean = render_texture(rng, 128, texture_family(1))
        defective, mask = add_defect(clean, kind, rng)
        changed = (defective != clean).any(axis=2)
        assert not (changed & ~mask).any()
        assert changed[mask].mean() > 0.6
        assert np.abs(defective.astype(int) - clean)[mask].mean() > 10, kind   # clearly visible


def test_check_passes_on_synth(synth, tmp_path):
    result = check_dataset(synth, tmp_path / "report")
    assert json.loads((tmp_path / "report" / "check_dataset_result.json").read_text()) == result
    assert result["check_pass"] and result["done_flag"] and result["problems"] == []
    assert result["dataset_type"] == "AnomalyDataset" and result["show_type"] == "image"
    attrs = result["attributes"]
    assert (attrs["layout"], attrs["train_samples"], attrs["test_samples"]) == ("mvtec", 6, 12)
    assert attrs["counts"]["test"] == {"good": 6, "blur": 1, "color": 1, "missing": 1, "scratch": 2, "spot": 1}
    assert attrs["image_sizes"] == [{"width": 96, "height": 96, "count": 18}]
    assert attrs["modes"] == {"RGB 8-bit": 18} and attrs["mask_coverage"]["masks"] == 6
    assert 0.01 < attrs["mask_coverage"]["min"] <= attrs["mask_coverage"]["max"] < 0.06
    demos = attrs["train_sample_paths"] + attrs["test_sample_paths"]
    assert len(attrs["train_sample_paths"]) == 3 and len(attrs["test_sample_paths"]) == 4
    assert all(cv2.imread(str(tmp_path / "report" / p)).shape == (96, 96, 3) for p in demos)
    defective_demo = cv2.imread(str(tmp_path / "report" / attrs["test_sample_paths"][0]))
    assert ((defective_demo == (0, 0, 255)).all(axis=2)).sum() > 10        # the red mask outline
    histogram = cv2.imread(str(tmp_path / "report" / result["analysis"]["histogram"]))
    assert histogram.shape[0] > 200 and histogram.shape[1] > 400


def test_check_fails_naming_every_problem(synth, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(synth, broken)
    (broken / "train" / "good" / "000.png").write_bytes(b"")                          # empty
    cut = broken / "train" / "good" / "001.png"
    cut.write_bytes(cut.read_bytes()[:300])                                           # truncated
    cv2.imwrite(str(broken / "ground_truth" / "spot" / "000_mask.png"), np.zeros((50, 40), np.uint8))  # wrong size
    (broken / "ground_truth" / "blur" / "000_mask.png").unlink()                      # missing mask
    shutil.copy(broken / "ground_truth" / "color" / "000_mask.png", broken / "ground_truth" / "color" / "009_mask.png")
    with pytest.raises(DatasetError) as info:
        check_dataset(broken, tmp_path / "report")
    result = json.loads((tmp_path / "report" / "check_dataset_result.json").read_text())
    assert result["check_pass"] is False and result["problems"] == info.value.problems
    expected = [("train/good/000.png", "empty file"), ("train/good/001.png", "truncated or corrupt PNG"),
                ("spot/000_mask.png", "mask is 40x50 but its image"), ("test/blur/000.png", "no mask"),
                ("color/009_mask.png", "mask without an image")]
    for path, reason in expected:
        assert any(path in p and reason in p for p in result["problems"]), (path, result["problems"])
    assert len(result["problems"]) == len(expected)
    assert result["attributes"]["train_samples"] == 5   # the empty file is not a sample


def test_check_on_a_missing_root_still_writes_the_report(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        check_dataset(tmp_path / "nowhere", tmp_path / "report")
    result = json.loads((tmp_path / "report" / "check_dataset_result.json").read_text())
    assert result["check_pass"] is False and result["attributes"]["train_samples"] == 0


@pytest.mark.parametrize("name, mode, masks", [("mvtec_bottle_dev", "RGB 8-bit", 63),
                                               ("mvtec_screw_dev", "L 8-bit", 0)])
def test_check_on_shared_mvtec_categories(name, mode, masks, tmp_path):
    if not (SHARED / name).is_dir():
        pytest.skip(f"{SHARED / name} not present")
    result = check_dataset(SHARED / name, tmp_path / "report")
    assert result["check_pass"] and list(result["attributes"]["modes"]) == [mode]
    coverage = result["attributes"]["mask_coverage"]
    assert (coverage["masks"] if coverage else 0) == masks
    if masks:
        defective = read_mask(next((SHARED / name / "ground_truth").rglob("*_mask.png")))
        assert defective.shape == (256, 256) and defective.any()
