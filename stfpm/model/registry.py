"""The model registry: a YAML mapping category -> model directory, read by `stfpm score` (each
input scored by its category's model) and `stfpm serve` (a route per category). Here, below
both, so neither wing imports the other.

    models:                     # the top-level key is optional
      bottle: s3://models/bottle
      cable: cable              # relative to the YAML's folder
"""
from __future__ import annotations

import yaml

from stfpm.errors import UserError
from stfpm.storage import parent_uri, read_bytes, resolve_entry

REGISTRY_SUFFIXES = (".yaml", ".yml")


def is_registry(model: str) -> bool:
    return model.lower().endswith(REGISTRY_SUFFIXES)


def read_registry(path: str) -> dict[str, str]:
    """{category: model directory URI} of a registry YAML (local or s3://), relative entries
    resolved against its folder (storage.resolve_entry: credentials in a URL redacted); a
    one-line UserError naming the file when it is not one."""
    try:
        doc = yaml.safe_load(read_bytes(path))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    entries = doc.get("models", doc) if isinstance(doc, dict) else None
    if not isinstance(entries, dict) or not entries or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in entries.items()):
        raise UserError(f"{path}: a registry maps category names to model directories, e.g. "
                        "{models: {bottle: s3://models/bottle, cable: models/cable}}")
    base = parent_uri(path)
    return {category: resolve_entry(uri, base) for category, uri in entries.items()}
