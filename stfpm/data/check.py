"""PaddleX-style dataset check (`Global.mode=check_dataset`): decode every image and mask,
report what the dataset holds, draw demo images and a histogram, and name every problem.

The JSON report is always written, with check_pass false and the problems listed when there
are any; only then is DatasetError raised, so a CLI can exit non-zero naming every problem.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from stfpm.data.datasets import Dataset, DatasetError, Sample, scan_dataset, train_size_warning
from stfpm.data.images import ImageDecodeError, decode_image, image_mode, read_image, read_mask

RESULT_FILE = "check_dataset_result.json"
HISTOGRAM_FILE = "histogram.png"
DEMO_DIR = "demo_img"
_RED, _BLACK, _WHITE = (0, 0, 255), (0, 0, 0), (255, 255, 255)


def check_dataset(root: str | Path, out_dir: str | Path) -> dict:
    """Write `out_dir/check_dataset_result.json`, `histogram.png` and `demo_img/*.png`;
    return the report; raise DatasetError after writing it if there were problems."""
    out_dir = Path(out_dir)
    (out_dir / DEMO_DIR).mkdir(parents=True, exist_ok=True)
    dataset, problems = scan_dataset(root)
    decoded: dict[str, list[Sample]] = {"train": [], "test": []}
    sizes, modes, coverage = Counter(), Counter(), []
    for split, samples in (("train", dataset.train), ("test", dataset.test)):
        for sample in samples:
            try:
                data = Path(sample.image).read_bytes()
                height, width = decode_image(data, sample.image).shape[:2]
                mask = read_mask(sample.mask) if sample.mask else None
            except (OSError, ImageDecodeError) as e:
                problems.append(str(e))
                continue
            if mask is not None and mask.shape != (height, width):
                problems.append(f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} "
                                f"but its image {sample.image} is {width}x{height}")
                continue
            decoded[split].append(sample)
            sizes[(width, height)] += 1
            modes[image_mode(data)] += 1
            if mask is not None:
                coverage.append(float(mask.mean()))
    train_paths = _write_demos(_spread(decoded["train"], 3), out_dir, "train")
    test_paths = _write_demos(_one_per_type(decoded["test"]), out_dir, "test")
    counts = _counts(dataset)
    cv2.imwrite(str(out_dir / HISTOGRAM_FILE), draw_histogram(counts))
    result = {
        "done_flag": True,
        "check_pass": not problems,
        "dataset_path": dataset.root,
        "dataset_type": "AnomalyDataset",
        "show_type": "image",
        "attributes": {
            "layout": dataset.layout,
            "train_samples": len(dataset.train),
            "test_samples": len(dataset.test),
            "counts": counts,
            "train_sample_paths": train_paths,
            "test_sample_paths": test_paths,
            "image_sizes": [{"width": w, "height": h, "count": n} for (w, h), n in sizes.most_common()],
            "modes": dict(modes.most_common()),
            "mask_coverage": ({"masks": len(coverage), "mean": float(np.mean(coverage)),
                               "min": min(coverage), "max": max(coverage)} if coverage else None),
        },
        "analysis": {"histogram": HISTOGRAM_FILE},
        "problems": problems,
        "warnings": dataset.warnings + [w for w in [train_size_warning(dataset)] if w],
    }
    (out_dir / RESULT_FILE).write_text(json.dumps(result, indent=2))
    if problems:
        raise DatasetError(problems)
    return result


def _counts(dataset: Dataset) -> dict[str, dict[str, int]]:
    """Samples per split and defect type, good first, then defect types in name order."""
    def per_type(samples: list[Sample]) -> dict[str, int]:
        counts = Counter(s.defect_type for s in samples)
        return {t: counts[t] for t in sorted(counts, key=lambda t: (t != "good", t))}
    return {"train": per_type(dataset.train), "test": per_type(dataset.test)}


def _spread(samples: list[Sample], n: int) -> list[Sample]:
    """Up to n samples evenly spaced through the list."""
    return [samples[i * len(samples) // n] for i in range(n)] if len(samples) > n else samples


def _one_per_type(samples: list[Sample], n_defective: int = 3) -> list[Sample]:
    """The first image of up to `n_defective` defect types, then the first good image."""
    firsts = {}
    for sample in samples:
        firsts.setdefault(sample.defect_type, sample)
    good = [firsts.pop("good")] if "good" in firsts else []
    return [firsts[t] for t in sorted(firsts)[:n_defective]] + good


def _write_demos(samples: list[Sample], out_dir: Path, split: str) -> list[str]:
    """Each image captioned with its defect type, the mask outline drawn in red."""
    paths = []
    for i, sample in enumerate(samples):
        image = read_image(sample.image)
        if sample.mask:
            contours, _ = cv2.findContours(read_mask(sample.mask).astype(np.uint8),
                                           cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(image, contours, -1, _RED, max(1, image.shape[1] // 256))
        _caption(image, sample.defect_type)
        relative = f"{DEMO_DIR}/{split}_{i:03d}.png"
        cv2.imwrite(str(out_dir / relative), image)
        paths.append(relative)
    return paths


def _caption(image: np.ndarray, text: str) -> None:
    scale = max(0.4, image.shape[1] / 640)
    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    cv2.rectangle(image, (0, 0), (width + 6, height + baseline + 6), _BLACK, -1)
    cv2.putText(image, text, (3, height + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, _WHITE, 1, cv2.LINE_AA)


def draw_histogram(counts: dict[str, dict[str, int]]) -> np.ndarray:
    """Horizontal bar chart of samples per split and defect type: one labelled row per
    (split, type), the count at the end of each bar (horizontal bars keep labels readable
    without rotated text, which cv2 cannot draw)."""
    rows = [(f"{split}/{kind}", n, split, kind) for split, kinds in counts.items() for kind, n in kinds.items()]
    label_w, bar_w, row_h, top = 200, 380, 30, 50
    canvas = np.full((top + row_h * max(1, len(rows)) + 20, label_w + bar_w + 70, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(canvas, "samples per split and defect type", (10, 30), font, 0.7, _BLACK, 2, cv2.LINE_AA)
    if not rows:
        cv2.putText(canvas, "no samples", (10, top + 20), font, 0.55, _BLACK, 1, cv2.LINE_AA)
    largest = max([n for _, n, _, _ in rows] + [1])
    for i, (label, n, split, kind) in enumerate(rows):
        y = top + i * row_h
        colour = (200, 120, 40) if split == "train" else (60, 160, 60) if kind == "good" else (40, 110, 230)
        length = int(round(bar_w * n / largest))
        cv2.putText(canvas, label[:26], (10, y + 20), font, 0.55, _BLACK, 1, cv2.LINE_AA)
        cv2.rectangle(canvas, (label_w, y + 5), (label_w + max(length, 1), y + row_h - 5), colour, -1)
        cv2.putText(canvas, str(n), (label_w + length + 6, y + 20), font, 0.55, _BLACK, 1, cv2.LINE_AA)
    return canvas
