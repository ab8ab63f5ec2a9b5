"""Backbones and the STFPM network: pure Paddle, no file or network IO."""
from stfpm.nn.backbones import BACKBONES, BackboneSpec, backbone_spec, build_backbone
from stfpm.nn.stfpm import LAYER_NORMS, STFPM, anomaly_map, layer_distances, stfpm_loss

__all__ = ["BACKBONES", "BackboneSpec", "backbone_spec", "build_backbone", "LAYER_NORMS", "STFPM",
           "anomaly_map", "layer_distances", "stfpm_loss"]
