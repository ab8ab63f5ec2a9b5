"""model.json, typed: the `ModelCard` (input spec, map spec, `Calibration`, weights), and the
one parser every reader goes through (`parse_card`: names the file, the key and the fix for
whatever is wrong; `model_version` must be the hash of the weights' sha256s, as it names
output folders). The weight files themselves are stfpm.model.artifact's."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stfpm.errors import UserError
from stfpm.model.ood import InDistribution
from stfpm.model.score_scale import ScoreScale
from stfpm.nn.map_options import COMBINES, LAYER_NORMS

SCHEMA_VERSION = 1
MODEL_JSON = "model.json"
# Each model kind (a card's model_name): its network's sub-layers and their weight files; a new
# kind adds its entry. PatchCore's "memory" is its bank of patch features (stfpm.nn.patchcore).
WEIGHT_FILES = {"STFPM": {"teacher": "teacher.safetensors", "student": "student.safetensors"},
                "PatchCore": {"teacher": "teacher.safetensors", "memory": "bank.safetensors"}}
MODEL_KINDS = {kind: tuple(sorted(parts.values())) for kind, parts in WEIGHT_FILES.items()}
RETRAIN = "retrain the model with `stfpm train`, or restore model.json from where the model came from"


class ModelDirError(UserError):
    """A model directory that is missing, incomplete, malformed or tampered with."""


@dataclass(frozen=True)
class InputSpec:
    """What the network takes: RGB images resized to size x size, then (x / 255 - mean) / std.
    With `tile_size`, tiles of tile_size pixels of the full-resolution image, sharing at least
    `tile_overlap` pixels, are what is resized (stfpm.data.tiling); with `tile_whole` too, the
    whole image comes first (the "whole+tiles" views, combined by MapSpec.tile_view_scale)."""
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    color: str = "RGB"
    tile_size: int | None = None
    tile_overlap: int = 0
    tile_whole: bool = False

    @property
    def tiling(self):
        from stfpm.data.tiling import tiling_of

        return tiling_of(self.tile_size, self.tile_overlap, self.tile_whole)

    @classmethod
    def for_backbone(cls, backbone: str, size: int, tiling=None) -> "InputSpec":
        """The backbone's input at `size`, cut by `tiling` (stfpm.data.tiling.Tiling, or None)."""
        from stfpm.nn import backbone_spec

        spec = backbone_spec(backbone)
        return cls(size=int(size), mean=tuple(spec.mean), std=tuple(spec.std),
                   tile_size=tiling.size if tiling else None, tile_overlap=tiling.overlap if tiling else 0,
                   tile_whole=bool(tiling and tiling.whole))


@dataclass(frozen=True)
class MapSpec:
    """How the per-layer maps become the anomaly map (stfpm.nn.anomaly_map), then how it is
    smoothed (PatchCore's Gaussian, stfpm.nn.maps.smooth_map; 0: not smoothed). Cards from
    before an option existed get the paper's map. `layer_scale`: each layer map's mean over the
    held-out good images (training records it; layer_norm "holdout" divides by it).
    `view_scale`: the median over the held-out good images of the image score under the
    paper's map and under the median map (training records it; layer_norm "views" divides by it).
    `tile_view_scale`: for the "whole+tiles" views (InputSpec.tile_whole), the median over the
    held-out good images of the whole view's image score and of the tiles' (calibration
    records it; stfpm.data.tiling.combine_views divides by it)."""
    layer_norm: str = "none"
    smooth_sigma: float = 0.0
    combine: str = "product"
    layer_scale: tuple[float, ...] | None = None
    view_scale: tuple[float, float] | None = None
    tile_view_scale: tuple[float, float] | None = None

    def options(self) -> dict:
        """anomaly_map's keyword arguments."""
        return {"layer_norm": self.layer_norm, "combine": self.combine, "layer_scale": self.layer_scale,
                "view_scale": self.view_scale}


@dataclass(frozen=True)
class Calibration:
    """What training fitted on good images it did not train on: the decision threshold on the
    raw score, the calibration scores' range, the normalised score's scale (stfpm.model.score_scale;
    None in cards from before it: derived from the range) and the in-distribution check
    (stfpm.model.ood; None in cards from before it: no check). Stored under model.json's
    "threshold" key, the threshold itself as "value". `details` keeps how it was made
    (quantile, image count, data) and any key this version does not know; a new typed field
    is a new attribute."""
    threshold: float
    score_min: float
    score_max: float
    source: str | None = None
    details: dict = field(default_factory=dict)
    score_scale: ScoreScale | None = None
    ood: InDistribution | None = None

    @property
    def scale(self) -> ScoreScale:
        return self.score_scale or ScoreScale.from_range(self.score_min, self.score_max, self.threshold)

    def normalize(self, raw, threshold: float | None = None) -> np.ndarray:
        """Raw scores (any shape) -> [0, 1], 0.5 at `threshold` (default: the stored one), same order."""
        return self.scale.normalize(raw, self.threshold if threshold is None else float(threshold))

    def to_dict(self) -> dict:
        out = dict(self.details)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "details" and value is not None:
                out["value" if f.name == "threshold" else f.name] = (
                    value.to_dict() if isinstance(value, (ScoreScale, InDistribution)) else value)
        return out


@dataclass(frozen=True)
class ModelCard:
    """model.json, typed. `weights` maps each weight file to its sha256; `model_version` is
    `weights_version(weights)`; both are filled in by `save_model`. Keys this version does not
    know are kept in `extra` and written back unchanged."""
    model_name: str
    backbone: str
    input: InputSpec
    calibration: Calibration
    map: MapSpec = MapSpec()
    weights: dict = field(default_factory=dict)
    model_version: str = ""
    taps: list | None = None
    recipe: dict | None = None  # the resolved TrainConfig; after --augment auto, "augment" is the decision and
    # "augment_evidence" its measured distance ratios per d4 transform (stfpm.training.pose)
    training: dict | None = None
    metrics: dict | None = None
    versions: dict | None = None
    export: dict | None = None   # set in exported models (stfpm.model.export)
    patchcore: dict | None = None  # PatchCore's bank: taps, bank_size, patches_per_image, how it was built
    validation: dict | None = None  # label-free proxy AUROC of each map variant (stfpm.training.proxy)
    student: str | None = None  # the STFPM student's backbone when it is not the teacher's (stfpm.nn.build_student)
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.name not in ("metrics",)):
                continue
            if f.name == "calibration":
                out["threshold"] = value.to_dict()
            elif f.name in ("input", "map"):
                out[f.name] = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(value).items()}
            else:
                out[f.name] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def weights_version(weights: dict) -> str:
    """The model version: the first 16 hex digits of sha256 over the weight files' sha256s."""
    return hashlib.sha256("".join(weights[f] for f in sorted(weights)).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ parsing

class _Fields:
    """Typed reads of one JSON object of `source`, each failure naming the key and the fix."""

    def __init__(self, doc, source: str, prefix: str = ""):
        self.source, self.prefix = source, prefix
        if not isinstance(doc, dict):
            self.fail("", f"must be a JSON object, got {type(doc).__name__}")
        self.doc = doc

    def fail(self, key: str, problem: str, fix: str = RETRAIN):
        where = f"key {self.prefix + key!r} " if key or self.prefix else ""
        raise ModelDirError(f"{self.source}: {where}{problem}; {fix}")

    def get(self, key: str, fix: str = RETRAIN):
        if key not in self.doc:
            self.fail(key, "is missing", fix)
        return self.doc[key]

    def sub(self, key: str, fix: str = RETRAIN, optional: bool = False) -> "_Fields":
        if optional and key not in self.doc:
            return _Fields({}, self.source, f"{self.prefix}{key}.")
        return _Fields(self.get(key, fix), self.source, f"{self.prefix}{key}.")

    def string(self, key: str, fix: str = RETRAIN, default=None) -> str:
        value = self.doc.get(key, default) if default is not None else self.get(key, fix)
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty string, got {value!r}", fix)
        return value

    def number(self, key: str, fix: str = RETRAIN) -> float:
        value = self.get(key, fix)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(key, f"must be a finite number, got {value!r}", fix)
        return float(value)

    def positive_int(self, key: str, unit: str = "pixels") -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.fail(key, f"must be a whole number >= 1 ({unit}), got {value!r}")
        return value

    def triple(self, key: str, nonzero: bool = False) -> tuple[float, float, float]:
        value = self.get(key)
        if (not isinstance(value, list) or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           and (v != 0 or not nonzero) for v in value)):
            self.fail(key, f"must be a list of 3 {'non-zero ' if nonzero else ''}numbers (R, G, B), got {value!r}")
        return tuple(float(v) for v in value)

    def positive_numbers(self, key: str, problem: str, length: int | None = None) -> tuple[float, ...] | None:
        """An optional list of positive finite numbers (`length` of them if given); None when absent."""
        value = self.doc.get(key)
        if value is None:
            return None
        if (not isinstance(value, list) or (length is not None and len(value) != length)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                           for v in value)):
            self.fail(key, problem)
        return tuple(float(v) for v in value)

    def optional_dict(self, key: str) -> dict | None:
        value = self.doc.get(key)
        if value is not None and not isinstance(value, dict):
            self.fail(key, f"must be a JSON object or absent, got {type(value).__name__}")
        return value


MAX_INPUT_SIZE = 4096  # input.size: one 4096-px RGB float32 input is 200 MB

THRESHOLD_FIX = ("store one with `stfpm evaluate MODEL_DIR DATA --set-threshold`, or retrain the model "
                 "with `stfpm train`")


def _calibration(f: _Fields) -> Calibration:
    typed = {x.name for x in dataclasses.fields(Calibration)} - {"threshold", "details"}
    threshold = f.number("value", THRESHOLD_FIX)
    if threshold < 0:
        f.fail("value", f"must be >= 0, got {threshold}", THRESHOLD_FIX)
    low, high = f.number("score_min", THRESHOLD_FIX), f.number("score_max", THRESHOLD_FIX)
    if high < low:
        f.fail("score_max", f"({high}) is below score_min ({low})", THRESHOLD_FIX)
    parsed = {"score_min", "score_max", "score_scale", "ood"}
    known = {k: f.doc[k] for k in typed if k in f.doc and k not in parsed}
    details = {k: v for k, v in f.doc.items() if k not in typed | {"value"}}
    scale = f.optional_dict("score_scale")
    if scale is not None:
        log_scale = f.sub("score_scale").number("log_scale")
        if log_scale <= 0:
            f.fail("score_scale.log_scale", f"must be above 0, got {log_scale}")
        scale = ScoreScale(log_scale=log_scale, median_good=scale.get("median_good"))
    ood = f.optional_dict("ood")
    if ood is not None:
        try:
            ood = InDistribution.from_dict(ood)
        except (KeyError, TypeError, ValueError) as e:
            f.fail("ood", f"is not an in-distribution check ({e!r})")
        if not (math.isfinite(ood.limit) and ood.limit > 0):  # NaN or 0 turned the wrong-model check off
            f.fail("ood.limit", f"must be a finite number above 0, got {ood.limit}")
    return Calibration(threshold=threshold, score_min=low, score_max=high, details=details,
                       score_scale=scale, ood=ood, **known)


def _student(f, model_name: str) -> str | None:
    """model.json "student": an STFPM student's backbone when it is not the teacher's."""
    student = f.doc.get("student")
    if student is None:
        return None
    from stfpm.nn.backbones import BACKBONES  # only here: reading a card needs no Paddle otherwise

    if model_name != "STFPM" or not isinstance(student, str) or student not in BACKBONES:
        f.fail("student", f"is {student!r}; expected one of {', '.join(sorted(BACKBONES))} (STFPM only) or absent")
    return student


def _weights(f: _Fields, model_name: str) -> dict:
    weights = f.get("weights")
    if not isinstance(weights, dict) or not all(
            isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v) for v in weights.values()):
        f.fail("weights", "must map each weight file to its sha256 (64 hex digits)")
    for name in weights:  # a weight file is a plain file name in the model directory (no /proc/..., no ../)
        if not _plain_file_name(name):
            f.fail("weights", f"names {name!r}; weight files are plain file names inside the model directory")
    missing = [name for name in MODEL_KINDS[model_name] if name not in weights]
    if missing:
        f.fail("weights", f"has no sha256 for {', '.join(missing)}")
    return dict(weights)


def _plain_file_name(name) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def check_threshold(value, name: str = "threshold") -> float:
    """A decision threshold given to override the model's: a finite number >= 0 (0 calls every
    input anomalous); NaN called nothing anomalous and wrote NaN scores. A UserError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ModelDirError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _patchcore(f: _Fields) -> dict:
    """A PatchCore card's bank description: two tap indices (finer first), the bank's size and
    the patches per image (which bound how many images one forward holds)."""
    bank = f.sub("patchcore")
    taps = bank.get("taps")
    if not (isinstance(taps, list) and len(taps) == 2 and all(isinstance(t, int) and 0 <= t <= 2 for t in taps)
            and taps[0] < taps[1]):
        bank.fail("taps", f"must be two of the backbone's taps 0, 1, 2, finer first, got {taps!r}")
    size = bank.positive_int("bank_size", "patches")
    bank.positive_int("patches_per_image", "patches")
    views = bank.doc.get("view_banks")
    if views is not None and not (isinstance(views, list) and len(views) == 2 and sum(views) == size
                                  and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in views)):
        bank.fail("view_banks", f"must be two positive patch counts (whole view, tiles) adding up to bank_size, "
                                f"got {views!r}")
    return dict(bank.doc)


def parse_card(text: str | bytes, source: str) -> ModelCard:
    """model.json's text -> ModelCard; ModelDirError naming `source`, the key and the fix for
    anything missing, mistyped or inconsistent (schema version, model kind, input, map,
    threshold, weights, model_version)."""
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{source} is not valid JSON ({e}); {RETRAIN}") from None
    f = _Fields(doc, source)
    if f.get("schema_version") != SCHEMA_VERSION:
        f.fail("schema_version", f"is {doc['schema_version']!r}; this stfpm reads version {SCHEMA_VERSION}",
               "use the stfpm version that wrote the model, or retrain it")
    model_name = f.string("model_name", default="STFPM")
    if model_name not in MODEL_KINDS:
        f.fail("model_name", f"is {model_name!r}; this stfpm knows {', '.join(MODEL_KINDS)}")
    inp = f.sub("input")
    spec = InputSpec(size=inp.positive_int("size"), mean=inp.triple("mean"), std=inp.triple("std", nonzero=True),
                     color=inp.string("color", default="RGB"), tile_size=inp.doc.get("tile_size"),
                     tile_overlap=inp.doc.get("tile_overlap", 0), tile_whole=inp.doc.get("tile_whole", False))
    if not spec.size <= MAX_INPUT_SIZE:  # 100,000 made every row a decode "Insufficient memory" input error
        f.fail("input.size", f"is {spec.size}; at most {MAX_INPUT_SIZE} pixels (tile large images: input.tile_size)")
    if spec.tile_size is None and spec.tile_overlap != 0:
        f.fail("input.tile_overlap", f"is {spec.tile_overlap!r} without an input.tile_size")
    if spec.tile_size is None and spec.tile_whole is not False:
        f.fail("input.tile_whole", f"is {spec.tile_whole!r} without an input.tile_size")
    try:
        spec.tiling  # noqa: B018 - Tiling checks the size, overlap and whole flag
    except ValueError as e:
        f.fail("input.tile_size", f"or input.tile_overlap or input.tile_whole is wrong: {e}")
    map_fields = f.sub("map", optional=True)
    map_doc = map_fields.doc
    layer_norm, smooth_sigma = map_doc.get("layer_norm", "none"), map_doc.get("smooth_sigma", 0.0)
    if layer_norm not in LAYER_NORMS:
        f.fail("map.layer_norm", f"is {layer_norm!r}; expected one of {', '.join(LAYER_NORMS)}")
    if isinstance(smooth_sigma, bool) or not isinstance(smooth_sigma, (int, float)) or not 0 <= smooth_sigma < 1e3:
        f.fail("map.smooth_sigma", f"must be a number of pixels >= 0, got {smooth_sigma!r}")
    combine = map_doc.get("combine", "product")
    if combine not in COMBINES:
        f.fail("map.combine", f"is {combine!r}; expected one of {', '.join(COMBINES)}")
    layer_scale = map_fields.positive_numbers("layer_scale", "must be a list of positive numbers (one per layer) or absent")
    if layer_norm == "holdout" and layer_scale is None:
        f.fail("map.layer_scale", "is missing; layer_norm 'holdout' divides each layer by it")
    view_scale = map_fields.positive_numbers("view_scale", "must be a list of two positive numbers or absent", length=2)
    if layer_norm == "views" and (view_scale is None or combine != "product"):
        f.fail("map.view_scale" if view_scale is None else "map.combine",
               "layer_norm 'views' needs view_scale (two numbers) and combine 'product'")
    tile_view_scale = map_fields.positive_numbers("tile_view_scale", "must be a list of two positive numbers or absent",
                                                  length=2)
    if spec.tile_whole and tile_view_scale is None:
        f.fail("map.tile_view_scale", "is missing; input.tile_whole (the whole+tiles views) divides each view's map by it")
    patchcore = _patchcore(f) if model_name == "PatchCore" else None
    weights = _weights(f, model_name)
    version = f.string("model_version")
    if version != weights_version(weights):
        f.fail("model_version", f"is {version!r}, but the weights' sha256s give {weights_version(weights)!r}",
               "model_version must be the hash of the weight hashes: restore the original model.json")
    known = {x.name for x in dataclasses.fields(ModelCard)} | {"threshold"}
    taps = doc.get("taps")
    if taps is not None and not isinstance(taps, list):
        f.fail("taps", f"must be a list or absent, got {type(taps).__name__}")
    return ModelCard(
        model_name=model_name, backbone=f.string("backbone"), input=spec,
        calibration=_calibration(f.sub("threshold", THRESHOLD_FIX)), map=MapSpec(
            layer_norm, float(smooth_sigma), combine, layer_scale, view_scale, tile_view_scale),
        weights=weights, model_version=version, taps=taps, patchcore=patchcore, student=_student(f, model_name),
        **{k: f.optional_dict(k) for k in ("recipe", "training", "metrics", "versions", "export", "validation")},
        extra={k: v for k, v in doc.items() if k not in known})


def read_card(model_dir: str | Path) -> ModelCard:
    """The validated card of a local model directory (trained or exported)."""
    path = Path(model_dir) / MODEL_JSON
    if not Path(model_dir).is_dir():
        raise ModelDirError(
            f"model directory {str(model_dir)!r} does not exist; train one with "
            f"`stfpm train DATA --out {model_dir}` or point to a directory holding {MODEL_JSON}")
    if not path.is_file():
        raise ModelDirError(f"{str(model_dir)!r} is not a model directory: it has no {MODEL_JSON} "
                            "(train one with `stfpm train`)")
    return parse_card(path.read_bytes(), str(path))


def write_card(model_dir: str | Path, card: ModelCard) -> None:
    """Write model.json atomically (temp file + rename); weight files are untouched."""
    path = Path(model_dir) / MODEL_JSON
    tmp = path.with_name(MODEL_JSON + ".tmp")
    tmp.write_text(card.to_json())
    tmp.replace(path)
