"""Backbones, the STFPM network and its anomaly map, PatchCore's search: Paddle, numpy and
cv2, no file or network IO. Names are loaded on first use, so a Paddle-free module of this
package (map_options) can be imported without Paddle."""
import importlib

_EXPORTS = {"BACKBONES": "backbones", "BackboneSpec": "backbones", "backbone_spec": "backbones",
            "build_backbone": "backbones", "COMBINES": "map_options", "LAYER_NORMS": "map_options",
            "STFPM": "stfpm", "anomaly_map": "maps", "layer_distances": "stfpm", "stfpm_loss": "stfpm",
            "view_scale": "maps"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
