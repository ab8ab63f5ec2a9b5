"""The STFPM network, loss and anomaly map (DESIGN.md section 3).

A frozen teacher and a trainable student of the same architecture see the same image.
Per tapped layer the discrepancy is 0.5 * ||n(t) - n(s)||^2 over channels, n being L2
normalisation along channels. Training minimises its mean; the anomaly map is its product
over layers after bilinear upsampling to the input size; the image score is the map's max.
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


def anomaly_map(teacher_feats, student_feats, size: tuple[int, int]) -> paddle.Tensor:
    """(N, H, W) product of the per-layer distances, each bilinearly upsampled to `size`."""
    result = None
    for d in layer_distances(teacher_feats, student_feats):
        up = F.interpolate(d.unsqueeze(1), size=list(size), mode="bilinear", align_corners=False)
        result = up if result is None else result * up
    return result.squeeze(1)


class STFPM(nn.Layer):
    """Teacher (frozen, always in eval mode) and student of the same backbone."""

    def __init__(self, backbone: str):
        super().__init__()
        self.backbone = backbone
        self.teacher = build_backbone(backbone)
        self.student = build_backbone(backbone)
        for p in self.teacher.parameters():
            p.stop_gradient = True
        self.teacher.eval()

    def train(self):
        super().train()
        self.teacher.eval()  # the teacher's batch-norm statistics must never move
        return self

    def forward(self, x: paddle.Tensor):
        return self.teacher(x), self.student(x)

    def score_maps(self, x: paddle.Tensor) -> paddle.Tensor:
        """(N, H, W) anomaly maps at the input resolution."""
        t, s = self(x)
        return anomaly_map(t, s, (x.shape[2], x.shape[3]))
