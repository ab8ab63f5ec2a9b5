"""The Paddle-free engines of the forward: ONNX Runtime and OpenVINO, each running the graph
`stfpm export --format onnx|openvino` writes (or, for ONNX Runtime, the ONNX bytes
`stfpm.model.export.network_onnx` converts in memory). Each returns a `LayerForward` as Paddle
Inference's does (`stfpm.model.export.open_program`), so the Predictor's pre- and
post-processing stay one path whatever the engine. Both engines run in float32: OpenVINO is
told so (it would pick bf16 on CPUs that have it), so the maps equal Paddle's within 1e-5.

Install them with the extras `.[onnx]` (onnxruntime) and `.[openvino]`."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import numpy as np

# (N, 3, S, S) float32 -> (per-layer (N, h, w) maps, (N, D) feature profile or None)
LayerForward = Callable[[np.ndarray], tuple[list, "np.ndarray | None"]]

EXTRAS = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino")}  # engine: (module, extra)


def installed(engine: str) -> bool:
    """Whether this process can run `engine` ("onnxruntime" or "openvino")."""
    return importlib.util.find_spec(EXTRAS[engine][0]) is not None


def _require(engine: str):
    module, extra = EXTRAS[engine]
    if not installed(engine):
        from stfpm.model.card import ModelDirError

        raise ModelDirError(f"the {engine} engine is not installed: pip install 'stfpm[{extra}]' (or pip install {module})")
    return importlib.import_module(module)


def _split(outputs: list, has_profile: bool) -> tuple[list, np.ndarray | None]:
    return (outputs[:-1], outputs[-1]) if has_profile else (outputs, None)


def open_onnx(model: str | Path | bytes, threads: int, has_profile: bool = True) -> LayerForward:
    """ONNX Runtime on `threads` CPU threads for an .onnx file or its bytes."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    # Idle threads sleep instead of spinning: measured on the shared 2-core machine, spinning
    # made a 256-px Lite0 batch-1 call 330 ms instead of 20-40 (bench/RESULTS.md, engines).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def forward(batch: np.ndarray) -> tuple[list, np.ndarray | None]:
        return _split(session.run(None, {input_name: np.ascontiguousarray(batch, dtype=np.float32)}), has_profile)

    return forward


def open_openvino(model: str | Path, threads: int, has_profile: bool = True) -> LayerForward:
    """OpenVINO on `threads` CPU threads for an IR (.xml beside its .bin) or an .onnx file, in
    float32."""
    ov = _require("openvino")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(model)), "CPU", {
        "INFERENCE_NUM_THREADS": int(threads), "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    outputs = list(compiled.outputs)

    def forward(batch: np.ndarray) -> tuple[list, np.ndarray | None]:
        result = request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        return _split([np.array(result[o]) for o in outputs], has_profile)

    return forward
