"""The 8-bit heat map a normalised anomaly map is stored as, its PNG, and the pictures drawn
from it: the overlay and the side-by-side panel (image | map | mask). Pure OpenCV: the
map-writing tasks of batch scoring import this, never Paddle (importing Paddle cost each such
worker 1-4 s, bench/RESULTS.md).

The normalised map puts the model's threshold at 0.5 and the median good image's peak at 0.25
(stfpm.model.score_scale), so 8-bit values below NORMAL_LEVEL (64) are what good images show
everywhere: the overlay leaves those pixels in the image's own colours and tints only where the
map rises above that level, fully at the threshold, so a defect stands out against the real
object rather than against a tint over the whole frame. Captions sit in a strip above the
picture, never on it."""
from __future__ import annotations

import cv2
import numpy as np

NORMAL_LEVEL = 64      # heat of the median good image's peak (normalised 0.25)
THRESHOLD_LEVEL = 128  # heat at the model's threshold (normalised 0.5)
TINT = 0.65            # the colour map's weight where the map is at or above the threshold
VIEWS = ("overlay", "panel")


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


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """BGR colours of an 8-bit heat map: JET over the range above the normal level (blue just
    above it, red at the top), so the colours spend their range on what is not normal."""
    stretched = np.clip((heat.astype(np.float32) - NORMAL_LEVEL) * (255.0 / (255 - NORMAL_LEVEL)), 0, 255)
    return cv2.applyColorMap(stretched.astype(np.uint8), cv2.COLORMAP_JET)


def tint_weight(heat: np.ndarray) -> np.ndarray:
    """(H, W) float32 weight of the colour map per pixel: 0 at or below the normal level, rising
    linearly to TINT at the threshold and staying there above it."""
    ramp = (heat.astype(np.float32) - NORMAL_LEVEL) / (THRESHOLD_LEVEL - NORMAL_LEVEL)
    return TINT * np.clip(ramp, 0.0, 1.0)


def _as_bgr(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """The image as (h, w, 3) uint8 BGR: grayscale expanded, an image decoded at reduced scale
    scaled up to the map's size."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.shape[:2] != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    return image


def _outline(picture: np.ndarray, heat: np.ndarray) -> None:
    """Draw the contours of the above-threshold region (heat >= 128) on `picture`, in place:
    red inside a white edge, so it shows on dark and light images."""
    h, w = heat.shape
    contours, _ = cv2.findContours((heat >= THRESHOLD_LEVEL).astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(1, round(max(h, w) / 256))
    cv2.drawContours(picture, contours, -1, (255, 255, 255), thickness + 1)
    cv2.drawContours(picture, contours, -1, (0, 0, 255), thickness)


def caption_strip(width: int, text: str, colour=(255, 255, 255), size_for: int | None = None) -> np.ndarray:
    """A black (rows, width, 3) strip holding `text`, sized to stay legible: the font scales
    with the width (or with `size_for`, a picture's width in a wider strip) but shrinks only
    as far as it must to fit."""
    scale = max(0.5, (size_for or width) / 500)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    if tw > width - 6:
        scale = max(0.3, scale * (width - 6) / tw)
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    strip = np.zeros((th + base + 8, width, 3), np.uint8)
    cv2.putText(strip, text, (3, th + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
    return strip


def decision_caption(is_anomaly: bool, norm_score: float, score: float) -> tuple[str, tuple]:
    return (f"{'ANOMALY' if is_anomaly else 'OK'} {norm_score:.2f} (raw {score:.4g})",
            (80, 80, 255) if is_anomaly else (80, 220, 80))


def overlay(image: np.ndarray, heat: np.ndarray, is_anomaly: bool, norm_score: float, score: float) -> np.ndarray:
    """The input in its own colours, tinted by the heat map (`heat_colours`) only where `heat`
    (the 8-bit normalised map, `to_heat`) is above the normal level (`tint_weight`), the
    contours of its above-threshold region, and a caption strip above it with the decision and
    the scores: (strip + H, W, 3) for an (H, W) map. An image decoded at reduced scale is
    scaled up to the map's size first."""
    h, w = heat.shape
    image = _as_bgr(image, h, w)
    weight = tint_weight(heat)[:, :, None]
    out = np.rint(image * (1.0 - weight) + heat_colours(heat) * weight).astype(np.uint8)
    _outline(out, heat)
    return np.vstack([caption_strip(w, *decision_caption(is_anomaly, norm_score, score)), out])


def panel(image: np.ndarray, heat: np.ndarray, is_anomaly: bool, norm_score: float, score: float) -> np.ndarray:
    """Side by side, each under its own caption: the image as it is | the heat map in colour
    (`heat_colours`; dark blue = normal) with the threshold contour | the mask (white where
    the map is at or above the threshold); the decision and scores in a strip above all three."""
    h, w = heat.shape
    image = _as_bgr(image, h, w)
    coloured = heat_colours(heat)
    coloured[heat <= NORMAL_LEVEL] = (60, 20, 0)  # normal: one dark colour, not JET's bottom blue ramp
    _outline(coloured, heat)
    mask = cv2.cvtColor(np.where(heat >= THRESHOLD_LEVEL, 255, 0).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    gap = np.full((h, max(4, w // 64), 3), 255, np.uint8)
    views = [image, coloured, mask]
    titles = ["image", "anomaly map (above normal)", "mask (>= threshold)"]
    columns = []
    for i, (view, title) in enumerate(zip(views, titles)):
        columns.append(np.vstack([caption_strip(w, title), view]))
        if i < len(views) - 1:
            columns.append(np.vstack([np.full((columns[-1].shape[0] - h, gap.shape[1], 3), 0, np.uint8), gap]))
    height = max(c.shape[0] for c in columns)
    columns = [np.vstack([np.zeros((height - c.shape[0], c.shape[1], 3), np.uint8), c]) for c in columns]
    body = np.hstack(columns)
    return np.vstack([caption_strip(body.shape[1], *decision_caption(is_anomaly, norm_score, score), size_for=w), body])


def render(view: str, image: np.ndarray, heat: np.ndarray, is_anomaly: bool, norm_score: float,
           score: float) -> np.ndarray:
    """The picture `view` ("overlay" or "panel") of one result."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {', '.join(VIEWS)}, got {view!r}")
    return (overlay if view == "overlay" else panel)(image, heat, is_anomaly, norm_score, score)
