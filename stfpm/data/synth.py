"""A synthetic MVTec-layout dataset: woven-fabric textures with masked defects.

Every image is the same texture family (one weave period, one thread colour per seed) with
natural per-image variation: weave phase, slightly wavy threads, contrast, brightness, slow
shading and sensor grain. Defects change pixels only inside their mask and cover about 1-5%
of the image, each kind clearly visible: scratches, spots, missing patches (flat fill),
blurred patches and colour shifts (a strong tint, so it shows in feature space too).
Each image has its own random stream derived from (seed, split, index), so the files are
byte-identical for a seed and image i does not depend on how many others are made.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from stfpm.data.datasets import Dataset, load_dataset

DEFECT_KINDS = ("scratch", "spot", "missing", "blur", "color")
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 6]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean noise about unit amplitude that varies over `size / cells` pixels."""
    coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def texture_family(seed: int) -> dict:
    """What all images of one dataset share: weave period and thread colours (BGR)."""
    rng = np.random.default_rng([seed, 0])
    base = rng.uniform(70, 190, 3)
    return {"period": float(rng.uniform(9, 13)), "colour": base,
            "other_colour": np.clip(base + rng.uniform(-40, 40, 3), 30, 230)}


def render_texture(rng: np.random.Generator, size: int, family: dict) -> np.ndarray:
    """A plain weave: threads alternate over and under on a checkerboard of cells; each
    thread is brightest along its centre line."""
    period = family["period"] * size / 128
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    x = x + rng.uniform(0, period) + 0.8 * _smooth_noise(rng, size, 3)
    y = y + rng.uniform(0, period) + 0.8 * _smooth_noise(rng, size, 3)
    cx, cy = x / period, y / period
    over = (np.floor(cx) + np.floor(cy)) % 2 == 0
    across = np.sin(np.pi * (cy % 1.0)) ** 0.7     # horizontal thread profile
    along = np.sin(np.pi * (cx % 1.0)) ** 0.7      # vertical thread profile
    pattern = np.where(over, across, along)
    contrast = rng.uniform(0.85, 1.15)
    brightness = rng.uniform(-0.05, 0.05) + 0.05 * _smooth_noise(rng, size, 2)
    shade = np.clip(0.55 + 0.45 * contrast * pattern + brightness, 0, 1.2)
    colour = np.where(over[..., None], family["colour"], family["other_colour"])
    image = colour * shade[..., None] + rng.normal(0, 3, (size, size, 1))
    return np.clip(image, 0, 255).astype(np.uint8)


def _blob(rng: np.random.Generator, size: int, radius: tuple[float, float], scale: float) -> np.ndarray:
    """A filled, randomly rotated ellipse away from the border, as a 0/255 mask."""
    mask = np.zeros((size, size), np.uint8)
    axes = tuple(max(1, int(round(r * scale))) for r in rng.uniform(*radius, 2))
    centre = tuple(int(c) for c in rng.integers(max(axes) + 2, size - max(axes) - 2, 2))
    cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    return mask


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator,
               defect_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(defective image, bool mask); pixels change only where the mask is set. Defects are
    sized relative to the image (as at 128 px, scaled), times `defect_scale`."""
    size = image.shape[0]
    scale = size / 128 * defect_scale
    if kind == "scratch":
        mask = np.zeros((size, size), np.uint8)
        length, angle = rng.uniform(45, 75) * scale, rng.uniform(0, np.pi)
        centre = rng.uniform(0.3, 0.7, 2) * size
        offset = np.array([np.cos(angle), np.sin(angle)]) * length / 2
        start, end = (tuple(int(v) for v in centre - offset), tuple(int(v) for v in centre + offset))
        cv2.line(mask, start, end, 255, max(2, int(round(3 * scale))), cv2.LINE_8)
        value = 20 if image.mean() > 110 else 235
        defect = np.full_like(image, value)
    elif kind == "spot":
        mask = _blob(rng, size, (7, 12), scale)
        defect = (image * rng.uniform(0.25, 0.4)).astype(np.uint8)
    elif kind == "missing":
        mask = np.zeros((size, size), np.uint8)
        side = np.maximum(2, rng.uniform(18, 26, 2) * scale).astype(int)
        corner = rng.integers(4, size - side.max() - 4, 2)
        mask[corner[1]:corner[1] + side[1], corner[0]:corner[0] + side[0]] = 255
        defect = np.full_like(image, int(image.mean() * rng.uniform(0.5, 0.7)))
    elif kind == "blur":
        mask = _blob(rng, size, (10, 14), scale)
        defect = cv2.GaussianBlur(image, (0, 0), 4 * scale)
    elif kind == "color":
        mask = _blob(rng, size, (10, 14), scale)
        tint = np.array([1.0, 1.0, 1.0]) + rng.permutation([0.6, -0.5, 0.0])
        defect = np.clip(image * tint, 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECT_KINDS}")
    inside = mask > 0
    return np.where(inside[..., None], defect, image), inside


def make_synthetic_dataset(out: str | Path, n_train: int, n_test: int, size: int = 128, seed: int = 0,
                           defect_scale: float = 1.0) -> Dataset:
    """Write train/good, test/good, test/<kind> and ground_truth/<kind>/<name>_mask.png
    (0/255) under `out`, which must be empty or absent. About half the test images are good;
    the defective ones cycle through DEFECT_KINDS. `defect_scale` < 1 makes defects smaller
    than their usual share of the image (large frames with small defects: tiling's case)."""
    if not 0 < defect_scale <= 4:
        raise ValueError(f"defect_scale must be in (0, 4], got {defect_scale}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; the synthetic dataset needs an empty or new folder")
    family = texture_family(seed)
    for i in range(n_train):
        _write(out / "train" / "good" / f"{i:03d}.png", render_texture(np.random.default_rng([seed, 1, i]), size, family))
    n_good = n_test - n_test // 2
    counts = dict.fromkeys(("good",) + DEFECT_KINDS, 0)
    for i in range(n_test):
        rng = np.random.default_rng([seed, 2, i])
        image = render_texture(rng, size, family)
        kind = "good" if i < n_good else DEFECT_KINDS[(i - n_good) % len(DEFECT_KINDS)]
        name = f"{counts[kind]:03d}"
        counts[kind] += 1
        if kind != "good":
            image, mask = add_defect(image, kind, rng, defect_scale)
            _write(out / "ground_truth" / kind / f"{name}_mask.png", mask.astype(np.uint8) * 255)
        _write(out / "test" / kind / f"{name}.png", image)
    return load_dataset(out)


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".png", image, _PNG_PARAMS)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    path.write_bytes(encoded.tobytes())
