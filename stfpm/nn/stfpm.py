"""The STFPM network, loss and anomaly map (docs/design.md §1).

A frozen teacher and a trainable student of the same architecture see the same image.
Per tapped layer the discrepancy is 0.5 * ||n(t) - n(s)||^2 over channels, n being L2
normalisation along channels. Training minimises its mean; the anomaly map is its product
over layers after bilinear upsampling to the input size (or a mean of scaled layer maps,
`anomaly_map`); the image score is the map's max.

The network ends at the per-layer maps (and a pooled feature profile for `stfpm.model.ood`);
upsampling and the product happen in numpy (`anomaly_map`), so the graph that Paddle Inference
runs holds no interpolate op and oneDNN can run all of it (3.6x faster for ResNet18 on CPU, measured in bench/predict.py).
"""
from __future__ import annotations

import paddle
import paddle.nn.functional as F
from paddle import nn

from stfpm.nn.backbones import build_backbone


def layer_distances(teacher_feats, student_feats) -> list[paddle.Tensor]:
    """Per layer, 0.5 * squared distance of channel-normalised features: (N, h, w) each."""
    out = []
    for t, s in zip(teacher_feats, student_feats):  # no strict=: breaks paddle.jit
        diff = F.normalize(t, axis=1) - F.normalize(s, axis=1)
        out.append(0.5 * paddle.sum(diff * diff, axis=1))
    return out


def stfpm_loss(teacher_feats, student_feats) -> paddle.Tensor:
    """Sum over layers of the mean (over batch and pixels) layer distance."""
    return paddle.add_n([d.mean() for d in layer_distances(teacher_feats, student_feats)])


PATCH_GRID = 8  # the patch profile's cells per side: the deepest tap averaged over an 8 x 8 grid


def feature_profile(feats) -> paddle.Tensor:
    """(N, sum C + C_last * PATCH_GRID**2): per channel of each feature map its spatial mean,
    then the deepest feature map averaged over a PATCH_GRID x PATCH_GRID grid of cells
    (channel-major): a few thousand numbers per image that describe what the network sees,
    where, from features the forward has anyway. The in-distribution check
    (`stfpm.model.ood`) reads the cells (how much of the image is unlike training: a local
    defect is a few cells, a wrong category nearly all), or the means in cards from before."""
    # sums over the pixels, not mean(): Paddle 3.3's oneDNN pass prints a debug line for every reduce_mean
    means = [f.sum(axis=[2, 3]) / float(f.shape[2] * f.shape[3]) for f in feats]
    deepest = feats[-1]
    cells = _grid_cells(deepest).reshape([-1, deepest.shape[1] * PATCH_GRID * PATCH_GRID])
    return paddle.concat(means + [cells], axis=1)


def _grid_cells(x: paddle.Tensor) -> paddle.Tensor:
    """`x` (N, C, h, w) averaged over a PATCH_GRID x PATCH_GRID grid. A map smaller than the
    grid whose sides divide it (a 64-px input: 4 x 4) has one pixel per cell, repeated:
    what adaptive pooling gives, written as a broadcast, since adaptive pooling that
    enlarges exports to ONNX as an AveragePool of stride 0, which ONNX Runtime refuses."""
    n, c, h, w = x.shape
    if h < PATCH_GRID and w < PATCH_GRID and PATCH_GRID % h == 0 and PATCH_GRID % w == 0:
        rh, rw = PATCH_GRID // h, PATCH_GRID // w
        return x.reshape([-1, c, h, 1, w, 1]).expand([x.shape[0], c, h, rh, w, rw]).reshape(
            [-1, c, PATCH_GRID, PATCH_GRID])
    return F.adaptive_avg_pool2d(x, PATCH_GRID)


def profile_layout(backbone: str) -> tuple[int, int]:
    """(channels, cells) of the cell block that ends `feature_profile` for `backbone`."""
    from stfpm.nn.backbones import backbone_spec

    return backbone_spec(backbone).channels[-1], PATCH_GRID * PATCH_GRID


class ProjectedStudent(nn.Layer):
    """A student backbone whose taps differ in width from the teacher's, each tap followed by a
    1x1 convolution to the teacher's channels (trained with it), so the loss and the maps
    compare like with like."""

    def __init__(self, backbone: str, channels, teacher_channels):
        super().__init__()
        self.features = build_backbone(backbone)
        self.project = nn.LayerList([nn.Conv2D(c, t, 1) for c, t in zip(channels, teacher_channels)])

    def forward(self, x):
        return [p(f) for p, f in zip(self.project, self.features(x))]


def build_student(student: str, teacher: str) -> nn.Layer:
    """A randomly initialised student: the `student` backbone, projected to the teacher's tap
    widths where they differ (a student need not be a copy of the teacher)."""
    from stfpm.nn.backbones import backbone_spec

    mine, theirs = backbone_spec(student).channels, backbone_spec(teacher).channels
    return build_backbone(student) if mine == theirs else ProjectedStudent(student, mine, theirs)


class STFPM(nn.Layer):
    """Teacher (frozen, always in eval mode) and student, by default of the same backbone."""

    model_name = "STFPM"

    def __init__(self, backbone: str, student: str | None = None):
        super().__init__()
        self.backbone = backbone
        self.student_backbone = student or backbone
        self.teacher = build_backbone(backbone)
        self.student = build_student(self.student_backbone, backbone)
        for p in self.teacher.parameters():
            p.stop_gradient = True
        self.teacher.eval()

    def train(self):
        super().train()
        self.teacher.eval()  # the teacher's batch-norm statistics must never move
        return self

    def forward(self, x: paddle.Tensor, teacher_feats=None):
        """(teacher features, student features); `teacher_feats` given (a training cache of
        the frozen teacher's output for this very `x`) skips the teacher's forward."""
        return (self.teacher(x) if teacher_feats is None else teacher_feats), self.student(x)

    def inference_outputs(self, x: paddle.Tensor) -> list[paddle.Tensor]:
        """What inference runs: the per-layer (N, h, w) distance maps (`anomaly_map` combines
        them), then the (N, sum of tap channels) feature profile of the teacher that the
        in-distribution check compares with training (`stfpm.model.ood`)."""
        t, s = self(x)
        return layer_distances(t, s) + [feature_profile(t)]
