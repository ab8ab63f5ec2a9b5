"""Dataset discovery: MVTec AD categories, PaddleX list files and plain folders of good images.

`scan_dataset` never raises: it returns what it found plus every problem it saw, so a check
can report them all at once; `load_dataset` raises them as one `DatasetError`. A sample with a
problem (missing, empty or not an image, unusable mask) is left out of the lists. Only
headers are read here (plus PaddleX masks, whose content is the label); decoding every image
is `check_dataset`'s job.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stfpm.data.images import IMAGE_EXTENSIONS, ImageDecodeError, read_mask, sniff_image
from stfpm.errors import UserError


@dataclass(frozen=True)
class Sample:
    image: str            # absolute path
    label: int            # 0 good, 1 defective
    defect_type: str      # "good" or the defect folder name (PaddleX lists: "good"/"defect")
    mask: str | None      # absolute path of the mask; None for good images or when no mask exists


@dataclass
class Dataset:
    root: str
    layout: str           # "mvtec" | "paddlex_list" | "folder" ("unknown" when the root is missing)
    train: list[Sample] = field(default_factory=list)   # good images only
    test: list[Sample] = field(default_factory=list)    # may be empty (plain folder)
    warnings: list[str] = field(default_factory=list)


class DatasetError(UserError):
    """Every problem found in a dataset, each naming the file or folder."""

    def __init__(self, problems: list[str]):
        super().__init__(list(problems))  # args rebuild the error when it is unpickled
        self.problems = list(problems)

    def __str__(self) -> str:
        return f"{len(self.problems)} dataset problem(s):\n" + "\n".join(f"  - {p}" for p in self.problems)


# Training needs one image to learn from and one held out to set the threshold on; below
# FEW_TRAIN_IMAGES the threshold rests on one or two held-out scores (check-dataset warns).
MIN_TRAIN_IMAGES, FEW_TRAIN_IMAGES = 2, 10


def train_size_warning(dataset: Dataset) -> str | None:
    """The warning a small training set gets (check-dataset prints it), else None."""
    n = len(dataset.train)
    if not n or n >= FEW_TRAIN_IMAGES:
        return None
    need = (f"training refuses fewer than {MIN_TRAIN_IMAGES} (one to learn from, one held out for the threshold)"
            if n < MIN_TRAIN_IMAGES else "the threshold is set on the 20% of them held out")
    return f"{dataset.root}: only {n} good training image(s); {need}: give {FEW_TRAIN_IMAGES} or more, ideally 100+"


def load_dataset(root: str | Path) -> Dataset:
    dataset, problems = scan_dataset(root)
    if problems:
        raise DatasetError(problems)
    return dataset


def scan_dataset(root: str | Path) -> tuple[Dataset, list[str]]:
    """Detect the layout (MVTec, then PaddleX lists, then plain folder) and list the samples."""
    root = Path(os.path.abspath(Path(root).expanduser()))
    problems: list[str] = []
    if not root.is_dir():
        reason = "is a file, not a dataset folder" if root.exists() else "dataset folder does not exist"
        return Dataset(str(root), "unknown"), [f"{root}: {reason}"]
    has_lists = (root / "train.txt").is_file()
    # A train/ or test/ folder without train/good is a broken MVTec layout, not a plain folder
    # whose defective test images would silently become training images.
    looks_mvtec = (root / "train" / "good").is_dir() or (
        not has_lists and any((root / d).is_dir() for d in ("train", "test", "ground_truth")))
    if looks_mvtec:
        dataset = Dataset(str(root), "mvtec")
        _scan_mvtec(root, dataset, problems)
    elif has_lists:
        dataset = Dataset(str(root), "paddlex_list")
        _scan_lists(root, dataset, problems)
    else:
        dataset = Dataset(str(root), "folder")
        _scan_folder(root, dataset, problems)
    return dataset, problems


def split_holdout(samples: list[Sample], fraction: float = 0.2, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(kept, held out), deterministic for a seed and independent of input order. At least
    one sample is held out (and one kept) when there are two or more; fraction 0 holds none."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    ordered = sorted(samples, key=lambda s: s.image)
    n_holdout = 0 if fraction == 0 or len(ordered) < 2 else min(max(1, round(len(ordered) * fraction)), len(ordered) - 1)
    held = set(np.random.default_rng(seed).permutation(len(ordered))[:n_holdout].tolist())
    return ([s for i, s in enumerate(ordered) if i not in held],
            [s for i, s in enumerate(ordered) if i in held])


def _image_files(folder: Path, warnings: list[str], recursive: bool = False) -> list[Path]:
    """Image files by extension, sorted; hidden files are skipped, other files named in a warning."""
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in folder.glob(pattern)
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    others = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if others:
        names = ", ".join(str(p.relative_to(folder)) for p in others[:3]) + (", ..." if len(others) > 3 else "")
        warnings.append(f"{folder}: ignored {len(others)} file(s) that are not images ({names})")
    return [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]


def _readable(path: Path, problems: list[str]) -> bool:
    """Cheap check from the first bytes: exists, not empty, a known image format."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        problems.append(f"{path}: cannot be read ({e.strerror or e})")
        return False
    if not head:
        problems.append(f"{path}: empty file (0 bytes)")
    elif sniff_image(head) is None:
        problems.append(f"{path}: not a PNG, JPEG, BMP, TIFF or WebP image")
    else:
        return True
    return False


def _scan_mvtec(root: Path, dataset: Dataset, problems: list[str]) -> None:
    train_dir, test_dir, masks_dir = root / "train" / "good", root / "test", root / "ground_truth"
    if not train_dir.is_dir():
        problems.append(f"{train_dir}: missing (an MVTec layout keeps its good training images there)")
    else:
        dataset.train = [Sample(str(p), 0, "good", None)
                         for p in _image_files(train_dir, dataset.warnings) if _readable(p, problems)]
        if not dataset.train:
            problems.append(f"{train_dir}: no training images")
    if (root / "train").is_dir():
        for other in sorted(d for d in (root / "train").iterdir() if d.is_dir() and d.name != "good"):
            dataset.warnings.append(f"{other}: ignored (only train/good is used for training)")
    if not test_dir.is_dir():
        dataset.warnings.append(f"{test_dir}: missing, so the model cannot be evaluated")
        return
    defect_types = []
    for type_dir in sorted(d for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith(".")):
        images = [p for p in _image_files(type_dir, dataset.warnings) if _readable(p, problems)]
        if type_dir.name == "good":
            dataset.test += [Sample(str(p), 0, "good", None) for p in images]
            continue
        defect_types.append(type_dir.name)
        if masks_dir.is_dir() and (masks_dir / type_dir.name).is_dir():
            dataset.test += _masked_samples(images, masks_dir / type_dir.name, dataset.warnings, problems)
        else:
            dataset.test += [Sample(str(p), 1, type_dir.name, None) for p in images]
    unmasked = [t for t in defect_types if not (masks_dir / t).is_dir()]
    if not masks_dir.is_dir() and defect_types:
        dataset.warnings.append(f"{masks_dir}: missing, so pixel metrics are unavailable")
    elif unmasked:
        dataset.warnings.append(f"{masks_dir}: no masks for {', '.join(unmasked)}, so pixel metrics are unavailable")
    if masks_dir.is_dir():
        for orphan in sorted(d for d in masks_dir.iterdir() if d.is_dir() and d.name not in defect_types):
            problems.append(f"{orphan}: masks without images (no defective images in test/{orphan.name})")


def _masked_samples(images: list[Path], type_masks: Path, warnings: list[str], problems: list[str]) -> list[Sample]:
    """Defective samples with their `<stem>_mask.png`; a missing mask or a mask without an
    image is a problem once the type has a ground_truth folder."""
    samples, expected = [], set()
    for image in images:
        mask = type_masks / f"{image.stem}_mask.png"
        expected.add(mask.name)
        if not mask.is_file():
            problems.append(f"{image}: no mask (expected {mask})")
        elif _readable(mask, problems):
            samples.append(Sample(str(image), 1, type_masks.name, str(mask)))
    problems += [f"{mask}: mask without an image" for mask in _image_files(type_masks, warnings)
                 if mask.name not in expected]
    return samples


def _scan_lists(root: Path, dataset: Dataset, problems: list[str]) -> None:
    for sample in _read_list(root / "train.txt", root, problems, mask_required=False):
        if sample.label:
            problems.append(f"{sample.image}: listed in train.txt but its mask marks a defect "
                            "(training uses good images only)")
        else:
            dataset.train.append(sample)
    if not dataset.train:
        problems.append(f"{root / 'train.txt'}: no usable training images")
    if (root / "val.txt").is_file():
        dataset.test = _read_list(root / "val.txt", root, problems, mask_required=True)
    else:
        dataset.warnings.append(f"{root / 'val.txt'}: missing, so the model cannot be evaluated")


def _read_list(list_file: Path, root: Path, problems: list[str], mask_required: bool) -> list[Sample]:
    """PaddleX lines `image_rel_path [mask_rel_path]`; the label is 1 when the mask has any
    nonzero pixel, which is why masks are decoded here."""
    samples = []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        fields, where = line.split(), f"{list_file}:{number}"
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 2:
            problems.append(f"{where}: expected 'image_path [mask_path]', got {line.strip()!r}")
            continue
        image = Path(os.path.normpath(root / fields[0]))
        mask = Path(os.path.normpath(root / fields[1])) if len(fields) == 2 else None
        missing = [p for p in (image, mask) if p is not None and not p.is_file()]
        problems += [f"{where}: {p} does not exist" for p in missing]
        if missing or not _readable(image, problems) or (mask is not None and not _readable(mask, problems)):
            continue
        if mask is None:
            if mask_required:
                problems.append(f"{where}: {image} has no mask, so its label is unknown")
            else:
                samples.append(Sample(str(image), 0, "good", None))
            continue
        try:
            defective = bool(read_mask(mask).any())
        except ImageDecodeError as e:
            problems.append(str(e))
            continue
        samples.append(Sample(str(image), int(defective), "defect" if defective else "good",
                              str(mask) if defective else None))
    return samples


def _scan_folder(root: Path, dataset: Dataset, problems: list[str]) -> None:
    dataset.train = [Sample(str(p), 0, "good", None)
                     for p in _image_files(root, dataset.warnings, recursive=True) if _readable(p, problems)]
    if dataset.train:
        dataset.warnings.append(f"{root}: plain folder, so all {len(dataset.train)} images are taken as good "
                                "training images and there is no test set")
    else:
        problems.append(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
