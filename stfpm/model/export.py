"""The static inference program: written by `stfpm export`, and compiled in memory by every
CPU predictor, because Paddle Inference with oneDNN runs it 3.6x (ResNet18) to 5x (Lite0)
faster than the dynamic graph on CPU (bench/predict.py). `stfpm export --format onnx` converts
that program with paddle2onnx (opset 17) into one `model.onnx`; `--format openvino` converts the
ONNX graph into OpenVINO IR (`model.xml` + `model.bin`, float32). Both run without Paddle
(`stfpm.model.engines`); this module imports Paddle only where it writes or runs a program.
`--format onnx --precision int8` quantises a PatchCore's backbone (`quantize_onnx`; measured on
the dev sets in bench/RESULTS.md).

The program maps the normalised input (N, 3, S, S) to the per-layer distance maps
(N, h_i, w_i) (for PatchCore one map, the nearest-bank-patch distances: the bank is in the
program's parameters; two with a bank per view, stfpm.nn.maps.view_maps) followed by the
(N, D) feature profile of the in-distribution check (`stfpm.model.ood`; exports from before
it return the maps only); `stfpm.nn.anomaly_map`
upsamples and multiplies them outside the graph (oneDNN cannot run Paddle 3.3's bilinear-interpolate attributes). An export holds
`inference.json` + `inference.pdiparams` (paddle.jit.save) or the ONNX / IR files, a PaddleX-style
`inference.yml`, and our `model.json` so threshold and normalisation travel with it."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
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
PRECISIONS = ("fp32", "int8")
# The models int8 is offered for: those whose image and pixel AUROC it kept within 0.005 of
# float32 on the four dev sets while running faster (bench/int8.py, bench/RESULTS.md, issue 28).
# STFPM's map is a small difference of two quantised networks' features: int8 moved its image
# AUROC by up to 0.16 (screw).
INT8_MODELS = ("PatchCore",)
INT8_CALIBRATION_IMAGES = 64
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


@contextlib.contextmanager
def _logging_above(level: int):
    """Python log records at `level` and below are dropped inside the block."""
    logging.disable(level)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def calibration_batches(card: ModelCard, data: str | Path, n: int = INT8_CALIBRATION_IMAGES,
                        seed: int = 0) -> list[np.ndarray]:
    """A seeded `n` of the good training images of dataset `data` (any layout `stfpm train`
    reads), as the model's normalised input (a tiled model's tiles), one input a batch (ORT's
    histogram calibrators cannot stack batches of different sizes): what int8's activation
    ranges are calibrated on."""
    from stfpm.data import load_dataset
    from stfpm.data.images import normalize_batch, prepare_input

    goods = sorted(s.image for s in load_dataset(data).train)
    if not goods:
        raise ModelDirError(f"{data}: no good training images to calibrate int8 on")
    picks = sorted(np.random.default_rng(seed).choice(len(goods), min(n, len(goods)), replace=False))
    tiles = np.concatenate([prepare_input(Path(goods[i]).read_bytes(), card.input.size, goods[i],
                                          tiling=card.input.tiling).tiles for i in picks])
    return [normalize_batch(tiles[i:i + 1], card.input.mean, card.input.std) for i in range(len(tiles))]


def int8_nodes(graph) -> list[str]:
    """Names of the nodes of an ONNX graph (onnx.ModelProto) that `quantize_onnx` quantises:
    the backbones (the convolutions and every node they depend on) less their stems (the
    convolutions reading the image). Left in float32: the stems, whose BN-folded weights have
    dead channels that ORT widens the scale of by up to 3000x (measured on PatchCore, percentile
    ranges: screw's image AUROC -0.0044 with the stem in int8, -0.0008 without), and the head that turns
    features into maps (STFPM's normalised teacher-student distance, PatchCore's aggregation,
    nearest-bank matrix product and min) and the feature profile."""
    producer = {out: node for node in graph.graph.node for out in node.output}
    image = graph.graph.input[0].name
    keep, stack = set(), [n for n in graph.graph.node if n.op_type == "Conv"]
    while stack:
        node = stack.pop()
        if node.name not in keep:
            keep.add(node.name)
            stack.extend(producer[i] for i in node.input if i in producer)
    stems = {n.name for n in graph.graph.node if n.op_type == "Conv" and image in n.input}
    return sorted(keep - stems)


def quantize_onnx(graph: bytes, calibration, method: str = "percentile") -> bytes:
    """int8 post-training quantisation of a forward's ONNX graph by ONNX Runtime's quantiser:
    QDQ, weights int8 per output channel, activations uint8 (the U8S8 pair ORT's CPU kernels
    fuse into QLinearConv; int8 activations ran slower than float32 on Lite0), ranges calibrated on
    `calibration`, an iterable of normalised (N, 3, S, S) float32 batches of good training
    images. Only the backbones past their stems are quantised (`int8_nodes`). `method`: ORT's
    calibrator, "percentile" (ranges at the 0.001 and 99.999 percentiles: on the dev sets it
    kept PatchCore's AUROC closest to float32, bench/RESULTS.md), "minmax" or "entropy"."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(methods)}")
    with tempfile.TemporaryDirectory(prefix="stfpm-int8-") as tmp:
        source, folded, quantised = (Path(tmp) / n for n in ("fp32.onnx", "folded.onnx", "int8.onnx"))
        source.write_bytes(graph)
        # ORT warns about paddle2onnx's spare constants at every session, and its quantiser logs
        # each weight scale it widens for an int32 bias (dead channels) at INFO on the root logger;
        # its histogram calibrators print their progress
        with native_lines_dropped("CleanUnusedInitializersAndNodeArgs"), _logging_above(logging.INFO), \
                contextlib.redirect_stdout(io.StringIO()):
            # ORT's graph optimisation first: batch norms folded into the convolutions they
            # follow, so each conv's weights are quantised with its scale and shift in them
            quant_pre_process(str(source), str(folded), skip_symbolic_shape=True)
            model = onnx.load(str(folded))
            input_name = model.graph.input[0].name

            class Batches(CalibrationDataReader):
                def __init__(self):
                    self.batches = iter(calibration)

                def get_next(self):
                    batch = next(self.batches, None)
                    return None if batch is None else {input_name: np.ascontiguousarray(batch, dtype=np.float32)}

            quantize_static(str(folded), str(quantised), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=int8_nodes(model), calibrate_method=methods[method])
        return quantised.read_bytes()


def _write_format(network, size: int, out: Path, fmt: str, calibration: list | None = None) -> None:
    """Write the forward's files of export format `fmt` (model.json's export.format) into `out`;
    with `calibration` (batches, `calibration_batches`) the ONNX graph quantised to int8."""
    if fmt == "paddle_inference":
        save_program(network, size, out)
        return
    graph = network_onnx(network, size)
    if calibration is not None:
        graph = quantize_onnx(graph, calibration)
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


def export_model(model_dir: str | Path, out_dir: str | Path, format: str = "paddle", precision: str = "fp32",
                 calibration_data: str | Path | None = None) -> Path:
    """Write an exported model of `model_dir` in `format` ("paddle", "onnx" or "openvino") to
    `out_dir`: the forward's files, inference.yml and model.json (its `export` says the format
    and precision and holds the files' sha256). `precision` "int8": an ONNX graph quantised by
    `quantize_onnx` (PatchCore only, `INT8_MODELS`), calibrated on good training images of
    `calibration_data` (default: the dataset model.json says the model was trained on)."""
    if format not in FORMATS:
        raise ModelDirError(f"unknown export format {format!r}; expected one of {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise ModelDirError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    fmt = FORMATS[format]
    model = load_model(model_dir)
    card = model.card
    size = card.input.size
    calibration, calibrated_on = None, None
    if precision == "int8":
        if fmt != "onnx":
            raise ModelDirError(f"--precision int8 is an ONNX export (run by ONNX Runtime), not {format}: "
                                "use --format onnx")
        if card.model_name not in INT8_MODELS:
            raise ModelDirError(f"int8 is offered for {', '.join(INT8_MODELS)} only: on {card.model_name} it moved "
                                "the dev sets' image AUROC by more than 0.005 (bench/RESULTS.md, issue 28)")
        calibrated_on = calibration_data or (card.training or {}).get("data")
        if calibration_data is not None and not Path(calibration_data).is_dir():
            raise ModelDirError(f"--calibration-data {calibration_data}: not a dataset folder")
        if not calibrated_on or not Path(calibrated_on).is_dir():
            raise ModelDirError(f"int8 is calibrated on the model's good training images, but its training data "
                                f"{calibrated_on!r} (model.json training.data) is not here; pass --calibration-data DIR")
        calibration = calibration_batches(card, calibrated_on)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = [f for other in FILES.values() for f in other if f not in FILES[fmt]]
    for name in stale:  # a re-export in another format leaves no file the card does not describe
        (out / name).unlink(missing_ok=True)
    _write_format(model.network, size, out, fmt, calibration)
    files = FILES[fmt]
    card = dataclasses.replace(card, export={
        "format": fmt,
        **({"program": PROGRAM, "params": PARAMS} if fmt == "paddle_inference" else {"files": list(files), "opset": OPSET}),
        "precision": precision,
        **({"int8": {"quantiser": "onnxruntime QDQ, per-channel int8 weights, uint8 activations, backbone past the stem",
                     "calibration": {"data": str(calibrated_on), "inputs": len(calibration),
                                     "method": "percentile"}}} if calibration is not None else {}),
        "outputs": OUTPUTS,
        "sha256": {f: sha256_file(out / f) for f in files}, "source_model_dir": str(model_dir)})
    write_card(out, card)
    cal = card.calibration
    (out / INFERENCE_YML).write_text(yaml.safe_dump({
        "Global": {"model_name": card.model_name, "backbone": card.backbone, "model_version": card.model_version,
                   "format": fmt, "precision": precision, "files": list(files)},
        "PreProcess": {"transform_ops": [
            {"ReadImage": {"format": "RGB"}},
            *([{"Tile": {"size": card.input.tile_size, "overlap": card.input.tile_overlap,
                         "whole": card.input.tile_whole, "view_scale": card.map.tile_view_scale,
                         "doc": "tiles of the full-resolution image, stitched after; with whole, the whole image "
                                "resized first, and the two views' maps divided by view_scale and the larger kept "
                                "(stfpm.data.tiling)"}}]
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
    if export.get("precision", "fp32") == "int8":
        runs = ("onnxruntime",)  # OpenVINO's compile of it gives PatchCore maps far from ORT's (bench/RESULTS.md)
    engine = runs[0] if engine == "auto" else engine
    if engine not in runs:
        raise ModelDirError(f"exported model {d} ({fmt}) runs on {' or '.join(runs)}, not on {engine}")
    if engine == "onednn":
        return card, open_program(d, threads, has_profile), engine
    if engine == "onnxruntime":
        return card, open_onnx(d / ONNX_FILE, threads, has_profile), engine
    return card, open_openvino(d / FILES[fmt][0], threads, has_profile), engine
