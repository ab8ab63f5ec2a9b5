"""Tiling of large images: the model runs on tiles of the full-resolution image, each resized
to its input size, and the tile maps are stitched back into one map.

A factory frame of 5-20 MP squeezed to 256 px loses a defect a few pixels wide; cut into tiles
of `size` source pixels, each tile keeps (size / input size) of the detail. Along each side of
length L the tiles start at evenly spaced offsets from 0 to L - size, as few as cover the side
with at least `overlap` pixels shared by neighbours (`starts`); a side shorter than a tile has
one tile, padded by mirroring the image (a texture-like border, not black) and cropped off
again when stitching. Where tiles overlap their maps are averaged.

The stitched map is at the tiles' model scale (input size / tile size of the source: the
source's own resolution when the two are equal); callers resize it to the image's size as they
do an untiled map. The model directory records the tiling (`model.json` `input.tile`), so
training, calibration, evaluate, predict, export and Ray scoring all cut the same tiles.

With `whole` (the "whole+tiles" views, `model.json` `input.tile_whole`) the whole image,
resized as an untiled model sees it, comes first and the tiles after: a missing or turned
part shows in the whole view, a pinhole in the tiles. The two views' maps are each divided by
their own scale (the median image score of that view over held-out good images, recorded at
calibration as `map.tile_view_scale`) and the larger is kept at each pixel (`combine_views`):
an image is anomalous when either view says so against what that view gives good images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from stfpm.data.images import resize_for_model


def starts(length: int, size: int, overlap: int) -> list[int]:
    """Tile offsets along one side: 0 and length - size included, neighbours sharing >= overlap."""
    if length <= size:
        return [0]
    n = math.ceil((length - overlap) / (size - overlap))
    return [round(i * (length - size) / (n - 1)) for i in range(n)]


def tiling_of(size: int | None, overlap: int = 0, whole: bool = False) -> "Tiling | None":
    """The Tiling of a (tile size, overlap, whole view) triple as cards, configs and plan rows
    store it; a size of None means the image is not tiled (any other bad size is Tiling's error)."""
    return None if size is None else Tiling(size, overlap, bool(whole))


def two_by_two(height: int, width: int) -> int:
    """The tile size that cuts an image into 2 x 2 tiles (2 x 3 and so on for an oblong one):
    the "whole+tiles" views' default, as measured on held-back categories (MVTec capsule's
    1000-px images at 512-px tiles, PCB's 640-px at 320; issue 26)."""
    return max(16, math.ceil(min(height, width) / 2))


def combine_views(whole: np.ndarray, tiles: np.ndarray, view_scale) -> np.ndarray:
    """The "whole+tiles" map: the whole view's map (at the tiles' map shape) and the tiles'
    stitched map, each divided by its `view_scale` entry, the larger kept at each pixel."""
    return np.maximum(whole / np.float32(view_scale[0]), tiles / np.float32(view_scale[1]))


@dataclass(frozen=True)
class Tiling:
    size: int         # tile side, in pixels of the full-resolution image
    overlap: int = 0  # at least this many pixels shared by neighbouring tiles
    whole: bool = False  # the whole image first, then the tiles: the "whole+tiles" views

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 16:
            raise ValueError(f"tile size must be an integer of at least 16 pixels, not {self.size!r}")
        # at most half a tile: tile 16 with overlap 15 cut a 128-px image into 12,769 tiles
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) or not 0 <= self.overlap <= self.size // 2:
            raise ValueError(f"tile overlap must be an integer from 0 to half the tile size ({self.size // 2}), "
                             f"not {self.overlap!r}")
        if not isinstance(self.whole, bool):
            raise ValueError(f"the whole view flag must be true or false, not {self.whole!r}")

    def boxes(self, height: int, width: int) -> list[tuple[int, int]]:
        """(top, left) of each tile, row by row."""
        return [(y, x) for y in starts(height, self.size, self.overlap) for x in starts(width, self.size, self.overlap)]

    def count(self, height: int, width: int) -> int:
        """The model inputs of an image: its tiles, and its whole view first when `whole`."""
        return int(self.whole) + len(starts(height, self.size, self.overlap)) * len(starts(width, self.size, self.overlap))

    def cut(self, image: np.ndarray, model_size: int) -> np.ndarray:
        """BGR uint8 (H, W, 3) -> the tiles as the model sees them: BGR uint8 (K, S, S, 3),
        S = model_size (stfpm.data.images.prepare_input turns them to RGB); with `whole`, the
        whole image first, resized as an untiled model's (resize_for_model)."""
        h, w = image.shape[:2]
        first = [resize_for_model(image, model_size)[..., ::-1]] if self.whole else []  # back to BGR, as the tiles
        pad_h, pad_w = max(0, self.size - h), max(0, self.size - w)
        if pad_h or pad_w:  # numpy's "symmetric" mirrors repeatedly, so any shortfall is filled
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")
        t, shrink = self.size, self.size >= model_size
        tiles = [image[y:y + t, x:x + t] for y, x in self.boxes(h, w)]
        if t == model_size:
            return np.stack(first + tiles)
        interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        return np.stack(first + [cv2.resize(tile, (model_size, model_size), interpolation=interpolation)
                                 for tile in tiles])

    def map_shape(self, height: int, width: int, model_size: int) -> tuple[int, int]:
        """The stitched map's (h, w): the image at the tiles' model scale."""
        scale = model_size / self.size
        return max(1, round(height * scale)), max(1, round(width * scale))

    def stitch(self, maps: np.ndarray, height: int, width: int, view_scale=None) -> np.ndarray:
        """(K, S, S) float32 maps of an (height, width) image's inputs (`cut`) -> its map,
        `map_shape`: overlapping tiles averaged, the mirrored padding of a short side cropped
        off; with `whole`, the two views combined by `view_scale` (`combine_views`)."""
        if self.whole:
            if view_scale is None:
                raise ValueError("whole+tiles views need their view scale (model.json map.tile_view_scale)")
            return combine_views(*self.views(maps, height, width), view_scale)
        return self._stitch(maps, height, width)

    def views(self, maps: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """With `whole`: the whole view's map resized to `map_shape`, and the tiles' stitched map."""
        out_h, out_w = self.map_shape(height, width, maps.shape[-1])
        whole = cv2.resize(np.ascontiguousarray(maps[0], np.float32), (out_w, out_h), interpolation=cv2.INTER_LINEAR)
        return whole, self._stitch(maps[1:], height, width)

    def _stitch(self, maps: np.ndarray, height: int, width: int) -> np.ndarray:
        model_size = maps.shape[-1]
        scale = model_size / self.size
        out_h, out_w = self.map_shape(height, width, model_size)
        total = np.zeros((out_h, out_w), np.float32)
        weight = np.zeros((out_h, out_w), np.float32)
        for tile_map, (y, x) in zip(maps, self.boxes(height, width)):
            top, left = round(y * scale), round(x * scale)
            rows, cols = min(model_size, out_h - top), min(model_size, out_w - left)
            total[top:top + rows, left:left + cols] += tile_map[:rows, :cols]
            weight[top:top + rows, left:left + cols] += 1.0
        return total / np.maximum(weight, 1.0)
