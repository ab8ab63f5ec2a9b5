"""Training a PatchCore model: one feature pass over the good training images builds the
memory bank, then the threshold is calibrated on the held-out good images exactly as for
STFPM (`stfpm.training.calibration.calibrate_and_save`). There is no student and no epoch.

Memory stays bounded whatever the number of images: features are computed a batch at a time
and only `bank_pool / n_images` random patches of each image are kept (at most `bank_pool`
patches in all) before the greedy coreset picks the bank from them."""
from __future__ import annotations

import logging
import math
import sys
import time

import numpy as np
import paddle

from stfpm.model.card import InputSpec, MapSpec, ModelCard
from stfpm.nn import backbone_spec
from stfpm.nn.maps import SMOOTH_SIGMA
from stfpm.nn.patchcore import PatchCore, greedy_coreset, subsample_patches
from stfpm.runtime import configure_threads
from stfpm.training.calibration import UNCALIBRATED, calibrate_and_save
from stfpm.training.config import TrainConfig, TrainResult, fingerprint, load_images, split_dataset
from stfpm.training.views import resolve_views
from stfpm.model.weights import apply_state, load_teacher_state

logger = logging.getLogger(__name__)
PROGRESS_EVERY_S = 10.0  # a line this often during the feature pass: minutes on real data are not silent


def build_bank(network: PatchCore, paths: list[str], cfg: TrainConfig, batch_size: int = 16,
               progress: bool = False) -> tuple[np.ndarray, dict]:
    """The coreset of the training images' patch features, and what it was built from.
    With the whole+tiles views, a bank per view (the whole views' coreset first, then the
    tiles': `stats["view_banks"]`), each of an untiled bank's size, so the whole view is
    searched exactly as a whole-only model's and a tile patch never answers for a whole-image
    patch (one bank of both cost the whole view up to 0.2 image AUROC: bench/RESULTS.md).
    `progress`: a line every PROGRESS_EVERY_S seconds of the feature pass, one before the coreset."""
    emit = logger.info if progress else logger.debug
    t0 = last = time.time()
    spec = backbone_spec(cfg.backbone)
    rng = np.random.default_rng(cfg.seed)
    per_image = max(1, cfg.bank_pool // len(paths))
    views = cfg.tiling is not None and cfg.tiling.whole
    pools: dict[str, list] = {"whole": [], "tiles": []} if views else {"all": []}
    patches_per_image, n_rows = 0, 0
    network.eval()
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        batch, keys = load_images(chunk, cfg.image_size, spec.mean, spec.std, cfg.tiling)  # a tiled image: its tiles
        with paddle.no_grad():
            features = network.features(paddle.to_tensor(batch)).numpy()
        patches_per_image, n_rows = features.shape[2] * features.shape[3], n_rows + len(batch)
        if views:  # keys "path#0" are the whole views (stfpm.training.config.load_images)
            whole = np.array([k.endswith("#0") for k in keys])
            pools["whole"].append(subsample_patches(features[whole], per_image, rng))
            pools["tiles"].append(subsample_patches(features[~whole], max(1, per_image * len(chunk) // int((~whole).sum())),
                                                    rng))
        else:
            pools["all"].append(subsample_patches(features, max(1, per_image * len(chunk) // len(batch)), rng))
        if time.time() - last >= PROGRESS_EVERY_S:
            last = time.time()
            done = start + len(chunk)
            emit(f"memory bank: features of {done}/{len(paths)} images, {done / (last - t0):.1f} img/s")
    units = len(paths) if views else n_rows  # a view's bank: the share of one input per image
    banks, pool_size = [], 0
    for name, parts in pools.items():
        pool = np.concatenate(parts)
        pool_size += len(pool)
        n_bank = min(len(pool), math.ceil(cfg.bank_fraction * units * patches_per_image))
        emit(f"memory bank{'' if name == 'all' else ' of the ' + name + ' view'}: choosing {n_bank} of "
             f"{len(pool)} patches (greedy coreset)")
        banks.append(pool[greedy_coreset(pool, n_bank, seed=cfg.seed)])
    bank = np.concatenate(banks)
    stats = {"bank_size": int(len(bank)), "pool_size": int(pool_size), "patches_per_image": int(patches_per_image)}
    return bank, {**stats, "view_banks": [len(b) for b in banks]} if views else stats


def train_patchcore(data: str, out_dir: str, cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Build the bank from DATA's training split, calibrate on its held-out split, save."""
    cfg = cfg.resolved()
    configure_threads()
    spec = backbone_spec(cfg.backbone)
    split = split_dataset(data, cfg)
    cfg = resolve_views(cfg, [s.image for s in split.train])
    network = PatchCore(cfg.backbone)
    apply_state(network.teacher, load_teacher_state(cfg.backbone, cfg.teacher_weights))
    t0 = time.time()
    (logger.info if progress else logger.debug)(
        f"building the {cfg.backbone} memory bank from {len(split.train)} images ({len(split.holdout)} held out "
        "for the threshold): one pass, no epochs")
    bank, stats = build_bank(network, [s.image for s in split.train], cfg, progress=progress)
    network.set_bank(bank, stats["view_banks"][0] if "view_banks" in stats else None)
    record = {**stats, "seconds": round(time.time() - t0, 2)}
    if progress:
        sys.stderr.write(f"memory bank: {stats['bank_size']} patches chosen from {stats['pool_size']} "
                         f"({len(split.train)} images) in {record['seconds']:.0f} s\n")
    dataset = split.dataset
    card = ModelCard(
        model_name="PatchCore", backbone=cfg.backbone, input=InputSpec.for_backbone(
            cfg.backbone, cfg.image_size, cfg.tiling),
        calibration=UNCALIBRATED, map=MapSpec(layer_norm="none", smooth_sigma=SMOOTH_SIGMA),
        taps=[spec.channels[t] for t in network.taps],
        patchcore={"taps": list(network.taps), "feature_dim": network.feature_dim,
                   "bank_fraction": cfg.bank_fraction, "bank_pool": cfg.bank_pool, **stats},
        recipe={k: getattr(cfg, k) for k in ("model", "backbone", "image_size", "holdout_fraction", "seed",
                                             "threshold_quantile", "teacher_weights", "bank_fraction", "bank_pool",
                                             "tile_size", "tile_overlap", "views", "views_evidence")},
        training={"data": str(dataset.root), "layout": dataset.layout,
                  "n_train": len(split.train), "n_holdout": len(split.holdout),
                  "data_fingerprint": fingerprint([s.image for s in dataset.train]),
                  "bank_seconds": record["seconds"]})
    card, metrics = calibrate_and_save(network, card, split, out_dir, cfg, [record])
    return TrainResult(str(out_dir), 0, float("nan"), card.calibration, [record], metrics)
