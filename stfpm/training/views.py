"""`--views auto`: whether a model sees each image whole, or whole and in tiles, decided from
the sizes of the good training images before training (stfpm.data.tiling).

A 256-px view of a 1000-px image keeps a quarter of its detail: a pinhole or a thin scratch a
few pixels wide is gone (MVTec capsule: PatchCore 0.965 image AUROC whole, 0.986 in 2 x 2
tiles), while tiles alone lose what only the whole part shows (a missing or turned part:
MVTec transistor 0.999 whole, 0.957 in tiles). So where the images are at least
`MIN_RATIO` times the model's input on their short side, "auto" chooses both views: the
whole image and its 2 x 2 tiles (`stfpm.data.tiling.two_by_two` of the images' median size),
each map divided by its own held-out scale and the larger kept. Smaller images are seen whole
only: their tiles would be upsampled, adding no detail. An explicit `--tile N` with "auto"
keeps the tiles-only model it always made; "whole", "tiles" and "whole+tiles" override."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from stfpm.data.images import decode_image, sniff_image
from stfpm.data.tiling import two_by_two

logger = logging.getLogger(__name__)

VIEWS = ("auto", "whole", "tiles", "whole+tiles")
MIN_RATIO = 2.0      # short side / model input from which "auto" adds the tiles
SIZE_SAMPLE = 32     # training images whose sizes are read (headers; a decode where a header has none)


def image_size(path: str) -> tuple[int, int]:
    """(h, w) of an image file from its header, or by decoding it when the header has none."""
    data = Path(path).read_bytes()
    header = sniff_image(data)
    if header is not None and header.width and header.height:
        return int(header.height), int(header.width)
    return decode_image(data, path).shape[:2]


def measure_sizes(paths: list[str], seed: int) -> dict:
    """The median short and long side of up to SIZE_SAMPLE of `paths` (seeded sample)."""
    picks = sorted(np.random.default_rng(seed).permutation(len(paths))[:SIZE_SAMPLE])
    sizes = np.array([sorted(image_size(paths[i])) for i in picks])
    return {"images_measured": int(len(sizes)), "median_short_side": int(np.median(sizes[:, 0])),
            "median_long_side": int(np.median(sizes[:, 1]))}


def resolve_views(cfg, train_paths: list[str]):
    """`cfg` (resolved TrainConfig) with views "auto" decided from the training images' sizes
    and the tile size of "whole+tiles" filled in when not given; `views_evidence` records the
    sizes measured and the rule. Any other choice as it is."""
    if cfg.views not in ("auto", "whole+tiles") or (cfg.views == "whole+tiles" and cfg.tile_size):
        return cfg
    sizes = measure_sizes(train_paths, cfg.seed)
    ratio = sizes["median_short_side"] / cfg.image_size
    evidence = {**sizes, "input_size": cfg.image_size, "ratio": round(ratio, 3), "min_ratio": MIN_RATIO}
    views = cfg.views if cfg.views != "auto" else ("whole+tiles" if ratio >= MIN_RATIO else "whole")
    tile = two_by_two(sizes["median_short_side"], sizes["median_long_side"]) if views == "whole+tiles" else None
    logger.info(f"--views {cfg.views}: {views}" + (f" (tiles of {tile} px)" if tile else "")
                + f"; the training images' median short side is {sizes['median_short_side']} px, "
                  f"{ratio:.2f}x the {cfg.image_size}-px input (tiles from {MIN_RATIO:g}x)")
    return dataclasses.replace(cfg, views=views, tile_size=tile, views_evidence=evidence)
