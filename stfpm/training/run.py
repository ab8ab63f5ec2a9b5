"""The one entry point of training in one process: it picks the model kind, so neither
kind's training imports the other's."""
from __future__ import annotations

from typing import Callable

from stfpm.training.config import TrainConfig, TrainResult
from stfpm.training.loop import train_stfpm
from stfpm.training.patchcore import train_patchcore


def train(data: str, out_dir: str, cfg: TrainConfig, progress: bool = True,
          on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train a model on DATA's good images in this process and write its model directory:
    STFPM's student (stfpm.training.loop), or PatchCore's memory bank
    (stfpm.training.patchcore), as `cfg.model` says."""
    cfg = cfg.resolved()
    if cfg.model == "patchcore":
        return train_patchcore(data, out_dir, cfg, progress)
    return train_stfpm(data, out_dir, cfg, progress, on_epoch)
