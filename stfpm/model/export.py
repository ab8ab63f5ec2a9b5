"""The static inference program: written by `stfpm export`, and compiled in memory by every
CPU predictor, because Paddle Inference with oneDNN runs it 3.6x (ResNet18) to 5x (Lite0)
faster than the dynamic graph on CPU (bench/predict.py).

The program maps the normalised input (N, 3, S, S) to the per-layer distance maps
(N, h_i, w_i) (for PatchCore one map, the nearest-bank-patch distances: the bank is in the
program's parameters) followed by the (N, D) feature profile of the in-distribution check
(`stfpm.model.ood`; exports from before it return the maps only); `stfpm.nn.anomaly_map`
upsamples and multiplies them outside the graph (oneDNN cannot run Paddle 3.3's bilinear-interpolate attributes). An export holds
`inference.json` + `inference.pdiparams` (paddle.jit.save), a PaddleX-style
`inference.yml`, and our `model.json` so threshold and normalisation travel with it."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import paddle
import yaml

from stfpm.model.artifact import load_model, sha256_file, verify_weights
from stfpm.model.card import MODEL_JSON, ModelCard, ModelDirError, read_card, write_card
from stfpm.noise import PIR_OUT_TENSOR, native_lines_dropped
from stfpm.runtime import cpu_threads

PROGRAM, PARAMS, INFERENCE_YML = "inference.json", "inference.pdiparams", "inference.yml"
OUTPUTS = "layer_maps+feature_profile"  # what the program returns
MAPS_ONLY = "layer_maps"  # exports from before the in-distribution check; older ones returned the combined map

# (N, 3, S, S) float32 -> (per-layer (N, h, w) maps, (N, D) feature profile or None)
LayerForward = Callable[[np.ndarray], tuple[list, np.ndarray | None]]


class _InferenceNetwork(paddle.nn.Layer):
    """What the program computes: input batch -> per-layer distance maps + feature profile."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, image):
        return self.network.inference_outputs(image)


def save_program(network, size: int, out_dir: str | Path) -> Path:
    """paddle.jit.save the network's inference outputs as `out_dir/inference.{json,pdiparams}`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layer = _InferenceNetwork(network)
    was_training = network.training
    layer.eval()
    spec = paddle.static.InputSpec([None, 3, size, size], "float32", "image")
    with native_lines_dropped(PIR_OUT_TENSOR):
        paddle.jit.save(layer, str(out / "inference"), input_spec=[spec])
    if was_training:
        network.train()
    return out


def open_program(program_dir: str | Path, threads: int | None = None, has_profile: bool = True) -> LayerForward:
    """A Paddle Inference predictor of a saved program, with oneDNN on CPU when Paddle has it;
    `has_profile`: the program's last output is the feature profile.
    The predictor holds the program and weights in memory: the files may go afterwards."""
    from paddle import inference

    d = Path(program_dir)
    config = inference.Config(str(d / PROGRAM), str(d / PARAMS))
    config.disable_gpu()
    if paddle.base.core.is_compiled_with_mkldnn():
        config.enable_mkldnn()
        config.set_mkldnn_cache_capacity(16)  # one primitive set per batch shape seen; bounded
    config.set_cpu_math_library_num_threads(threads or cpu_threads())
    config.disable_glog_info()
    predictor = inference.create_predictor(config)
    input_handle = predictor.get_input_handle(predictor.get_input_names()[0])
    output_handles = [predictor.get_output_handle(name) for name in predictor.get_output_names()]

    def forward(batch: np.ndarray) -> tuple[list, np.ndarray | None]:
        input_handle.reshape(list(batch.shape))
        input_handle.copy_from_cpu(np.ascontiguousarray(batch, dtype=np.float32))
        predictor.run()
        outputs = [handle.copy_to_cpu() for handle in output_handles]
        return (outputs[:-1], outputs[-1]) if has_profile else (outputs, None)

    return forward


def compile_network(network, size: int, threads: int | None = None) -> LayerForward:
    """The in-memory CPU engine of a trained network: save its program to a temporary
    folder, load it into Paddle Inference, delete the folder."""
    with tempfile.TemporaryDirectory(prefix="stfpm-program-") as tmp:
        return open_program(save_program(network, size, tmp), threads)


def export_model(model_dir: str | Path, out_dir: str | Path) -> Path:
    model = load_model(model_dir)
    card = model.card
    size = card.input.size
    out = save_program(model.network, size, out_dir)
    card = dataclasses.replace(card, export={
        "format": "paddle_inference", "program": PROGRAM, "params": PARAMS, "outputs": OUTPUTS,
        "sha256": {f: sha256_file(out / f) for f in (PROGRAM, PARAMS)}, "source_model_dir": str(model_dir)})
    write_card(out, card)
    cal = card.calibration
    (out / INFERENCE_YML).write_text(yaml.safe_dump({
        "Global": {"model_name": card.model_name, "backbone": card.backbone, "model_version": card.model_version},
        "PreProcess": {"transform_ops": [
            {"ReadImage": {"format": "RGB"}},
            *([{"Tile": {"size": card.input.tile_size, "overlap": card.input.tile_overlap,
                         "doc": "tiles of the full-resolution image, stitched after (stfpm.data.tiling)"}}]
              if card.input.tile_size else []),
            {"Resize": {"target_size": [size, size]}},
            {"Normalize": {"mean": list(card.input.mean), "std": list(card.input.std), "scale": 1.0 / 255}},
            {"ToCHWImage": None}]},
        "PostProcess": {"AnomalyMap": {"upsample": "each output bilinearly to the input size",
                                       "layer_norm": card.map.layer_norm, "combine": card.map.combine,
                                       "layer_scale": None if card.map.layer_scale is None else list(card.map.layer_scale),
                                       "view_scale": None if card.map.view_scale is None else list(card.map.view_scale),
                                       "gaussian_sigma": card.map.smooth_sigma,
                                       "score": "max", "threshold": cal.threshold,
                                       "normalised_score": {**cal.scale.to_dict(), "doc": "stfpm.model.score_scale"}}},
    }, sort_keys=False))
    return out


def is_exported(model_dir: str | Path) -> bool:
    d = Path(model_dir)
    return (d / INFERENCE_YML).is_file() and (d / PARAMS).is_file()


def load_exported(model_dir: str | Path, threads: int | None = None) -> tuple[ModelCard, LayerForward]:
    """(card, layer forward) for an exported model, run by Paddle Inference on `threads` CPU
    threads (default `stfpm.runtime.cpu_threads()`)."""
    d = Path(model_dir)
    if not (d / MODEL_JSON).is_file():
        raise ModelDirError(f"exported model {d} has no {MODEL_JSON}; re-export it with `stfpm export`")
    card = read_card(d)
    export = card.export or {}
    if export.get("outputs") not in (OUTPUTS, MAPS_ONLY):
        raise ModelDirError(f"exported model {d} comes from an older stfpm (its program returns the combined "
                            f"map); re-export it with `stfpm export {export.get('source_model_dir', 'MODEL_DIR')}`")
    digests = export.get("sha256")
    if not isinstance(digests, dict) or set(digests) != {PROGRAM, PARAMS}:
        raise ModelDirError(f"{d / MODEL_JSON}: key 'export.sha256' must hold the sha256 of {PROGRAM} and {PARAMS}; "
                            "re-export the model with `stfpm export`")
    verify_weights(d, card)
    return card, open_program(d, threads, has_profile=export["outputs"] == OUTPUTS)
