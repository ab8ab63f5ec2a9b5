"""The static inference program: written by `stfpm export`, and compiled in memory by every
CPU predictor, because Paddle Inference with oneDNN runs it 3.6x (ResNet18) to 5x (Lite0)
faster than the dynamic graph on CPU (bench/predict.py). `stfpm export --format onnx` converts
that program with paddle2onnx (opset 17) into one `model.onnx`; `--format openvino` converts the
ONNX graph into OpenVINO IR (`model.xml` + `model.bin`, float32). Both run without Paddle
(`stfpm.model.engines`); this module imports Paddle only where it writes or runs a program.

The program maps the normalised input (N, 3, S, S) to the per-layer distance maps
(N, h_i, w_i) (for PatchCore one map, the nearest-bank-patch distances: the bank is in the
program's parameters) followed by the (N, D) feature profile of the in-distribution check
(`stfpm.model.ood`; exports from before it return the maps only); `stfpm.nn.anomaly_map`
upsamples and multiplies them outside the graph (oneDNN cannot run Paddle 3.3's bilinear-interpolate attributes). An export holds
`inference.json` + `inference.pdiparams` (paddle.jit.save) or the ONNX / IR files, a PaddleX-style
`inference.yml`, and our `model.json` so threshold and normalisation travel with it."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import yaml

from stfpm.model.artifact import load_model, sha256_file, verify_weights
from stfpm.model.card import MODEL_JSON, ModelCard, ModelDirError, read_card, write_card
from stfpm.model.engines import LayerForward, open_onnx, open_openvino  # noqa: F401  (LayerForward: its old home)
from stfpm.noise import PADDLE2ONNX_PROGRESS, PIR_OUT_TENSOR, native_lines_dropped
from stfpm.runtime import cpu_threads

PROGRAM, PARAMS, INFERENCE_YML = "inference.json", "inference.pdiparams", "inference.yml"
ONNX_FILE, IR_XML, IR_BIN = "model.onnx", "model.xml", "model.bin"
OPSET = 17
FORMATS = {"paddle": "paddle_inference", "onnx": "onnx", "openvino": "openvino"}  # --format: model.json export.format
FILES = {"paddle_inference": (PROGRAM, PARAMS), "onnx": (ONNX_FILE,), "openvino": (IR_XML, IR_BIN)}
OUTPUTS = "layer_maps+feature_profile"  # what the program returns
MAPS_ONLY = "layer_maps"  # exports from before the in-distribution check; older ones returned the combined map


def _inference_layer(network):
    """What the program computes: input batch -> per-layer distance maps + feature profile."""
    import paddle

    class InferenceNetwork(paddle.nn.Layer):
        def __init__(self, network):
            super().__init__()
            self.network = network

        def forward(self, image):
            return self.network.inference_outputs(image)

    return InferenceNetwork(network)


def save_program(network, size: int, out_dir: str | Path) -> Path:
    """paddle.jit.save the network's inference outputs as `out_dir/inference.{json,pdiparams}`."""
    import paddle

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layer = _inference_layer(network)
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
    import paddle
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


def program_onnx(program_dir: str | Path) -> bytes:
    """The ONNX graph (opset 17) of a saved program, by paddle2onnx: the same forward, outputs
    in the program's order."""
    try:
        import paddle2onnx
    except ImportError as e:
        raise ModelDirError("exporting to ONNX or OpenVINO needs paddle2onnx: pip install 'stfpm[onnx]'") from e
    d = Path(program_dir)
    with native_lines_dropped(PIR_OUT_TENSOR), native_lines_dropped(PADDLE2ONNX_PROGRESS, fd=1):
        try:
            graph = paddle2onnx.export(str(d / PROGRAM), str(d / PARAMS), save_file=None, opset_version=OPSET,
                                       enable_onnx_checker=True, enable_optimize=True)
        except NameError:  # paddle2onnx logs the converter's error and then returns an unset name
            graph = None
    if not graph:
        raise ModelDirError(f"paddle2onnx could not convert the program in {d} (its log above says why)")
    return graph


def network_onnx(network, size: int) -> bytes:
    """A trained network's forward as ONNX bytes, in memory (the program's files go afterwards)."""
    with tempfile.TemporaryDirectory(prefix="stfpm-program-") as tmp:
        return program_onnx(save_program(network, size, tmp))


def _write_format(network, size: int, out: Path, fmt: str) -> None:
    """Write the forward's files of export format `fmt` (model.json's export.format) into `out`."""
    if fmt == "paddle_inference":
        save_program(network, size, out)
        return
    graph = network_onnx(network, size)
    if fmt == "onnx":
        (out / ONNX_FILE).write_bytes(graph)
        return
    try:
        import openvino as ov
    except ImportError as e:
        raise ModelDirError("exporting to OpenVINO needs openvino: pip install 'stfpm[openvino]'") from e
    with tempfile.TemporaryDirectory(prefix="stfpm-onnx-") as tmp:
        onnx_path = Path(tmp) / ONNX_FILE
        onnx_path.write_bytes(graph)
        ov.save_model(ov.convert_model(str(onnx_path)), str(out / IR_XML), compress_to_fp16=False)  # float32 weights


def export_model(model_dir: str | Path, out_dir: str | Path, format: str = "paddle") -> Path:
    """Write an exported model of `model_dir` in `format` ("paddle", "onnx" or "openvino") to
    `out_dir`: the forward's files, inference.yml and model.json (its `export` says the format
    and holds the files' sha256)."""
    if format not in FORMATS:
        raise ModelDirError(f"unknown export format {format!r}; expected one of {', '.join(FORMATS)}")
    fmt = FORMATS[format]
    model = load_model(model_dir)
    card = model.card
    size = card.input.size
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = [f for other in FILES.values() for f in other if f not in FILES[fmt]]
    for name in stale:  # a re-export in another format leaves no file the card does not describe
        (out / name).unlink(missing_ok=True)
    _write_format(model.network, size, out, fmt)
    files = FILES[fmt]
    card = dataclasses.replace(card, export={
        "format": fmt,
        **({"program": PROGRAM, "params": PARAMS} if fmt == "paddle_inference" else {"files": list(files), "opset": OPSET}),
        "outputs": OUTPUTS,
        "sha256": {f: sha256_file(out / f) for f in files}, "source_model_dir": str(model_dir)})
    write_card(out, card)
    cal = card.calibration
    (out / INFERENCE_YML).write_text(yaml.safe_dump({
        "Global": {"model_name": card.model_name, "backbone": card.backbone, "model_version": card.model_version,
                   "format": fmt, "files": list(files)},
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
    return (d / INFERENCE_YML).is_file() and any((d / files[0]).is_file() for files in FILES.values())


def export_format(model_dir: str | Path) -> str:
    """The export format model.json records ("paddle_inference", "onnx", "openvino"), read
    without loading anything."""
    d = Path(model_dir)
    if not (d / MODEL_JSON).is_file():
        raise ModelDirError(f"exported model {d} has no {MODEL_JSON}; re-export it with `stfpm export`")
    fmt = (read_card(d).export or {}).get("format", "paddle_inference")
    if fmt not in FILES:
        raise ModelDirError(f"{d / MODEL_JSON}: key 'export.format' is {fmt!r}; expected one of {', '.join(FILES)}")
    return fmt


def load_exported(model_dir: str | Path, threads: int | None = None,
                  engine: str = "auto") -> tuple[ModelCard, LayerForward, str]:
    """(card, layer forward, engine) for an exported model on `threads` CPU threads (default
    `stfpm.runtime.cpu_threads()`): a Paddle program by Paddle Inference, an ONNX graph by ONNX
    Runtime (`engine` "openvino": by OpenVINO, which reads ONNX too), an IR by OpenVINO."""
    d = Path(model_dir)
    fmt = export_format(d)
    card = read_card(d)
    export = card.export or {}
    if export.get("outputs") not in (OUTPUTS, MAPS_ONLY):
        raise ModelDirError(f"exported model {d} comes from an older stfpm (its program returns the combined "
                            f"map); re-export it with `stfpm export {export.get('source_model_dir', 'MODEL_DIR')}`")
    digests = export.get("sha256")
    if not isinstance(digests, dict) or set(digests) != set(FILES[fmt]):
        raise ModelDirError(f"{d / MODEL_JSON}: key 'export.sha256' must hold the sha256 of {' and '.join(FILES[fmt])}; "
                            "re-export the model with `stfpm export`")
    verify_weights(d, card)
    has_profile, threads = export["outputs"] == OUTPUTS, threads or cpu_threads()
    runs = {"paddle_inference": ("onednn",), "onnx": ("onnxruntime", "openvino"), "openvino": ("openvino",)}[fmt]
    engine = runs[0] if engine == "auto" else engine
    if engine not in runs:
        raise ModelDirError(f"exported model {d} ({fmt}) runs on {' or '.join(runs)}, not on {engine}")
    if engine == "onednn":
        return card, open_program(d, threads, has_profile), engine
    if engine == "onnxruntime":
        return card, open_onnx(d / ONNX_FILE, threads, has_profile), engine
    return card, open_openvino(d / FILES[fmt][0], threads, has_profile), engine
