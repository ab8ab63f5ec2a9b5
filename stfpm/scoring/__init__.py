"""Batch scoring on Ray Data: `score` (stfpm.scoring.run) and the score table's reader (`read_scores`).

Names are loaded on first use, so importing a Ray-free module of this package (sources,
table, plan) does not import Ray."""
import importlib

_EXPORTS = {"TABLE_DOC": "table", "map_to_raw": "table", "read_scores": "table", "score": "run"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
