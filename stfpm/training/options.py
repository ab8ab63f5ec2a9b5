"""The training options `stfpm train`, `stfpm train-all` and jobs/train.py share: one list
(TRAINING_OPTIONS), the TrainConfig made from their values, and the Ray options."""
from __future__ import annotations

import functools
from typing import Optional

import typer

def _ray_options(ray_address, workers, gpu, storage, name, max_failures, threads_per_worker):
    if workers < 1:
        return {}
    import ray

    from stfpm.noise import init_ray

    if not ray.is_initialized():
        init_ray(address=ray_address)
    return {"use_gpu": gpu, "storage": storage, "name": name, "max_failures": max_failures,
            "threads_per_worker": threads_per_worker}


# Options shared by `train`, `train-all` and jobs/train.py: name -> (type, typer option).
TRAINING_OPTIONS = {
    "model": (str, typer.Option("stfpm", help="stfpm (student-teacher, trained for epochs) | patchcore (a memory "
                                              "bank of the teacher's patch features: one pass, no training); "
                                              "any case")),
    "bank_fraction": (Optional[float], typer.Option(None, help="PatchCore: bank size as a fraction of all training "
                                                               "patches (coreset); default 0.01")),
    "bank_pool": (Optional[int], typer.Option(None, help="PatchCore: patches kept (spread over the images) before "
                                                         "the coreset; bounds memory; default 40000")),
    "backbone": (str, typer.Option("efficientnet_lite0", help="efficientnet_lite0 (weights in a pip package: "
                                                              "works offline) | resnet18 (weights downloaded once) "
                                                              "| efficientnet_lite1 | efficientnet_lite2")),
    "student": (Optional[str], typer.Option(None, help="STFPM: the student's backbone (same names as --backbone); "
                                                       "default the teacher's")),
    "epochs": (Optional[int], typer.Option(None, help="Default: the backbone's recipe (100)")),
    "batch_size": (Optional[int], typer.Option(None, help="Global batch size (split across workers); default 32, 8 "
                                                                   "for the efficientnet_lite teachers")),
    "lr": (Optional[float], typer.Option(None, help="Default: 0.4 (SGD), 0.1 for the efficientnet_lite teachers")),
    "momentum": (Optional[float], typer.Option(None, help="Default: 0.9")),
    "weight_decay": (Optional[float], typer.Option(None, help="Default: 1e-4")),
    "optimizer": (Optional[str], typer.Option(None, help="sgd | adam; default sgd")),
    "image_size": (Optional[int], typer.Option(None, help="Default: 256")),
    "tile_size": (Optional[int], typer.Option(None, "--tile", help="Cut each image at full resolution into tiles "
                                                                "of this many pixels, each resized to --image-size, "
                                                                "and stitch their maps (large images, small "
                                                                "defects); recorded in model.json, so evaluate, "
                                                                "predict, score and export tile alike")),
    "tile_overlap": (int, typer.Option(0, help="With --tile: pixels shared by neighbouring tiles (their maps are "
                                               "averaged there)")),
    "views": (str, typer.Option("auto", help="auto | whole | tiles | whole+tiles: how the model sees an image. "
                                             "whole+tiles scores the whole image and its 2x2 tiles (or --tile N), "
                                             "each against its own held-out good images, and keeps the larger: a "
                                             "missing part shows whole, a pinhole in the tiles. auto: whole+tiles "
                                             "for images at least twice --image-size, else whole; an explicit --tile "
                                             "alone means tiles. Recorded in model.json")),
    "holdout": (Optional[float], typer.Option(None, help="Fraction of train/good held out (default 0.2)")),
    "seed": (int, typer.Option(0)),
    "threshold_quantile": (float, typer.Option(0.99, help="Threshold = this quantile of held-out good scores")),
    "teacher_weights": (Optional[str], typer.Option(None, help="Teacher weights: PATH or s3:// URI (.pdparams, "
                                                               ".safetensors, legacy .pth)")),
    "augment": (Optional[str], typer.Option(None, help="auto | none | flip | d4 (flips and 90-degree rotations, "
                                                       "for parts whose pose varies); auto keeps the d4 transforms "
                                                       "the good images are closed under, measured with the teacher "
                                                       "and recorded in model.json; default: auto for the "
                                                       "efficientnet_lite teachers, none for resnet18")),
    "layer_norm": (Optional[str], typer.Option(None, help="none | median | holdout | views: divide each layer's map "
                                                          "by its image median (or its held-out mean) before "
                                                          "combining; views: the larger of the plain and the median "
                                                          "map, each calibrated on held-out good images; default: "
                                                          "views for the efficientnet_lite teachers, none for "
                                                          "resnet18")),
    "combine": (Optional[str], typer.Option(None, help="product | sum: how the layer maps are combined (the "
                                                       "paper's product, or the mean of the scaled layer maps)")),
    "map_selection": (Optional[str], typer.Option(None, help="recipe | proxy: keep --layer-norm/--combine, or "
                                                             "pick the map that best tells held-out good images "
                                                             "from the same with synthetic defects")),
    "teacher_cache_mb": (int, typer.Option(2048, help="Memory (MB, per worker) for the frozen teacher's features, "
                                                      "kept across epochs when --augment is none; 0 disables")),
    "workers": (int, typer.Option(0, help="Ray Train workers; 0 trains in this process")),
    "gpu": (bool, typer.Option(False, "--gpu", help="One GPU per worker (nccl)")),
    "storage": (Optional[str], typer.Option(None, help="Checkpoint storage for Ray Train: path or s3:// "
                                                       "(default ~/ray_results)")),
    "name": (Optional[str], typer.Option(None, help="Ray Train run name; rerunning with the same name resumes")),
    "max_failures": (int, typer.Option(0, help="Worker failures to recover from by restarting from the last "
                                               "checkpoint")),
    "threads_per_worker": (Optional[int], typer.Option(None, help="Intra-op threads per worker")),
    "ray_address": (Optional[str], typer.Option(None, help="Ray cluster to join, e.g. auto; default: a local Ray")),
}
_RAY_OPTIONS = ("ray_address", "workers", "gpu", "storage", "name", "max_failures", "threads_per_worker")


def train_config(values: dict):
    """The TrainConfig of TRAINING_OPTIONS values (the CLI's and jobs/train.py's)."""
    from stfpm.training.config import TrainConfig

    values = {name: values[name] for name in TRAINING_OPTIONS if name not in _RAY_OPTIONS}
    values["holdout_fraction"] = values.pop("holdout")
    return TrainConfig(**values)


def training_options(command):
    """Give a command the shared training options (one list for `train` and `train-all`).
    It receives them as `cfg` (TrainConfig), `workers` and `ray_options` ({} to train in this
    process). Typer reads the options from the wrapper's signature."""
    import inspect

    signature = inspect.signature(command)
    own = [p for name, p in signature.parameters.items() if name not in ("cfg", "workers", "ray_options")]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
              for name, (kind, option) in TRAINING_OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in TRAINING_OPTIONS}
        ray_options = _ray_options(**{name: values[name] for name in _RAY_OPTIONS})
        return command(*args, **kwargs, cfg=train_config(values), workers=values["workers"], ray_options=ray_options)

    wrapper.__signature__ = signature.replace(parameters=own + shared)
    return wrapper
