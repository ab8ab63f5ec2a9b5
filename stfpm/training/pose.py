"""Which of the d4 transforms (flips, quarter turns) the good images are closed under, decided
from the good images alone with the frozen teacher (`--augment auto`).

A transform is safe to augment with when a transformed good image still looks like a good
image to the teacher: the position-free nearest-neighbour distances of its patch features to
the patches of untransformed held-out good images (local) stay within SAFE_RATIO of the
untransformed training images' distances (a turned part brings edges and shapes at
orientations no good image has). A texture or a part lying in any pose (a screw) passes every
transform; a part with a fixed pose (a transistor, whose "misplaced" defect is a turned part)
fails them, and augmenting with them would teach the student exactly that defect. The
distance of the whole pooled feature map to the nearest held-out image's (layout) is recorded
beside it but does not decide: on screw, whose poses vary and which needs d4, it is 1.2-1.5x
(24 held-out images cover few of the poses), as on the bottle (bench/RESULTS.md). Cost: the
teacher's forward of PROBE_IMAGES training images per transform (and of BANK_IMAGES held-out
ones once) plus nearest-neighbour searches: 15-80 s on one loaded CPU thread at 256 px."""
from __future__ import annotations

import time

import numpy as np

# The 7 non-identity elements of d4 on the last two axes (H, W) of an (N, C, H, W) batch.
D4_TRANSFORMS = {
    "hflip": lambda x: x[..., ::-1],
    "vflip": lambda x: x[..., ::-1, :],
    "rot90": lambda x: np.rot90(x, 1, axes=(-2, -1)),
    "rot180": lambda x: np.rot90(x, 2, axes=(-2, -1)),
    "rot270": lambda x: np.rot90(x, 3, axes=(-2, -1)),
    "transpose": lambda x: np.swapaxes(x, -2, -1),
    "antitranspose": lambda x: np.rot90(np.swapaxes(x, -2, -1), 2, axes=(-2, -1)),
}
PROBE_IMAGES = 24  # training images transformed per transform
BANK_IMAGES = 24  # untransformed held-out images compared against
TAP = 1  # the teacher tap compared (Lite0 at 256 px: 40 channels at 32x32)
LAYOUT_CELLS = 8  # the layout measure pools the tap to this many cells a side
BANK_PATCHES = 8192  # patches kept in the local measure's bank (a seeded random subset)
PROBE_PATCHES = 256  # patches per probe image in the local measure
SAFE_RATIO = 1.1  # kept when the local median ratio (transformed / untransformed) is at most this


def unit(x: np.ndarray, axis: int) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-6)


def tap_features(teacher, images: np.ndarray, batch: int = 8) -> np.ndarray:
    """(N, C, H, W) features of `images` (N, 3, S, S) at the teacher's TAP."""
    import paddle

    with paddle.no_grad():
        return np.concatenate([teacher(paddle.to_tensor(np.ascontiguousarray(images[i:i + batch])))[TAP].numpy()
                               for i in range(0, len(images), batch)])


def patches(feats: np.ndarray) -> np.ndarray:
    """(N, H*W, C) unit-length patch features."""
    n, c = feats.shape[:2]
    return unit(feats.reshape(n, c, -1).transpose(0, 2, 1), axis=2)


def layout(feats: np.ndarray) -> np.ndarray:
    """(N, LAYOUT_CELLS**2 * C) the feature map average-pooled to LAYOUT_CELLS a side, each cell
    unit length (a coarse picture of where what is)."""
    n, c, h, w = feats.shape
    k = max(1, h // LAYOUT_CELLS)
    pooled = feats[:, :, :h // k * k, :w // k * k].reshape(n, c, h // k, k, w // k, k).mean(axis=(3, 5))
    return unit(pooled, axis=1).reshape(n, -1)


def nn_distances(probe: np.ndarray, bank: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Euclidean distance of each row of `probe` (M, D) to its nearest row of `bank` (B, D)."""
    bank_sq = (bank ** 2).sum(axis=1)
    out = np.empty(len(probe), np.float32)
    for i in range(0, len(probe), chunk):
        rows = probe[i:i + chunk]
        sq = (rows ** 2).sum(axis=1)[:, None] + bank_sq[None] - 2.0 * rows @ bank.T
        out[i:i + chunk] = np.sqrt(np.maximum(sq.min(axis=1), 0.0))
    return out


def distances(feats: np.ndarray, bank_patches: np.ndarray, bank_layout: np.ndarray,
              keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the mean nearest-neighbour distance of its `keep` patches to the bank's
    patches (local), and of its layout to the nearest bank image's (layout)."""
    local = np.array([float(nn_distances(p[keep], bank_patches).mean()) for p in patches(feats)])
    return local, nn_distances(layout(feats), bank_layout)


def decide_augmentation(teacher, probe: np.ndarray, held: np.ndarray, seed: int = 0) -> tuple[str, dict]:
    """(the augmentation to train with, the evidence) from `probe`, training images, and
    `held`, held-out ones (normalised (N, 3, S, S), up to PROBE_IMAGES and BANK_IMAGES of
    each: `sample_paths`). Per transform and measure, the median over probe images of the
    ratio transformed / untransformed; kept when the local one is at most SAFE_RATIO. The result is
    "d4" when all 7 are kept, "flip" when only hflip is, "none" when none are, else the kept
    names joined by commas (what `augment_batch` takes)."""
    t0 = time.time()
    rng = np.random.default_rng(seed)
    bank_feats = tap_features(teacher, held)
    bank_patches = patches(bank_feats).reshape(-1, bank_feats.shape[1])
    bank_patches = bank_patches[rng.choice(len(bank_patches), min(BANK_PATCHES, len(bank_patches)), replace=False)]
    bank_layout = layout(bank_feats)
    n_cells = bank_feats.shape[2] * bank_feats.shape[3]
    keep = rng.choice(n_cells, min(PROBE_PATCHES, n_cells), replace=False)
    local0, layout0 = distances(tap_features(teacher, probe), bank_patches, bank_layout, keep)
    evidence = {"method": "per transform, the median over probe (training) images of the ratio transformed / "
                          "untransformed of (local) the mean patch nearest-neighbour distance to untransformed "
                          "held-out patches and (layout) the distance of the pooled feature map to the nearest "
                          "held-out image's (stfpm.training.pose); kept when local is at most safe_ratio (layout: recorded only)",
                "safe_ratio": SAFE_RATIO, "n_probe": len(probe), "n_bank_images": len(held),
                "n_bank_patches": len(bank_patches), "tap": TAP, "layout_cells": LAYOUT_CELLS,
                "untransformed": {"local_p90_ratio": round(float(np.quantile(local0, 0.9) / np.median(local0)), 4),
                                  "layout_p90_ratio": round(float(np.quantile(layout0, 0.9) / np.median(layout0)), 4)},
                "transforms": {}}
    kept = []
    for name, transform in D4_TRANSFORMS.items():
        local, lay = distances(tap_features(teacher, transform(probe)), bank_patches, bank_layout, keep)
        ratios = {"local": float(np.median(local / np.maximum(local0, 1e-9))),
                  "layout": float(np.median(lay / np.maximum(layout0, 1e-9)))}
        safe = ratios["local"] <= SAFE_RATIO
        evidence["transforms"][name] = {**{k: round(v, 4) for k, v in ratios.items()}, "kept": safe}
        if safe:
            kept.append(name)
    evidence["seconds"] = round(time.time() - t0, 1)
    return augmentation_name(kept), evidence


def sample_paths(train: list[str], holdout: list[str], seed: int) -> tuple[list[str], list[str]]:
    """The seeded PROBE_IMAGES training and BANK_IMAGES held-out images the decision reads."""
    rng = np.random.default_rng(seed)
    pick = lambda paths, n: [paths[i] for i in np.sort(rng.choice(len(paths), min(n, len(paths)), replace=False))]  # noqa: E731
    return pick(train, PROBE_IMAGES), pick(holdout, BANK_IMAGES)


def parse_augment(kind: str) -> list[str] | None:
    """The d4 transforms an augmentation name samples from besides the identity ("none": [];
    "flip": hflip; "d4": all 7; or comma-separated names), or None when `kind` is none of these."""
    if kind == "none":
        return []
    if kind == "flip":
        return ["hflip"]
    if kind == "d4":
        return list(D4_TRANSFORMS)
    names = [n.strip() for n in kind.split(",")]
    return names if names and all(n in D4_TRANSFORMS for n in names) else None


def augmentation_name(kept: list[str]) -> str:
    if len(kept) == len(D4_TRANSFORMS):
        return "d4"
    if kept == ["hflip"]:
        return "flip"
    return ",".join(kept) or "none"
