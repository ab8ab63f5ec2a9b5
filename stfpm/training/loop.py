"""The STFPM student's training loop in one process. The same step and epoch functions run
inside each Ray Train worker (stfpm.raytrain.driver); only where the batches come from and
how gradients are averaged differ. What follows the epochs (card, calibration, saving) is
stfpm.training.calibration's."""
from __future__ import annotations

import dataclasses
import logging
import time
import zlib
from typing import Callable, Iterable

import numpy as np
import paddle

from stfpm.model.weights import apply_state, load_teacher_state
from stfpm.nn import STFPM, backbone_spec, stfpm_loss
from stfpm.runtime import configure_threads
from stfpm.training.calibration import finalize
from stfpm.training.config import TrainConfig, TrainResult, load_images, split_dataset
from stfpm.training.pose import BANK_IMAGES, D4_TRANSFORMS, PROBE_IMAGES, decide_augmentation, parse_augment, sample_paths
from stfpm.training.views import resolve_views

logger = logging.getLogger(__name__)


def augment_batch(batch: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Per image, a random horizontal flip ("flip"), any of the 8 flips and 90-degree
    rotations ("d4"), or the identity or one of the named d4 transforms ("hflip,vflip,rot180":
    what `--augment auto` keeps, stfpm.training.pose). For parts whose pose varies from image
    to image (screws, nuts, textures) the student then learns every pose it will see; for
    aligned parts, where an unusual pose is itself a defect, keep "none"."""
    if kind == "none":
        return batch
    transforms = parse_augment(kind)
    if transforms is None:
        raise ValueError(f"augment must be one of none, flip, d4 or comma-separated d4 transforms, got {kind!r}")
    out = np.empty_like(batch)
    for i, image in enumerate(batch):  # (3, S, S)
        if kind in ("flip", "d4"):  # the draws of the runs measured before "auto" (same students per seed)
            if kind == "d4":
                image = np.rot90(image, k=int(rng.integers(4)), axes=(1, 2))
            out[i] = image[:, :, ::-1] if rng.integers(2) else image
        else:
            pick = int(rng.integers(len(transforms) + 1))
            out[i] = image if pick == 0 else D4_TRANSFORMS[transforms[pick - 1]](image)
    return out


def resolve_augment(cfg: TrainConfig, teacher, split) -> TrainConfig:
    """`cfg` with augment "auto" replaced by the d4 transforms the good images are closed
    under, decided with the frozen `teacher` on a few dozen of `split`'s images, and the
    evidence (stfpm.training.pose); any other augment as it is."""
    if cfg.augment != "auto":
        return cfg
    spec = backbone_spec(cfg.backbone)
    probe_paths, bank_paths = sample_paths([s.image for s in split.train], [s.image for s in split.holdout], cfg.seed)
    probe, _ = load_images(probe_paths, cfg.image_size, spec.mean, spec.std, cfg.tiling)
    bank, _ = load_images(bank_paths, cfg.image_size, spec.mean, spec.std, cfg.tiling)
    teacher.eval()
    kind, evidence = decide_augmentation(teacher, probe[:PROBE_IMAGES * 4], bank[:BANK_IMAGES * 4], cfg.seed)
    ratios = ", ".join(f"{name} {t['local']:.2f}/{t['layout']:.2f}" for name, t in evidence["transforms"].items())
    logger.info(f"--augment auto: {kind} (distance to held-out good images, transformed / untransformed, local/"
                f"layout, kept when local <= {evidence['safe_ratio']}: {ratios}; {evidence['seconds']:.0f} s)")
    return dataclasses.replace(cfg, augment=kind, augment_evidence=evidence)


def build_network(backbone: str, teacher_weights: str | None = None, seed: int = 0,
                  student: str | None = None) -> STFPM:
    """Teacher from pretrained weights, student randomly initialised (seeded)."""
    paddle.seed(seed)
    network = STFPM(backbone, student)
    apply_state(network.teacher, load_teacher_state(backbone, teacher_weights))
    return network


def make_optimizer(network: STFPM, cfg: TrainConfig):
    params = network.student.parameters()
    if cfg.optimizer == "adam":
        return paddle.optimizer.Adam(learning_rate=cfg.lr, parameters=params,
                                     weight_decay=cfg.weight_decay or None)
    return paddle.optimizer.Momentum(learning_rate=cfg.lr, momentum=cfg.momentum, parameters=params,
                                     weight_decay=paddle.regularizer.L2Decay(cfg.weight_decay))


class TeacherCache:
    """The frozen teacher's features of each image, by the image's key (its path), kept in
    memory across epochs up to `max_bytes`; images beyond the budget have their features
    computed every time. Only valid for inputs that are the same every epoch: with random
    augmentation the teacher must see the augmented image, so training does not use it then.
    Lite0 at 256 px holds 0.66 MB per image (1,000 images: 656 MB)."""

    def __init__(self, teacher, max_bytes: int):
        self.teacher, self.max_bytes, self.used, self.store = teacher, max_bytes, 0, {}

    def features(self, batch: np.ndarray, keys) -> list[paddle.Tensor]:
        missing = [i for i, key in enumerate(keys) if key not in self.store]
        fresh = {}
        if missing:
            with paddle.no_grad():
                computed = [t.numpy() for t in self.teacher(paddle.to_tensor(batch[missing]))]
            for j, i in enumerate(missing):
                fresh[keys[i]] = [tap[j] for tap in computed]
                size = sum(tap[j].nbytes for tap in computed)
                if self.used + size <= self.max_bytes:
                    self.store[keys[i]], self.used = fresh[keys[i]], self.used + size
        per_image = [self.store.get(key) or fresh[key] for key in keys]
        return [paddle.to_tensor(np.stack([feats[tap] for feats in per_image])) for tap in range(len(per_image[0]))]


def teacher_cache(network: STFPM, cfg: TrainConfig) -> TeacherCache | None:
    """The cache `cfg` asks for, or None: disabled, or the inputs are randomly augmented."""
    if cfg.augment != "none" or cfg.teacher_cache_mb <= 0:
        return None
    return TeacherCache(network.teacher, cfg.teacher_cache_mb << 20)


def train_step(network, optimizer, batch: np.ndarray, teacher_feats=None) -> float:
    """One optimisation step on a (N, 3, S, S) batch; returns the batch loss. `teacher_feats`:
    the teacher's features of `batch` from a TeacherCache (None: the teacher runs).
    `network` may be a paddle.DataParallel wrapper: it is only called, never inspected."""
    t_feats, s_feats = network(paddle.to_tensor(batch), teacher_feats)
    loss = stfpm_loss(t_feats, s_feats)
    loss.backward()
    optimizer.step()
    optimizer.clear_grad()
    return float(loss)


def iterate_batches(images: np.ndarray, batch_size: int, rng: np.random.Generator | None = None,
                    keys: list[str] | None = None, rows: np.ndarray | None = None):
    """(batch, the batch's keys or None) in random order when `rng` is given; of the `rows`
    given (default all)."""
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    order = rows if rng is None else rng.permutation(rows)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        yield images[index], None if keys is None else [keys[i] for i in index]


def picked_tile(image: str, tiles: int, epoch: int, seed: int) -> int:
    """Which of an image's `tiles` (1..tiles; 0 is its whole view) an epoch of the whole+tiles
    views trains on: a hash of the image, epoch and seed, so one-process training and every
    Ray Train worker pick alike without talking to each other, and over the epochs every tile
    comes up."""
    return 1 + zlib.crc32(f"{seed}:{epoch}:{image}".encode()) % max(tiles, 1)


def trains_on(key: str, tiles: int, epoch: int, seed: int) -> bool:
    """Whether the row keyed "path#k" (stfpm.training.config.load_images) of an image with
    `tiles` tiles after its whole view is in this epoch: the whole view, and `picked_tile`."""
    image, k = key.rsplit("#", 1)
    return k == "0" or int(k) == picked_tile(image, tiles, epoch, seed)


def epoch_rows(keys: list[str], tiling, epoch: int, seed: int) -> np.ndarray | None:
    """The rows an epoch trains on: all of them (None), except with the whole+tiles views,
    where each image gives its whole view and one of its tiles (`trains_on`), so an epoch
    costs twice an untiled one rather than 1 + tiles times."""
    if tiling is None or not tiling.whole:
        return None
    tiles: dict[str, int] = {}
    for key in keys:
        image = key.rsplit("#", 1)[0]
        tiles[image] = tiles.get(image, -1) + 1
    return np.array([r for r, key in enumerate(keys) if trains_on(key, tiles[key.rsplit("#", 1)[0]], epoch, seed)])


def run_epoch(network, optimizer, batches: Iterable[tuple[np.ndarray, list | None]],
              cache: TeacherCache | None = None,
              on_batch: Callable[[int, float], None] | None = None) -> tuple[float, int]:
    """Mean loss over the epoch's images and the number of images seen. `batches` yields
    (images, keys); with a cache the teacher's features come from it by key. `on_batch(images
    seen, mean loss so far)` after each step (progress within an epoch)."""
    getattr(network, "_layers", network).train()  # unwrap DataParallel: STFPM.train keeps the teacher in eval
    total, count = 0.0, 0
    for batch, keys in batches:
        feats = cache.features(batch, keys) if cache is not None else None
        total += train_step(network, optimizer, batch, feats) * len(batch)
        count += len(batch)
        if on_batch:
            on_batch(count, total / count)
    return total / max(count, 1), count


def mean_loss(network: STFPM, images: np.ndarray, batch_size: int, cache: TeacherCache | None = None,
              keys: list[str] | None = None) -> float:
    network.eval()
    total = 0.0
    with paddle.no_grad():
        for batch, batch_keys in iterate_batches(images, batch_size, keys=keys):
            feats = cache.features(batch, batch_keys) if cache is not None else None
            total += float(stfpm_loss(*network(paddle.to_tensor(batch), feats))) * len(batch)
    return total / len(images)


class ProgressLog:
    """One log line per epoch (this module's logger, INFO): reads well in a terminal and in
    `ray job logs`; within a long epoch a line every `every_s` seconds, so a first epoch of a
    minute is not a minute of silence. `enabled=False` (quiet runs, Ray Train ranks other than
    0) logs at DEBUG."""

    LEGEND = ("one line per epoch: mean training loss, held-out loss (`*`: the lowest so far; the student "
              "with the lowest is the one kept), images/s, ETA")

    def __init__(self, total_epochs: int, first_epoch: int = 1, enabled: bool = True, every_s: float = 10.0):
        self.total, self.first, self.start = total_epochs, first_epoch, time.time()
        self.emit = logger.info if enabled else logger.debug
        self.every_s = every_s

    def begin(self, what: str) -> None:
        """The line before the first epoch: what is trained, and how to read the epoch lines."""
        self.emit(f"{what}; {self.LEGEND}")

    def within(self, epoch: int, images: int | None = None) -> Callable[[int, float], None]:
        """`run_epoch`'s on_batch for `epoch`: a line every `every_s` seconds (images seen of
        `images`, the loss so far)."""
        t0 = last = time.time()

        def on_batch(seen: int, loss: float) -> None:
            nonlocal last
            now = time.time()
            if now - last >= self.every_s:
                last = now
                of = f"/{images}" if images else ""
                self.emit(f"epoch {epoch:>3}/{self.total}  {seen}{of} images  loss {loss:.4f}  "
                          f"{seen / (now - t0):.1f} img/s")
        return on_batch

    def epoch(self, record: dict) -> None:
        done = record["epoch"] - self.first + 1
        eta = (time.time() - self.start) / done * (self.total - record["epoch"])
        best = " *" if record.get("best") else ""
        self.emit(f"epoch {record['epoch']:>3}/{self.total}  loss {record['loss']:.4f}  "
                  f"holdout {record['holdout_loss']:.4f}{best}  {record['images_per_s']:.1f} img/s  "
                  f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")


def train_stfpm(data: str, out_dir: str, cfg: TrainConfig, progress: bool = True,
                on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train the student on DATA's good images in this process (`cfg` resolved), keep the
    one with the lowest held-out loss, then `finalize` the model directory
    (stfpm.training.calibration)."""
    configure_threads()
    spec = backbone_spec(cfg.backbone)
    split = split_dataset(data, cfg)
    cfg = resolve_views(cfg, [s.image for s in split.train])
    train_images, train_keys = load_images([s.image for s in split.train], cfg.image_size, spec.mean, spec.std,
                                           cfg.tiling)
    holdout_images, holdout_keys = load_images([s.image for s in split.holdout], cfg.image_size, spec.mean,
                                               spec.std, cfg.tiling)

    network = build_network(cfg.backbone, cfg.teacher_weights, cfg.seed, cfg.student)
    cfg = resolve_augment(cfg, network.teacher, split)
    optimizer = make_optimizer(network, cfg)
    cache = teacher_cache(network, cfg)
    rng = np.random.default_rng(cfg.seed)
    log = ProgressLog(cfg.epochs, enabled=progress)
    views = "" if cfg.tiling is None else f" as {len(train_images)} {cfg.views} views"
    log.begin(f"training the {cfg.backbone} student on {len(split.train)} images{views} ({len(split.holdout)} held out) "
              f"for {cfg.epochs} epochs")
    best_loss, best_state, history = float("inf"), None, []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.time()
        rows = epoch_rows(train_keys, cfg.tiling, epoch, cfg.seed)
        batches = ((augment_batch(b, cfg.augment, rng), keys)
                   for b, keys in iterate_batches(train_images, cfg.batch_size, rng, train_keys, rows))
        loss, seen = run_epoch(network, optimizer, batches, cache,
                               log.within(epoch, len(train_images) if rows is None else len(rows)))
        holdout = mean_loss(network, holdout_images, cfg.batch_size, cache, holdout_keys)
        record = {"epoch": epoch, "loss": loss, "holdout_loss": holdout,
                  "images_per_s": seen / (time.time() - t0), "best": holdout < best_loss}
        if holdout < best_loss:
            best_loss = holdout
            best_state = {k: v.clone() for k, v in network.student.state_dict().items()}
        history.append(record)
        log.epoch(record)
        if on_epoch:
            on_epoch(record)
    network.student.set_state_dict(best_state)
    return finalize(network, cfg, split, holdout_images, out_dir, history)
