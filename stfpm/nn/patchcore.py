"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022)
on a frozen teacher backbone: Paddle and numpy, no file or network IO.

- Locally aware patch features: two of the backbone's taps, each averaged over its 3x3
  neighbourhood, the coarser one bilinearly upsampled to the finer one's grid, concatenated.
- A memory bank of train/good patch features, reduced by greedy k-center coreset selection
  on a random projection (`greedy_coreset`).
- The map: each test patch's Euclidean distance to its nearest bank patch, upsampled to the
  input and Gaussian-smoothed with sigma 4 (the paper's setting; `smooth_map`); the image
  score is the map's max.

The network (`PatchCore.inference_outputs`) ends at the patch-distance map, like STFPM's network ends
at its per-layer maps: the nearest-neighbour search is one matmul + min inside the program,
so Paddle Inference runs it and an export carries the bank in its parameters.
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from stfpm.nn.backbones import build_backbone
from stfpm.nn.stfpm import feature_profile

PATCHCORE_TAPS = (1, 2)       # the stride-8 and stride-16 taps: the paper's "mid-level" layer2 + layer3
PROJECTION_DIM = 128          # the paper's random projection for the coreset distances
# Building the bank (stfpm.training.patchcore): at most `bank_pool` patches are kept, the same
# number drawn at random from each training image, and the coreset keeps `bank_fraction` of
# ALL training patches (the paper's "PatchCore-1%": 1% of every patch of every image).
# layer_norm and augment are STFPM options, fixed here to what PatchCore does (none).
PATCHCORE_RECIPE = {"bank_fraction": 0.01, "bank_pool": 40000, "layer_norm": "none", "augment": "none"}


def _upsample2x(x: paddle.Tensor, axis: int) -> paddle.Tensor:
    """Bilinear 2x upsampling along one axis with half-pixel centres (align_corners=False,
    edges clamped), written as slices so oneDNN runs it: Paddle 3.3's bilinear interpolate
    op cannot run under oneDNN (its scale attribute is an array of doubles)."""
    n = x.shape[axis]
    first, last = paddle.slice(x, [axis], [0], [1]), paddle.slice(x, [axis], [n - 1], [n])
    padded = paddle.concat([first, x, last], axis=axis)
    before, centre, after = (paddle.slice(padded, [axis], [k], [k + n]) for k in (0, 1, 2))
    even, odd = 0.25 * before + 0.75 * centre, 0.75 * centre + 0.25 * after
    shape = list(x.shape)
    shape[axis] = 2 * n
    return paddle.stack([even, odd], axis=axis + 1).reshape(shape)


def locally_aware_features(taps: list[paddle.Tensor], use: tuple[int, int]) -> paddle.Tensor:
    """(N, C1 + C2, h, w): taps[use[0]] (finer) and taps[use[1]] (coarser, bilinearly
    upsampled to h, w), each averaged over its 3x3 neighbourhood first. The taps are one
    stride apart (2x); where the finer grid is odd, the upsampled one is cropped to it."""
    finer = F.avg_pool2d(taps[use[0]], 3, stride=1, padding=1, exclusive=False)
    coarser = F.avg_pool2d(taps[use[1]], 3, stride=1, padding=1, exclusive=False)
    for _ in range(use[1] - use[0]):
        coarser = _upsample2x(_upsample2x(coarser, 2), 3)
    coarser = coarser[:, :, :finer.shape[2], :finer.shape[3]]
    return paddle.concat([finer, coarser], axis=1)


class MemoryBank(nn.Layer):
    """The bank of (M, C) patch features (a persistable buffer: saved with a program) and the
    exact nearest-neighbour search against it: one matmul + min, which Paddle Inference runs
    (bench/patchcore_nn.py compares it with faiss)."""

    def __init__(self, size: int, dim: int, view_split: int | None = None):
        super().__init__()
        self.register_buffer("patches", paddle.zeros([size, dim]))
        self.view_split = view_split  # per-view banks: the first view_split patches are the whole view's

    def forward(self, queries: paddle.Tensor) -> list[paddle.Tensor]:
        """(P, C) -> [(P,)] Euclidean distance of each query to its nearest bank patch; with
        per-view banks (the whole+tiles views) two: to the whole view's bank, to the tiles'."""
        bank = self.patches
        # |q - b|^2 = |q|^2 + (|b|^2 - 2 q.b): |q|^2 is added after the min, one pass less
        partial = paddle.sum(bank * bank, axis=1).unsqueeze(0) - 2.0 * paddle.matmul(queries, bank, transpose_y=True)
        norms = paddle.sum(queries * queries, axis=1)
        parts = [partial] if self.view_split is None else [partial[:, :self.view_split], partial[:, self.view_split:]]
        return [paddle.sqrt(paddle.clip(paddle.min(p, axis=1) + norms, min=0.0)) for p in parts]


class PatchCore(nn.Layer):
    """A frozen teacher, the two taps its patch features come from, and the memory bank."""

    model_name = "PatchCore"

    def __init__(self, backbone: str, taps: tuple[int, int] = PATCHCORE_TAPS, bank_size: int = 1,
                 view_split: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.taps = tuple(int(t) for t in taps)
        if len(self.taps) != 2 or not 0 <= self.taps[0] < self.taps[1] <= 2:
            raise ValueError(f"PatchCore taps are two of the backbone's taps 0, 1, 2 (finer first), got {taps}")
        self.teacher = build_backbone(backbone)
        for p in self.teacher.parameters():
            p.stop_gradient = True
        self.teacher.eval()
        self.memory = MemoryBank(bank_size, self.feature_dim, view_split)

    @property
    def feature_dim(self) -> int:
        channels = self.teacher.channels
        return int(channels[self.taps[0]] + channels[self.taps[1]])

    def train(self):  # the teacher's batch-norm statistics must never move
        super().train()
        self.teacher.eval()
        return self

    def set_bank(self, bank: np.ndarray, view_split: int | None = None) -> None:
        """The bank's patches; with `view_split`, the whole view's bank (its first view_split
        rows) and the tiles' bank after it, each searched on its own (`view_maps`)."""
        self.memory = MemoryBank(len(bank), self.feature_dim, view_split)
        self.memory.patches.set_value(np.ascontiguousarray(bank, dtype=np.float32))

    def features(self, x: paddle.Tensor) -> paddle.Tensor:
        return locally_aware_features(self.teacher(x), self.taps)

    def inference_outputs(self, x: paddle.Tensor) -> list[paddle.Tensor]:
        """What inference runs: [(N, h, w) distance of each patch to its nearest bank patch (one
        "layer", so the Predictor forms the map as it does from STFPM's layer maps), the
        teacher's (N, D) feature profile for the in-distribution check (stfpm.model.ood)].
        With per-view banks two maps come first, to each view's bank: the Predictor keeps each
        input's own view's (`stfpm.nn.maps.view_maps`)."""
        taps = self.teacher(x)
        feats = locally_aware_features(taps, self.taps)
        c, h, w = feats.shape[1:]
        nearest = self.memory(feats.transpose([0, 2, 3, 1]).reshape([-1, c]))
        return [*(d.reshape([-1, h, w]) for d in nearest), feature_profile(taps)]


def subsample_patches(features: np.ndarray, per_image: int, rng: np.random.Generator) -> np.ndarray:
    """(N, C, h, w) features -> (N * k, C) rows, k = min(per_image, h * w) random patches of
    each image: what bounds a bank builder's memory before the coreset."""
    n, c, h, w = features.shape
    rows = features.transpose(0, 2, 3, 1).reshape(n, h * w, c)
    k = min(per_image, h * w)
    if k == h * w:
        return rows.reshape(-1, c)
    picks = np.stack([rng.choice(h * w, k, replace=False) for _ in range(n)])
    return np.take_along_axis(rows, picks[:, :, None], axis=1).reshape(-1, c)


def greedy_coreset(patches: np.ndarray, n_select: int, projection_dim: int = PROJECTION_DIM,
                   seed: int = 0) -> np.ndarray:
    """Indices of `n_select` rows chosen by greedy k-center selection (each pick is the row
    farthest from every row picked so far), distances measured after a Gaussian random
    projection to `projection_dim` dimensions (Johnson-Lindenstrauss, as in the paper)."""
    n, c = patches.shape
    n_select = int(min(max(n_select, 1), n))
    rng = np.random.default_rng(seed)
    if projection_dim < c:
        projection = rng.standard_normal((c, projection_dim)).astype(np.float32) / np.sqrt(projection_dim)
        points = patches.astype(np.float32) @ projection
    else:
        points = patches.astype(np.float32)
    squared = np.einsum("ij,ij->i", points, points)
    picked = np.empty(n_select, np.int64)
    picked[0] = int(rng.integers(n))
    nearest = np.full(n, np.inf, np.float32)
    for i in range(1, n_select):
        last = picked[i - 1]
        d2 = squared - 2.0 * (points @ points[last]) + squared[last]
        np.minimum(nearest, d2, out=nearest)
        picked[i] = int(np.argmax(nearest))
    return picked
