"""The PaddleX-style Python API: `create_model(...).predict(...)` yielding results."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from stfpm.results import AnomalyResult, OutputNames

MODEL_NAMES = ("STFPM", "PatchCore")


def canonical_model_name(name: str) -> str:
    """"STFPM" or "PatchCore" for any spelling of either ("stfpm", "patchcore", "PATCHCORE"):
    model names are case-insensitive everywhere (create_model, `--model`)."""
    for known in MODEL_NAMES:
        if isinstance(name, str) and name.lower() == known.lower():
            return known
    raise ValueError(f"unknown model_name {name!r}; supported: {', '.join(MODEL_NAMES)} (any case)")


def _is_url(text: str) -> bool:
    from stfpm.storage import is_http, is_s3

    return is_http(text) or is_s3(text)


def _expand(item: Any) -> Iterator[tuple[str | None, Any]]:
    """Flatten what PaddleX accepts into (input_path, source) pairs, lazily and in order:
    arrays, file paths, http(s)/s3 URLs, directories (images in sorted order, recursive),
    {"img": ...} dicts and lists of these."""
    from stfpm.data import IMAGE_EXTENSIONS

    if isinstance(item, np.ndarray):
        yield None, item
    elif isinstance(item, dict):
        if "img" not in item:
            raise ValueError(f"an input dict needs the key 'img', got keys {sorted(item)}")
        yield from _expand(item["img"])
    elif isinstance(item, (list, tuple)):
        for sub in item:
            yield from _expand(sub)
    elif isinstance(item, (str, Path)):
        text = str(item)
        if _is_url(text):
            yield text, text
        elif Path(text).is_dir():
            files = sorted(p for p in Path(text).rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise FileNotFoundError(f"directory {text!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            for p in files:
                yield str(p), str(p)
        elif Path(text).is_file():
            yield text, text
        else:
            raise FileNotFoundError(f"input {text!r} is neither a file, a directory nor a URL")
    else:
        raise TypeError(f"unsupported input of type {type(item).__name__}: pass a numpy image, "
                        "a path, a URL, a directory, a dict {'img': ...} or a list of these")


def check_inputs(inputs: list) -> tuple[list, list[str]]:
    """(the inputs that name images, a message for each that does not), before a model loads:
    a missing path or a folder without images is found before any work is done."""
    good, problems = [], []
    for item in inputs:
        try:
            next(iter(_expand(item)), None)
            good.append(item)
        except (FileNotFoundError, ValueError, TypeError) as e:
            problems.append(str(e))
    return good, problems


def _load(source: Any) -> bytes | np.ndarray:
    """What `Predictor.prepare` takes: an array as given, a URL's or a file's bytes."""
    if isinstance(source, np.ndarray):
        return source
    if _is_url(source):
        from stfpm.storage import read_bytes

        return read_bytes(source)
    return Path(source).read_bytes()


class STFPMModel:
    """A loaded model (our model directory or an exported inference model) with predict()."""

    def __init__(self, model_dir: str | Path, model_name: str | None = None, engine: str = "auto"):
        from stfpm.model.inference import Predictor

        self.model_dir = str(model_dir)
        self.predictor = Predictor.open(model_dir, engine=engine)
        self.model_name = found = self.predictor.card.model_name  # the directory says what it holds
        if model_name is not None and canonical_model_name(model_name) != found:
            raise ValueError(f"model_dir {self.model_dir!r} holds a {found} model, not {model_name}: "
                             f"pass model_name={found!r}, or leave model_name out")

    @property
    def threshold(self) -> float:
        return self.predictor.threshold

    def predict(self, input: Any, batch_size: int = 1, threshold: float | None = None,
                errors: list[str] | None = None) -> Iterator[AnomalyResult]:
        """Yield one result per image; each batch of `batch_size` images is ONE forward pass.
        With an `errors` list, an input that cannot be read or decoded (a corrupt or unreadable
        file) is appended to it as "<input>: <why>" and skipped, instead of ending the iteration."""
        from stfpm.storage import printable_path

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batch, index, names = [], 0, OutputNames()
        for input_path, source in _expand(input):
            name = printable_path(input_path) if input_path else "<array>"
            try:
                prepared = self.predictor.prepare(_load(source), name, keep_image=True)
            except (ValueError, OSError) as e:  # ImageDecodeError and StorageError are among them
                if errors is None:
                    raise
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                errors.append(reason if name in reason else f"{name}: {reason}")
                continue
            batch.append((input_path, prepared))
            if len(batch) == batch_size:
                yield from self._run(batch, index, threshold, names)
                index += len(batch)
                batch = []
        if batch:
            yield from self._run(batch, index, threshold, names)

    def _run(self, batch, index, threshold, names):
        p = self.predictor
        for i, ((input_path, prepared), pred) in enumerate(zip(batch, p.run([b for _, b in batch], threshold))):
            yield AnomalyResult(input_path, prepared.image, pred, p.calibration, index + i,
                                names(input_path, index + i))


def create_model(model_name: str | None = None, model_dir: str | Path | None = None, engine: str = "auto") -> STFPMModel:
    """PaddleX's entry point. `model_dir` is a directory written by `stfpm train` (or by
    `stfpm export`); there are no built-in downloadable models, so it is required. The
    directory's model.json says which kind it holds (STFPM or PatchCore), so `model_name` is
    optional: when given (any case) it must match, else a one-line error names both.
    `engine`: what runs the forward (`stfpm.model.inference.ENGINES`); "auto" picks the
    fastest exact one installed (an export: its format's engine)."""
    if model_name is not None:
        canonical_model_name(model_name)
    if model_dir is None:
        raise ValueError("create_model needs model_dir: train a model with "
                         "`stfpm train DATA --out MODEL_DIR` and pass model_dir=MODEL_DIR")
    return STFPMModel(model_dir, model_name, engine)
