"""What a training run is: its configuration (TrainConfig, each None resolved from the
backbone's or PatchCore's recipe), its data (the deterministic train / held-out split, the
images as the network sees them) and its result. Both model kinds' training and
calibration build on this module; it builds on neither."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stfpm.data import load_dataset, normalize_batch, prepare_input, split_holdout
from stfpm.data.datasets import MIN_TRAIN_IMAGES
from stfpm.model.card import Calibration
from stfpm.model.weights import default_cache_dir
from stfpm.nn import COMBINES, LAYER_NORMS, backbone_spec
from stfpm.errors import UserError
from stfpm.storage import fetch_to_cache, is_s3
from stfpm.training.pose import D4_TRANSFORMS, parse_augment
from stfpm.training.views import VIEWS

AUGMENTATIONS = ("auto", "none", "flip", "d4")  # or comma-separated d4 transforms (stfpm.training.pose)
MODELS = ("stfpm", "patchcore")  # what `--model` chooses; STFPM is the default
MAP_SELECTIONS = ("recipe", "proxy")


@dataclass
class TrainConfig:
    """None means "the backbone's recipe default" (stfpm.nn.backbones). For model "patchcore"
    the student's settings (epochs, optimizer, augment, layer_norm) do not apply; its own are
    `bank_fraction` and `bank_pool` (stfpm.nn.patchcore.PATCHCORE_RECIPE)."""

    # The default teacher works offline: its ImageNet weights ship in a pip package (a core
    # dependency), where resnet18's must be downloaded; its recipe (LITE_RECIPE) is the measured one.
    backbone: str = "efficientnet_lite0"
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
    augment: str | None = None  # "auto": decided from the good images before training (stfpm.training.pose)
    augment_evidence: dict | None = None  # with "auto": the measured evidence per transform (model.json's recipe)
    layer_norm: str | None = None  # how the anomaly map is formed (stfpm.nn.anomaly_map); not a training input
    bank_fraction: float | None = None
    bank_pool: int | None = None
    combine: str | None = None  # product | sum of the layer maps (stfpm.nn.anomaly_map); not a training input
    map_selection: str | None = None  # "recipe": layer_norm and combine as given; "proxy": the best proxy AUROC
    teacher_cache_mb: int = 2048  # memory for TeacherCache (unaugmented training only); 0 disables it
    tile_size: int | None = None  # train, calibrate and predict on tiles of this many source pixels (stfpm.data.tiling)
    tile_overlap: int = 0
    views: str = "auto"  # whole | tiles | whole+tiles; "auto": decided from the images' sizes (stfpm.training.views)
    views_evidence: dict | None = None  # with "auto": the sizes measured and the rule (model.json's recipe)
    student: str | None = None  # the student's backbone; default the teacher's (stfpm.nn.build_student)

    def __post_init__(self):
        if isinstance(self.model, str):
            self.model = self.model.lower()  # model names are case-insensitive: --model PatchCore

    @property
    def tiling(self):
        from stfpm.data.tiling import tiling_of

        return tiling_of(self.tile_size, self.tile_overlap, self.views == "whole+tiles")

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
        if cfg.augment != "auto" and parse_augment(cfg.augment) is None:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)} or comma-separated d4 transforms "
                             f"({', '.join(D4_TRANSFORMS)}), got {cfg.augment!r}")
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
        if cfg.views not in VIEWS:
            raise ValueError(f"views must be one of {', '.join(VIEWS)}, got {cfg.views!r}")
        if cfg.views == "auto" and cfg.tile_size:  # an explicit --tile keeps the tiles-only model it always made
            cfg.views = "tiles"
        if cfg.views == "tiles" and not cfg.tile_size:
            raise ValueError("views 'tiles' needs tile_size (--tile N)")
        if cfg.views == "whole" and cfg.tile_size:
            raise ValueError("views 'whole' does not tile; drop tile_size (--tile) or choose views 'whole+tiles'")
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
    if len(dataset.train) < MIN_TRAIN_IMAGES:
        raise UserError(f"{data}: {len(dataset.train)} good training image(s); training needs at least "
                        f"{MIN_TRAIN_IMAGES}: one to learn from and one held out to set the threshold on "
                        "(`stfpm check-dataset` says how many it finds)")
    train_samples, holdout_samples = split_holdout(dataset.train, cfg.holdout_fraction, cfg.seed)
    return TrainSplit(dataset, train_samples, holdout_samples, str(data), local_root)
