"""The feature-pyramid backbones STFPM can use, with the input statistics and training
recipe that suit each. Every backbone returns three feature maps at strides 4, 8 and 16."""
from __future__ import annotations

from dataclasses import dataclass, field

from paddle import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128 (TF's efficientnet-lite
# builder: "inception-style mean and stddev for better post-quantization"). With ImageNet
# statistics instead, the stem's outputs have ~6x the variance its batch norm was trained on.
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3

# Official STFPM recipe (paper / gdwang08): SGD lr 0.4, momentum 0.9, wd 1e-4, batch 32, 100 epochs.
OFFICIAL_RECIPE = {
    "optimizer": "sgd",
    "lr": 0.4,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "batch_size": 32,
    "epochs": 100,
    "image_size": 256,
    "holdout_fraction": 0.2,
    "augment": "none",
    "layer_norm": "none",
    "combine": "product",
    "map_selection": "recipe",
}


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    channels: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    recipe: dict = field(default_factory=lambda: dict(OFFICIAL_RECIPE))


def _resnet18() -> nn.Layer:
    from stfpm.nn.resnet import ResNet18Features

    return ResNet18Features()


def _efficientnet_lite(variant: str):
    def build() -> nn.Layer:
        from stfpm.nn.efficientnet_lite import EfficientNetLiteFeatures

        return EfficientNetLiteFeatures(variant)

    return build


_BUILDERS = {"resnet18": _resnet18, "efficientnet_lite0": _efficientnet_lite("lite0"),
             "efficientnet_lite1": _efficientnet_lite("lite1"), "efficientnet_lite2": _efficientnet_lite("lite2")}

# The offline teachers' recipe: the official one with d4 augmentation, the "views" map (the
# paper's map and the median map, each calibrated on held-out good images; stfpm.nn.anomaly_map)
# and batch 8 at lr 0.1 (4x the optimizer steps of batch 32 in the same epochs, lr scaled with
# the batch). Measured on the four dev sets (bench/RESULTS.md, Lite0, 256 px, 10 epochs, 200
# training images), image AUROC bottle / screw / magnetic tile / elpv: 0.999 / 0.874 / 0.697 /
# 0.827, against 0.998 / 0.800 / 0.701 / 0.828 at batch 32 lr 0.4, 0.986 / 0.769 / 0.647 / 0.455
# for the median map without augmentation (the default before) and 0.999 / 0.460 / 0.732 /
# 0.882 for the paper's map.
# augment "auto": the d4 transforms the good images are closed under (stfpm.training.pose; bench/RESULTS.md
# "--augment auto"), which is d4 on the parts whose pose varies.
LITE_RECIPE = {**OFFICIAL_RECIPE, "layer_norm": "views", "augment": "auto", "batch_size": 8, "lr": 0.1}

BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec("resnet18", (64, 128, 256), IMAGENET_MEAN, IMAGENET_STD),
    **{f"efficientnet_lite{n}": BackboneSpec(f"efficientnet_lite{n}", channels, LITE_MEAN, LITE_STD, dict(LITE_RECIPE))
       for n, channels in ((0, (24, 40, 112)), (1, (24, 40, 112)), (2, (24, 48, 120)))},
}


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}") from None


def build_backbone(name: str) -> nn.Layer:
    backbone_spec(name)
    return _BUILDERS[name]()
