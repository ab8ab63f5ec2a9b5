"""The 8-bit heat map a normalised anomaly map is stored as, its PNG and the overlay drawn
from it. Pure OpenCV: the map-writing tasks of batch scoring import this, never Paddle
(importing Paddle cost each such worker 1-4 s, bench/RESULTS.md)."""
from __future__ import annotations

import cv2
import numpy as np


def to_heat(norm_map: np.ndarray) -> np.ndarray:
    """A normalised map (0-1, 0.5 at the threshold) as the 8-bit map PNGs hold: round(255 * s)."""
    return np.rint(np.asarray(norm_map) * 255).astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def heat_at(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """The 8-bit map (`to_heat`, at the model's scale) at the input's (height, width): what the
    score table's maps/ PNGs and the scoring service's `map_png` hold."""
    if (height, width) == heat.shape:
        return heat
    return cv2.resize(heat, (width, height), interpolation=cv2.INTER_LINEAR)


def overlay(image: np.ndarray, heat: np.ndarray, is_anomaly: bool, norm_score: float, score: float) -> np.ndarray:
    """The input with a colour map of `heat` (the 8-bit normalised map, `to_heat`;
    red = above the threshold), the contours of its above-threshold region (heat >= 128) and
    a caption with the scores and the decision. An image decoded at reduced scale is scaled
    up to the map's size first, so the overlay is always at the input's size."""
    h, w = heat.shape
    if image.shape[:2] != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    colored = cv2.applyColorMap(heat, cv2.COLORMAP_JET)
    out = cv2.addWeighted(image, 0.6, colored, 0.4, 0)
    contours, _ = cv2.findContours((heat >= 128).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(1, round(max(h, w) / 256))
    cv2.drawContours(out, contours, -1, (255, 255, 255), thickness + 1)
    cv2.drawContours(out, contours, -1, (0, 0, 255), thickness)
    label = f"{'ANOMALY' if is_anomaly else 'OK'} {norm_score:.2f} (raw {score:.4g})"
    scale = max(0.35, w / 640)
    (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    cv2.rectangle(out, (0, 0), (tw + 6, th + base + 6), (0, 0, 0), -1)
    cv2.putText(out, label, (3, th + 3), cv2.FONT_HERSHEY_SIMPLEX, scale,
                (0, 0, 255) if is_anomaly else (0, 255, 0), 1, cv2.LINE_AA)
    return out
