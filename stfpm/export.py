"""Export to a Paddle static inference model and run it through Paddle Inference.

The export holds `inference.json` + `inference.pdiparams` (paddle.jit.save, input
(N, 3, S, S) normalised RGB -> output (N, S, S) anomaly maps), a PaddleX-style
`inference.yml`, and our `model.json` so threshold and normalisation travel with it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import paddle
import yaml

from stfpm.artifact import MODEL_JSON, ModelDirError, load_model, sha256_file
from stfpm.runtime import cpu_threads

PROGRAM, PARAMS, INFERENCE_YML = "inference.json", "inference.pdiparams", "inference.yml"


class _MapNetwork(paddle.nn.Layer):
    """What the exported graph computes: input batch -> anomaly maps at the input size."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, image):
        return self.network.score_maps(image)


def export_model(model_dir: str | Path, out_dir: str | Path) -> Path:
    model = load_model(model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = model.image_size
    layer = _MapNetwork(model.network)
    layer.eval()
    spec = paddle.static.InputSpec([None, 3, size, size], "float32", "image")
    paddle.jit.save(layer, str(out / "inference"), input_spec=[spec])
    meta = dict(model.meta)
    meta["export"] = {"format": "paddle_inference", "program": PROGRAM, "params": PARAMS,
                      "sha256": {f: sha256_file(out / f) for f in (PROGRAM, PARAMS)},
                      "source_model_dir": str(model_dir)}
    (out / MODEL_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True))
    inp, thr = meta["input"], meta["threshold"]
    (out / INFERENCE_YML).write_text(yaml.safe_dump({
        "Global": {"model_name": "STFPM", "backbone": meta["backbone"], "model_version": meta["model_version"]},
        "PreProcess": {"transform_ops": [
            {"ReadImage": {"format": "RGB"}},
            {"Resize": {"target_size": [size, size]}},
            {"Normalize": {"mean": inp["mean"], "std": inp["std"], "scale": 1.0 / 255}},
            {"ToCHWImage": None}]},
        "PostProcess": {"AnomalyMap": {"score": "max", "threshold": thr["value"],
                                       "score_min": thr["score_min"], "score_max": thr["score_max"]}},
    }, sort_keys=False))
    return out


def is_exported(model_dir: str | Path) -> bool:
    d = Path(model_dir)
    return (d / INFERENCE_YML).is_file() and (d / PARAMS).is_file()


def load_exported(model_dir: str | Path):
    """(meta, forward) for an exported model; forward runs Paddle Inference."""
    from paddle import inference

    d = Path(model_dir)
    meta_path = d / MODEL_JSON
    if not meta_path.is_file():
        raise ModelDirError(f"exported model {d} has no {MODEL_JSON}; re-export it with `stfpm export`")
    meta = json.loads(meta_path.read_text())
    for name, digest in meta["export"]["sha256"].items():
        if sha256_file(d / name) != digest:
            raise ModelDirError(f"{d / name} does not match the sha256 in {meta_path}")
    config = inference.Config(str(d / PROGRAM), str(d / PARAMS))
    config.disable_gpu()
    # oneDNN cannot run the bilinear-interpolate attributes of this graph in Paddle 3.3.
    config.disable_mkldnn()
    config.set_cpu_math_library_num_threads(cpu_threads())
    config.disable_glog_info()
    predictor = inference.create_predictor(config)
    input_handle = predictor.get_input_handle(predictor.get_input_names()[0])
    output_handle = predictor.get_output_handle(predictor.get_output_names()[0])

    def forward(batch: np.ndarray) -> np.ndarray:
        input_handle.reshape(list(batch.shape))
        input_handle.copy_from_cpu(np.ascontiguousarray(batch, dtype=np.float32))
        predictor.run()
        return output_handle.copy_to_cpu()

    return meta, forward
