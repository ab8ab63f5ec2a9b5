"""The model directory: `model.json` (a stfpm.model.card.ModelCard) plus the weights in safetensors.

Self-contained (a scoring node needs nothing else) and safe to fetch from a shared bucket:
loading never unpickles, and each weight file's sha256 is checked against the card.
"""
from __future__ import annotations

import dataclasses
import hashlib
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stfpm.model.card import (MODEL_JSON, RETRAIN, SCHEMA_VERSION, WEIGHT_FILES, ModelCard, ModelDirError, read_card,
                        weights_version, write_card)


@dataclass
class LoadedModel:
    network: object  # stfpm.nn.STFPM or stfpm.nn.patchcore.PatchCore, as card.model_name says
    card: ModelCard
    path: str


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
    import paddle

    import stfpm

    return {"stfpm": getattr(stfpm, "__version__", "unknown"), "paddle": paddle.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def save_model(network, out_dir: str | Path, card: ModelCard) -> ModelCard:
    """Write the weights and model.json; the card's weights, model_version and versions are
    filled in here. Returns the card as written."""
    from safetensors.numpy import save as save_tensors

    from stfpm.storage import write_bytes

    if (card.backbone, card.model_name) != (network.backbone, network.model_name):
        raise ValueError(f"the card says {card.model_name} on backbone {card.backbone!r}, the network is "
                         f"{network.model_name} on {network.backbone!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for part, filename in WEIGHT_FILES[card.model_name].items():
        # through storage.write_bytes, not safetensors' save_file: that made the file 0600 whatever
        # the umask, so another user or a serving process could not read the model
        write_bytes(str(out / filename), save_tensors(state_to_numpy(getattr(network, part).state_dict())))
        hashes[filename] = sha256_file(out / filename)
    card = dataclasses.replace(card, weights=hashes, model_version=weights_version(hashes),
                               versions=package_versions(), schema_version=SCHEMA_VERSION)
    write_card(out, card)
    return card


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's arrays; ModelDirError naming the file when it is not one (a
    pickle such as a .pdparams is never unpickled, only recognised by its first byte)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, OSError) as e:
        head = path.read_bytes()[:1]
        kind = "a Python pickle (e.g. a .pdparams or .pth file)" if head == b"\x80" else "not a safetensors file"
        raise ModelDirError(f"{path} is {kind} ({e}); stfpm only loads safetensors weights: {RETRAIN}") from None


def verify_weights(model_dir: str | Path, card: ModelCard) -> None:
    """Every weight file the card records (an exported model's program files) is present with
    its sha256: cheap enough for a scoring driver to run before any work, so a corrupt or
    replaced file fails the run by name instead of failing every row."""
    model_dir = Path(model_dir)
    files, fix = (card.export["sha256"], "re-export the model with `stfpm export`") if card.export else (
        card.weights, RETRAIN)
    for filename, digest in files.items():
        path = model_dir / filename
        if not path.is_file():
            raise ModelDirError(f"{model_dir} is incomplete: {filename} is missing; {fix}")
        if sha256_file(path) != digest:
            raise ModelDirError(f"{path} does not match the sha256 recorded in {model_dir / MODEL_JSON}; "
                                f"the file is corrupt or was replaced: {fix}")


def load_model(model_dir: str | Path) -> LoadedModel:
    """Load a model directory, verifying every weight file's sha256 before reading it."""
    import paddle

    from stfpm.nn import STFPM
    from stfpm.nn.patchcore import PatchCore

    model_dir = Path(model_dir)
    card = read_card(model_dir)
    verify_weights(model_dir, card)
    if card.model_name == "PatchCore":
        views = card.patchcore.get("view_banks")  # [whole, tiles] patches: a bank per view
        network = PatchCore(card.backbone, tuple(card.patchcore["taps"]), card.patchcore["bank_size"],
                            views[0] if views else None)
    else:
        network = STFPM(card.backbone, card.student)
    for part, filename in WEIGHT_FILES[card.model_name].items():
        path = model_dir / filename
        layer = getattr(network, part)
        state = read_safetensors(path)
        own = layer.state_dict()
        misfit = sorted(k for k in set(state) & set(own) if tuple(state[k].shape) != tuple(own[k].shape))
        if set(state) != set(own) or misfit:
            raise ModelDirError(f"{path} does not fit {card.model_name} on backbone {card.backbone!r}: "
                                f"missing {sorted(set(own) - set(state))[:5]}, "
                                f"unexpected {sorted(set(state) - set(own))[:5]}, wrong shape {misfit[:5]}")
        layer.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
    network.eval()
    return LoadedModel(network=network, card=card, path=str(model_dir))
