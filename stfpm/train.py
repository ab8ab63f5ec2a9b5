"""Training of one process. The same step and epoch functions run inside each Ray Train
worker later; only where the batches come from and how gradients are averaged differ. What
follows the epochs (card, calibration, saving) is stfpm.calibration's."""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import paddle

from stfpm.card import Calibration
from stfpm.data import load_dataset, normalize_batch, prepare_input, split_holdout
from stfpm.nn import COMBINES, LAYER_NORMS, STFPM, backbone_spec, stfpm_loss
from stfpm.runtime import configure_threads
from stfpm.storage import fetch_to_cache, is_s3
from stfpm.weights import apply_state, default_cache_dir, load_teacher_state

logger = logging.getLogger(__name__)

AUGMENTATIONS = ("none", "flip", "d4")
MODELS = ("stfpm", "patchcore")  # what `--model` chooses; STFPM is the default
MAP_SELECTIONS = ("recipe", "proxy")


def augment_batch(batch: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Per image, a random horizontal flip ("flip") or any of the 8 flips and 90-degree
    rotations ("d4"). For parts whose pose varies from image to image (screws, nuts,
    textures) the student then learns every pose it will see; for aligned parts, where an
    unusual pose is itself a defect, keep "none"."""
    if kind == "none":
        return batch
    if kind not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {kind!r}")
    out = np.empty_like(batch)
    for i, image in enumerate(batch):  # (3, S, S)
        if kind == "d4":
            image = np.rot90(image, k=int(rng.integers(4)), axes=(1, 2))
        out[i] = image[:, :, ::-1] if rng.integers(2) else image
    return out


@dataclass
class TrainConfig:
    """None means "the backbone's recipe default" (stfpm.nn.backbones). For model "patchcore"
    the student's settings (epochs, optimizer, augment, layer_norm) do not apply; its own are
    `bank_fraction` and `bank_pool` (stfpm.nn.patchcore.PATCHCORE_RECIPE)."""

    backbone: str = "resnet18"
    model: str = "stfpm"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    image_size: int | None = None
    optimizer: str | None = None
    holdout_fraction: float | None = None
    seed: int = 0
    threshold_quantile: float = 0.99
    teacher_weights: str | None = None
    augment: str | None = None
    layer_norm: str | None = None  # how the anomaly map is formed (stfpm.nn.anomaly_map); not a training input
    bank_fraction: float | None = None
    bank_pool: int | None = None
    combine: str | None = None  # product | sum of the layer maps (stfpm.nn.anomaly_map); not a training input
    map_selection: str | None = None  # "recipe": layer_norm and combine as given; "proxy": the best proxy AUROC
    teacher_cache_mb: int = 2048  # memory for TeacherCache (unaugmented training only); 0 disables it
    tile_size: int | None = None  # train, calibrate and predict on tiles of this many source pixels (stfpm.data.tiling)
    tile_overlap: int = 0
    student: str | None = None  # the student's backbone; default the teacher's (stfpm.nn.build_student)

    @property
    def tiling(self):
        from stfpm.data.tiling import tiling_of

        return tiling_of(self.tile_size, self.tile_overlap)

    def resolved(self) -> "TrainConfig":
        from stfpm.nn.patchcore import PATCHCORE_RECIPE

        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        spec = backbone_spec(self.backbone)
        cfg = copy.copy(self)
        recipe = {**spec.recipe, **PATCHCORE_RECIPE} if cfg.model == "patchcore" else spec.recipe
        for key, default in recipe.items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, default)
        if cfg.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {cfg.augment!r}")
        if cfg.layer_norm not in LAYER_NORMS:
            raise ValueError(f"layer_norm must be one of {', '.join(LAYER_NORMS)}, got {cfg.layer_norm!r}")
        if cfg.combine not in COMBINES:
            raise ValueError(f"combine must be one of {', '.join(COMBINES)}, got {cfg.combine!r}")
        if cfg.layer_norm == "views" and cfg.combine != "product":
            raise ValueError("layer_norm 'views' combines the layers by product; drop combine or set it to 'product'")
        if cfg.map_selection not in MAP_SELECTIONS:
            raise ValueError(f"map_selection must be one of {', '.join(MAP_SELECTIONS)}, got {cfg.map_selection!r}")
        if cfg.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {cfg.optimizer!r}")
        for key in ("epochs", "batch_size", "image_size"):
            if getattr(cfg, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(cfg, key)}")
        if not 0 < cfg.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {cfg.holdout_fraction}")
        if cfg.tile_size is None and cfg.tile_overlap:
            raise ValueError("tile_overlap needs tile_size")
        if cfg.student is not None:
            if cfg.model != "stfpm":
                raise ValueError(f"student applies to model 'stfpm' only, not {cfg.model!r}")
            backbone_spec(cfg.student)  # raises ValueError naming the known backbones
        cfg.tiling  # noqa: B018 - raises ValueError naming a bad tile size or overlap
        if cfg.model == "patchcore":
            if not 0 < cfg.bank_fraction <= 1:
                raise ValueError(f"bank_fraction must be in (0, 1], got {cfg.bank_fraction}")
            if cfg.bank_pool < 1:
                raise ValueError(f"bank_pool must be >= 1, got {cfg.bank_pool}")
        return cfg


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
                    keys: list[str] | None = None):
    """(batch, the batch's keys or None) in random order when `rng` is given."""
    order = np.arange(len(images)) if rng is None else rng.permutation(len(images))
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        yield images[index], None if keys is None else [keys[i] for i in index]


def run_epoch(network, optimizer, batches: Iterable[tuple[np.ndarray, list | None]],
              cache: TeacherCache | None = None) -> tuple[float, int]:
    """Mean loss over the epoch's images and the number of images seen. `batches` yields
    (images, keys); with a cache the teacher's features come from it by key."""
    getattr(network, "_layers", network).train()  # unwrap DataParallel: STFPM.train keeps the teacher in eval
    total, count = 0.0, 0
    for batch, keys in batches:
        feats = cache.features(batch, keys) if cache is not None else None
        total += train_step(network, optimizer, batch, feats) * len(batch)
        count += len(batch)
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


def load_images(paths: list[str], size: int, mean, std, tiling=None) -> tuple[np.ndarray, list[str]]:
    """Image files -> the normalised (N, 3, S, S) float32 batch the network sees, through the
    decode policy every other path uses (`stfpm.data.prepare_input`), and each row's key (the
    teacher cache's): its path, or with a `tiling` one row per tile, keyed "path#k"."""
    tiles = [prepare_input(Path(p).read_bytes(), size, p, tiling=tiling).tiles for p in paths]
    keys = [p if tiling is None else f"{p}#{k}" for p, t in zip(paths, tiles) for k in range(len(t))]
    return normalize_batch(np.concatenate(tiles) if tiles else np.zeros((0, size, size, 3), np.uint8), mean, std), keys


def fingerprint(paths: list[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(paths):
        st = Path(p).stat()
        h.update(f"{Path(p).name}:{st.st_size}\n".encode())
    return h.hexdigest()[:16]


class ProgressLog:
    """One log line per epoch (this module's logger, INFO): reads well in a terminal and in
    `ray job logs`. `enabled=False` (quiet runs, Ray Train ranks other than 0) logs at DEBUG."""

    def __init__(self, total_epochs: int, first_epoch: int = 1, enabled: bool = True):
        self.total, self.first, self.start = total_epochs, first_epoch, time.time()
        self.emit = logger.info if enabled else logger.debug

    def epoch(self, record: dict) -> None:
        done = record["epoch"] - self.first + 1
        eta = (time.time() - self.start) / done * (self.total - record["epoch"])
        best = " *" if record.get("best") else ""
        self.emit(f"epoch {record['epoch']:>3}/{self.total}  loss {record['loss']:.4f}  "
                  f"holdout {record['holdout_loss']:.4f}{best}  {record['images_per_s']:.1f} img/s  "
                  f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")


@dataclass
class TrainResult:
    model_dir: str
    best_epoch: int
    best_holdout_loss: float
    calibration: Calibration
    history: list = field(default_factory=list)
    metrics: dict | None = None


@dataclass
class TrainSplit:
    """The dataset and its deterministic train / held-out split (the same in every process).
    An s3:// dataset is mirrored into the local cache for discovery; `uri` maps a sample's
    local path back to its s3:// URI for readers on other nodes."""

    dataset: object
    train: list
    holdout: list
    source: str
    local_root: str

    def uri(self, path: str) -> str:
        if self.source == self.local_root:
            return path
        return self.source.rstrip("/") + "/" + Path(path).relative_to(self.local_root).as_posix()


def split_dataset(data: str, cfg: TrainConfig) -> TrainSplit:
    local_root = str(data)
    if is_s3(str(data)):
        local_root = str(fetch_to_cache(str(data), default_cache_dir() / "datasets"))
    dataset = load_dataset(local_root)
    train_samples, holdout_samples = split_holdout(dataset.train, cfg.holdout_fraction, cfg.seed)
    return TrainSplit(dataset, train_samples, holdout_samples, str(data), local_root)


def train(data: str, out_dir: str, cfg: TrainConfig, progress: bool = True,
          on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train on DATA's good images in this process, keep the student with the lowest
    held-out loss, then `finalize` the model directory (stfpm.calibration). Model "patchcore"
    builds its memory bank instead (stfpm.patchcore_train)."""
    from stfpm.calibration import finalize  # it builds on this module

    cfg = cfg.resolved()
    if cfg.model == "patchcore":
        from stfpm.patchcore_train import train_patchcore

        return train_patchcore(data, out_dir, cfg, progress)
    configure_threads()
    spec = backbone_spec(cfg.backbone)
    split = split_dataset(data, cfg)
    train_images, train_keys = load_images([s.image for s in split.train], cfg.image_size, spec.mean, spec.std,
                                           cfg.tiling)
    holdout_images, holdout_keys = load_images([s.image for s in split.holdout], cfg.image_size, spec.mean,
                                               spec.std, cfg.tiling)

    network = build_network(cfg.backbone, cfg.teacher_weights, cfg.seed, cfg.student)
    optimizer = make_optimizer(network, cfg)
    cache = teacher_cache(network, cfg)
    rng = np.random.default_rng(cfg.seed)
    log = ProgressLog(cfg.epochs, enabled=progress)
    best_loss, best_state, history = float("inf"), None, []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.time()
        batches = ((augment_batch(b, cfg.augment, rng), keys)
                   for b, keys in iterate_batches(train_images, cfg.batch_size, rng, train_keys))
        loss, seen = run_epoch(network, optimizer, batches, cache)
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
