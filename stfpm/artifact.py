"""The model directory: `model.json` plus teacher and student weights in safetensors.

Self-contained (a scoring node needs nothing else) and safe to fetch from a shared bucket:
loading never unpickles, and each weight file's sha256 is checked against model.json.
"""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paddle
from safetensors.numpy import load_file, save_file

from stfpm.errors import UserError
from stfpm.nn import STFPM

SCHEMA_VERSION = 1
MODEL_JSON = "model.json"
WEIGHT_FILES = {"teacher": "teacher.safetensors", "student": "student.safetensors"}


class ModelDirError(UserError):
    """A model directory that is missing, incomplete or tampered with."""


@dataclass
class LoadedModel:
    network: STFPM
    meta: dict
    path: str

    @property
    def image_size(self) -> int:
        return int(self.meta["input"]["size"])

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"]["value"])

    @property
    def version(self) -> str:
        return self.meta["model_version"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_to_numpy(state: dict) -> dict[str, np.ndarray]:
    """A Paddle state dict (a layer's, or an optimizer's) as contiguous numpy arrays, ready for
    safetensors; entries that are not tensors (an optimizer's LR scheduler state) are left out."""
    return {k: np.ascontiguousarray(v.numpy()) for k, v in state.items() if hasattr(v, "numpy")}


def package_versions() -> dict:
    import stfpm

    return {"stfpm": getattr(stfpm, "__version__", "unknown"), "paddle": paddle.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def save_model(network: STFPM, out_dir: str | Path, meta: dict) -> Path:
    """Write weights and model.json. `meta` holds input, threshold, recipe, metrics...;
    the schema version, backbone, weight hashes, model_version and versions are filled in here."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for part, filename in WEIGHT_FILES.items():
        save_file(state_to_numpy(getattr(network, part).state_dict()), str(out / filename))
        hashes[filename] = sha256_file(out / filename)
    full = dict(meta)
    full.update(
        schema_version=SCHEMA_VERSION,
        model_name="STFPM",
        backbone=network.backbone,
        weights=hashes,
        model_version=hashlib.sha256("".join(hashes[f] for f in sorted(hashes)).encode()).hexdigest()[:16],
        versions=package_versions(),
    )
    tmp = out / (MODEL_JSON + ".tmp")
    tmp.write_text(json.dumps(full, indent=2, sort_keys=True))
    tmp.replace(out / MODEL_JSON)
    return out


def read_meta(model_dir: str | Path) -> dict:
    path = Path(model_dir) / MODEL_JSON
    if not Path(model_dir).is_dir():
        raise ModelDirError(
            f"model directory {str(model_dir)!r} does not exist; train one with "
            f"`stfpm train DATA --out {model_dir}` or point to a directory holding {MODEL_JSON}")
    if not path.is_file():
        raise ModelDirError(f"{str(model_dir)!r} is not a model directory: it has no {MODEL_JSON}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path} is not valid JSON: {e}") from None
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ModelDirError(f"{path} has schema_version {meta.get('schema_version')!r}; "
                            f"this stfpm reads version {SCHEMA_VERSION}")
    return meta


def write_meta(model_dir: str | Path, meta: dict) -> None:
    """Rewrite model.json (e.g. a new threshold); weights and their hashes are untouched."""
    path = Path(model_dir) / MODEL_JSON
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    tmp.replace(path)


def load_model(model_dir: str | Path) -> LoadedModel:
    """Load a model directory, verifying every weight file's sha256 before reading it."""
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    network = STFPM(meta["backbone"])
    for part, filename in WEIGHT_FILES.items():
        path = model_dir / filename
        if not path.is_file():
            raise ModelDirError(f"{model_dir} is incomplete: {filename} is missing")
        expected = meta["weights"].get(filename)
        if sha256_file(path) != expected:
            raise ModelDirError(f"{path} does not match the sha256 recorded in {MODEL_JSON}; "
                                "the file is corrupt or was replaced")
        layer = getattr(network, part)
        state = load_file(str(path))
        own = layer.state_dict()
        if set(state) != set(own):
            raise ModelDirError(f"{path} does not fit backbone {meta['backbone']!r}: "
                                f"missing {sorted(set(own) - set(state))[:5]}, "
                                f"unexpected {sorted(set(state) - set(own))[:5]}")
        layer.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
    network.eval()
    return LoadedModel(network=network, meta=meta, path=str(model_dir))
