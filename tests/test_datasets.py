"""Dataset discovery for the three layouts, every problem named, and the hold-out split."""
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from stfpm.data import DatasetError, Sample, load_dataset, scan_dataset, split_holdout

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared beside the checkout


def write_image(path: Path, value: int = 128, size: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full(size + (3,), value, np.uint8))
    return path


def write_mask(path: Path, defective: bool, size: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size, np.uint8)
    mask[4:8, 4:8] = 255 if defective else 0
    cv2.imwrite(str(path), mask)
    return path


def make_mvtec(root: Path, masks: bool = True) -> Path:
    for i in range(3):
        write_image(root / "train" / "good" / f"{i:03d}.png")
    write_image(root / "test" / "good" / "000.png")
    for kind in ("crack", "hole"):
        for i in range(2):
            write_image(root / "test" / kind / f"{i:03d}.png", 30)
            if masks:
                write_mask(root / "ground_truth" / kind / f"{i:03d}_mask.png", True)
    return root


def problems_of(root: Path) -> list[str]:
    with pytest.raises(DatasetError) as info:
        load_dataset(root)
    assert all(p in str(info.value) for p in info.value.problems)
    assert pickle.loads(pickle.dumps(info.value)).problems == info.value.problems
    return info.value.problems


def test_mvtec_layout(tmp_path):
    ds = load_dataset(make_mvtec(tmp_path / "cat"))
    assert ds.layout == "mvtec" and ds.warnings == []
    assert [Path(s.image).name for s in ds.train] == ["000.png", "001.png", "002.png"]
    assert all(Path(s.image).is_absolute() and s.label == 0 and s.mask is None for s in ds.train)
    assert [(s.defect_type, s.label) for s in ds.test] == [("crack", 1)] * 2 + [("good", 0)] + [("hole", 1)] * 2
    crack = ds.test[0]
    assert crack.mask == str(tmp_path / "cat" / "ground_truth" / "crack" / "000_mask.png")


def test_mvtec_without_ground_truth_warns(tmp_path):
    ds = load_dataset(make_mvtec(tmp_path / "cat", masks=False))
    assert all(s.mask is None for s in ds.test) and sum(s.label for s in ds.test) == 4
    assert any("ground_truth" in w and "pixel metrics are unavailable" in w for w in ds.warnings)


def test_mvtec_problems_are_all_named(tmp_path):
    root = make_mvtec(tmp_path / "cat")
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()              # image without mask
    write_mask(root / "ground_truth" / "hole" / "007_mask.png", True)         # mask without image
    write_mask(root / "ground_truth" / "stain" / "000_mask.png", True)        # masks for no test type
    (root / "train" / "good" / "empty.png").write_bytes(b"")
    (root / "test" / "good" / "notes.png").write_text("not an image")
    problems = problems_of(root)
    expected = [("test/crack/001.png", "no mask"), ("hole/007_mask.png", "mask without an image"),
                ("ground_truth/stain", "masks without images"), ("train/good/empty.png", "empty file"),
                ("test/good/notes.png", "not a PNG")]
    for path, reason in expected:
        assert any(path in p and reason in p for p in problems), (path, problems)
    assert len(problems) == len(expected)


def test_missing_root_and_missing_train_good(tmp_path):
    assert problems_of(tmp_path / "nowhere") == [f"{tmp_path / 'nowhere'}: dataset folder does not exist"]
    write_image(tmp_path / "cat" / "test" / "good" / "000.png")
    problems = problems_of(tmp_path / "cat")
    assert len(problems) == 1 and "train/good: missing" in problems[0]
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    assert "no training images" in problems_of(tmp_path / "cat")[0]


def test_paddlex_lists(tmp_path):
    root = tmp_path / "px"
    for i in range(3):
        write_image(root / "images" / f"tr{i}.png")
        write_mask(root / "masks" / f"tr{i}.png", False)
    write_image(root / "images" / "tr3.png")
    (root / "train.txt").write_text("images/tr0.png masks/tr0.png\nimages/tr1.png masks/tr1.png\n"
                                    "\nimages/tr2.png masks/tr2.png\nimages/tr3.png\n")
    for name, defective in (("ok", False), ("bad", True)):
        write_image(root / "images" / f"{name}.png")
        write_mask(root / "masks" / f"{name}.png", defective)
    (root / "val.txt").write_text("images/ok.png masks/ok.png\nimages/bad.png masks/bad.png\n")
    ds = load_dataset(root)
    assert ds.layout == "paddlex_list" and len(ds.train) == 4 and ds.warnings == []
    assert [(s.label, s.defect_type, s.mask) for s in ds.test] == [
        (0, "good", None), (1, "defect", str(root / "masks" / "bad.png"))]


def test_paddlex_list_problems(tmp_path):
    root = tmp_path / "px"
    write_image(root / "a.png")
    write_image(root / "d.png")
    write_mask(root / "d_mask.png", True)
    (root / "train.txt").write_text("a.png\nmissing.png\nd.png d_mask.png\na.png b.png c.png\n")
    (root / "val.txt").write_text("a.png\na.png gone_mask.png\n")
    problems = problems_of(root)
    expected = [("train.txt:2", "missing.png does not exist"), ("d.png", "training uses good images only"),
                ("train.txt:4", "expected 'image_path [mask_path]'"), ("val.txt:1", "label is unknown"),
                ("val.txt:2", "gone_mask.png does not exist")]
    for where, reason in expected:
        assert any(where in p and reason in p for p in problems), (where, problems)
    assert len(problems) == len(expected)


def test_plain_folder_is_recursive_and_sorted(tmp_path):
    root = tmp_path / "plain"
    for rel in ("b.png", "a/z.jpg", "a/y.bmp", ".hidden/x.png"):
        write_image(root / rel)
    (root / "README.txt").write_text("hi")
    ds = load_dataset(root)
    assert ds.layout == "folder" and ds.test == []
    assert [Path(s.image).relative_to(root).as_posix() for s in ds.train] == ["a/y.bmp", "a/z.jpg", "b.png"]
    assert any("README.txt" in w for w in ds.warnings) and any("no test set" in w for w in ds.warnings)
    (tmp_path / "empty").mkdir()
    assert "no images found" in problems_of(tmp_path / "empty")[0]


def test_scan_dataset_reports_without_raising(tmp_path):
    root = make_mvtec(tmp_path / "cat")
    (root / "train" / "good" / "000.png").write_bytes(b"")
    ds, problems = scan_dataset(root)
    assert len(ds.train) == 2 and len(problems) == 1   # the bad sample is left out, and named


def _samples(n: int) -> list[Sample]:
    return [Sample(f"/d/{i:03d}.png", 0, "good", None) for i in range(n)]


def test_split_holdout_is_deterministic_and_order_independent():
    samples = _samples(20)
    kept, held = split_holdout(samples, 0.2, seed=3)
    assert len(held) == 4 and len(kept) == 16 and not set(kept) & set(held)
    assert split_holdout(list(reversed(samples)), 0.2, seed=3) == (kept, held)
    assert split_holdout(samples, 0.2, seed=4)[1] != held
    assert [len(h) for _, h in (split_holdout(_samples(n), 0.2) for n in (0, 1, 2, 3))] == [0, 0, 1, 1]
    assert split_holdout(_samples(2), 0.9)[0] != []          # never holds out everything
    assert split_holdout(samples, 0.0)[1] == []
    with pytest.raises(ValueError):
        split_holdout(samples, 1.0)


@pytest.mark.parametrize("name, n_train, n_test, n_defective, with_masks", [
    ("mvtec_bottle_dev", 209, 83, 63, True),
    ("mvtec_screw_dev", 200, 100, 50, False),
])
def test_shared_mvtec_categories(name, n_train, n_test, n_defective, with_masks):
    if not (SHARED / name).is_dir():
        pytest.skip(f"{SHARED / name} not present")
    ds = load_dataset(SHARED / name)
    assert (len(ds.train), len(ds.test), sum(s.label for s in ds.test)) == (n_train, n_test, n_defective)
    assert all((s.mask is not None) == with_masks for s in ds.test if s.label)
