"""Issue 25 item 7: pictures a person can read. The overlay keeps the image's own colours
where the map is at or below its normal level and tints only above it; the panel shows image
| map | mask side by side; captions sit in a strip above the picture, never on it; the module
stays Paddle-free (the map-writing tasks import it)."""
from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

from stfpm.model.heatmap import NORMAL_LEVEL, THRESHOLD_LEVEL, overlay, panel, render, tint_weight


def _scene(h: int = 96, w: int = 128):
    """A brown image (a bottle's colour) and a heat map: normal everywhere (just under the
    normal level), a ramp up to the threshold, and a defect well above it."""
    image = np.zeros((h, w, 3), np.uint8)
    image[:] = (40, 70, 120)  # BGR brown
    heat = np.full((h, w), NORMAL_LEVEL - 4, np.uint8)
    heat[10:20, 10:20] = (NORMAL_LEVEL + THRESHOLD_LEVEL) // 2
    heat[40:70, 60:100] = 230
    return image, heat


def test_overlay_keeps_the_image_colours_where_the_map_is_normal():
    image, heat = _scene()
    out = overlay(image, heat, True, 0.83, 12.5)
    strip = out.shape[0] - image.shape[0]
    assert out.shape[1:] == image.shape[1:] and strip > 0
    body = out[strip:]
    outline = cv2.dilate((heat >= THRESHOLD_LEVEL).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    normal = (heat <= NORMAL_LEVEL) & ~outline  # (the threshold contour is drawn a few pixels wide)
    assert np.array_equal(body[normal], image[normal])  # not a single tinted pixel where the map is normal
    inside = body[50:60, 70:90].astype(int)  # deep inside the defect: the colour map, red-ish in JET at 230
    assert np.abs(inside - image[50:60, 70:90]).sum(axis=2).min() > 60 and inside[..., 2].mean() > image[0, 0, 2]
    half = body[12:18, 12:18].astype(int)  # half way to the threshold: tinted, less than at the defect
    assert 0 < np.abs(half - image[12:18, 12:18]).sum(axis=2).mean() < np.abs(inside - image[50:60, 70:90]).sum(axis=2).mean()
    assert tint_weight(np.array([NORMAL_LEVEL, THRESHOLD_LEVEL, 255], np.uint8)).tolist()[0] == 0.0
    assert out[:strip].max() > 0  # the caption is written in the strip


def test_overlay_of_a_grayscale_image_and_a_map_at_another_size():
    image = np.full((48, 64), 100, np.uint8)
    heat = np.zeros((96, 128), np.uint8)
    heat[40:60, 40:60] = 200
    out = overlay(image, heat, False, 0.2, 1.0)
    assert out.shape[1:] == (128, 3) and out.shape[0] > 96


def test_panel_shows_image_map_and_mask_side_by_side():
    image, heat = _scene()
    out = panel(image, heat, True, 0.83, 12.5)
    h, w = heat.shape
    assert out.shape[1] > 3 * w and out.shape[0] > h
    body = out[-h:]
    gap = (out.shape[1] - 3 * w) // 2
    left, middle, right = body[:, :w], body[:, w + gap:2 * w + gap], body[:, 2 * w + 2 * gap:]
    assert np.array_equal(left, image)  # the image as it is
    mask = right[:, :, 0]
    assert set(np.unique(mask)) == {0, 255} and np.array_equal(mask == 255, heat >= THRESHOLD_LEVEL)
    assert len({tuple(c) for c in middle[75:, :][heat[75:, :] <= NORMAL_LEVEL]}) == 1  # normal: one colour
    assert np.array_equal(render("panel", image, heat, True, 0.83, 12.5), out)
    with pytest.raises(ValueError, match="view must be one of overlay, panel"):
        render("side", image, heat, True, 0.83, 12.5)


def test_heatmap_module_does_not_import_paddle():
    code = "import sys, stfpm.model.heatmap; print('paddle' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
