"""Backbones, the STFPM network and its anomaly map: Paddle, numpy and cv2, no file or network IO."""
from stfpm.nn.backbones import BACKBONES, BackboneSpec, backbone_spec, build_backbone
from stfpm.nn.stfpm import COMBINES, LAYER_NORMS, STFPM, anomaly_map, layer_distances, stfpm_loss, view_scale

__all__ = ["BACKBONES", "BackboneSpec", "backbone_spec", "build_backbone", "COMBINES", "LAYER_NORMS", "STFPM",
           "anomaly_map", "layer_distances", "stfpm_loss", "view_scale"]
