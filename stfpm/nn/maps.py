"""The anomaly map from a forward's per-layer maps, and PatchCore's smoothing and batch bound:
numpy and cv2 only, so the Predictor runs an ONNX or OpenVINO export without Paddle
(`stfpm.model.engines`). `stfpm.nn.stfpm` and `stfpm.nn.patchcore` re-export these names."""
from __future__ import annotations

import cv2
import numpy as np

from stfpm.nn.map_options import COMBINES, LAYER_NORMS

SMOOTH_SIGMA = 4.0            # the paper's Gaussian on PatchCore's upsampled map


def anomaly_map(layer_maps, size: tuple[int, int], layer_norm: str = "none", combine: str = "product",
                layer_scale=None, view_scale=None) -> np.ndarray:
    """(N, H, W) float32 combination of the (N, h, w) per-layer maps, each bilinearly upsampled
    to `size` (half-pixel centres, as align_corners=False): their product (the paper's map) or,
    with combine "sum", their mean. The batch is resized as channels: one cv2 call per 128
    images and layer (OpenCV 5 resizes at most 128 channels per call).

    Before combining, `layer_norm` scales each layer map:
    - "none": as it is (the paper);
    - "median": by its own median over the image, so a score measures a local peak against the
      image's own discrepancy level rather than that level itself: where the whole-image level
      shifts with lighting or pose (MVTec screw), the plain map ranks images by that shift and
      lands at chance (bench/RESULTS.md). It also hides anomalies that cover most of the image;
    - "holdout": by `layer_scale[i]`, the layer's mean over the held-out good images (recorded
      at training): one constant per layer, so large anomalies stay visible and the layers
      weigh alike in a sum (for a product it only rescales the map);
    - "views": two maps of the same layers, the paper's ("none") and the "median" one, each
      divided by `view_scale` (its image score's median over the held-out good images,
      recorded at training), and the larger kept at each pixel: an image is anomalous when
      either view says so against what that view gives good images. The median view finds
      defects under image-to-image level shifts (screw), the paper's view large defects that
      raise the median with them (a crack across a solar cell); bench/RESULTS.md."""
    if layer_norm not in LAYER_NORMS:
        raise ValueError(f"layer_norm must be one of {', '.join(LAYER_NORMS)}, got {layer_norm!r}")
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
    if layer_norm == "holdout" and (layer_scale is None or len(layer_scale) != len(layer_maps)):
        raise ValueError("layer_norm 'holdout' needs one layer_scale per layer (model.json map.layer_scale)")
    if layer_norm == "views":
        if view_scale is None or len(view_scale) != 2 or combine != "product":
            raise ValueError("layer_norm 'views' needs two view_scale values (model.json map.view_scale) "
                             "and combine 'product'")
        plain, levels = _views(layer_maps, size)
        scale = np.maximum(1.0 / view_scale[0], 1.0 / (view_scale[1] * levels)).astype(np.float32)
        return plain * scale[:, None, None]
    height, width = size
    result = None
    for i, layer in enumerate(layer_maps):
        layer = np.asarray(layer, dtype=np.float32)
        n = len(layer)
        if layer_norm == "median":
            layer = layer / _image_medians(layer)[:, None, None]
        elif layer_norm == "holdout":
            layer = layer / np.float32(max(float(layer_scale[i]), 1e-12))
        up = np.empty((n, height, width), np.float32)
        for start in range(0, n, 128):
            chunk = layer[start:start + 128]
            resized = cv2.resize(np.ascontiguousarray(chunk.transpose(1, 2, 0)), (width, height),
                                 interpolation=cv2.INTER_LINEAR)
            up[start:start + 128] = resized.reshape(height, width, -1).transpose(2, 0, 1)
        if result is None:
            result = up
        elif combine == "product":
            result *= up
        else:
            result += up
    return result / len(layer_maps) if combine == "sum" else result


def _image_medians(layer) -> np.ndarray:
    """(N,) each image's median of an (N, h, w) layer map, kept away from 0."""
    layer = np.asarray(layer, dtype=np.float32)
    return np.maximum(np.median(layer.reshape(len(layer), -1), axis=1), 1e-12)


def _views(layer_maps, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The two views of layer_norm "views" from one upsampling pass: the paper's map and, per
    image, the product of the layer medians. A resize is linear, so the median view is exactly
    the paper's map divided by that product."""
    levels = np.prod([_image_medians(layer) for layer in layer_maps], axis=0)
    return anomaly_map(layer_maps, size), levels


def view_scale(layer_maps, size: tuple[int, int]) -> tuple[float, float]:
    """For layer_norm "views": the median image score (map max) over these images (training
    passes the held-out good images) of the paper's map, then of the median map."""
    plain, levels = _views(layer_maps, size)
    scores = plain.reshape(len(plain), -1).max(1)
    return float(np.median(scores)), float(np.median(scores / levels))


def view_maps(layer_maps: list, whole_rows: np.ndarray | None) -> list:
    """A PatchCore forward with per-view banks gives two distance maps per input, to the whole
    view's bank and to the tiles'; each input keeps its own view's (`whole_rows`: True where
    the input is an image's whole view). Where the views are not known (None), the nearer of
    the two, as one bank of both would give."""
    whole, tiles = (np.asarray(m, np.float32) for m in layer_maps)
    if whole_rows is None:
        return [np.minimum(whole, tiles)]
    return [np.where(np.asarray(whole_rows, bool)[:, None, None], whole, tiles)]


def images_per_forward(bank_size: int, patches_per_image: int, budget_bytes: int = 64 << 20) -> int:
    """How many images one forward may hold so that the (patches x bank) distance matrix
    stays within `budget_bytes` (float32)."""
    return max(1, budget_bytes // (4 * max(bank_size, 1) * max(patches_per_image, 1)))


def smooth_map(maps: np.ndarray, sigma: float = SMOOTH_SIGMA) -> np.ndarray:
    """(N, H, W) maps, each blurred by a Gaussian of `sigma` pixels (kernel 2 * round(4 sigma) + 1,
    as anomalib's PatchCore), borders reflected."""
    if sigma <= 0:
        return maps
    ksize = 2 * int(4 * sigma + 0.5) + 1
    out = np.empty_like(maps)
    for i, m in enumerate(maps):
        out[i] = cv2.GaussianBlur(m, (ksize, ksize), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return out
