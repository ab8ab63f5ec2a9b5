"""Backbones and the STFPM network: pure Paddle, no file or network IO."""
from stfpm.nn.backbones import BACKBONES, BackboneSpec, backbone_spec, build_backbone
from stfpm.nn.stfpm import STFPM, anomaly_map, layer_distances, stfpm_loss

__all__ = ["BACKBONES", "BackboneSpec", "backbone_spec", "build_backbone", "STFPM",
           "anomaly_map", "layer_distances", "stfpm_loss"]
