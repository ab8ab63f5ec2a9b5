"""Batch-1 latency and memory of loaded models, each measured in a fresh process.

    python bench/model_cost.py MODEL_DIR [MODEL_DIR ...] [--runs 30]

Per model directory: the model kind and bank size, the size of its files, the resident memory
the process gains by loading it and predicting one 256x256 image (Predictor.open + predict,
the CPU oneDNN engine), and the median wall time of `predict` on one image over --runs runs
(decode excluded: the image is already in memory). An STFPM-Lite0 model with random weights
(speed and memory do not depend on them) is measured alongside as the reference
(`--reference-out` keeps it).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
from stfpm.model.inference import Predictor
image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
before = rss_mb()
predictor = Predictor.open(sys.argv[1])
predictor.predict([image])
after = rss_mb()
times = []
for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    predictor.predict([image])
    times.append(time.perf_counter() - t0)
print(json.dumps({"rss_gain_mb": after - before, "latency_ms": 1000 * float(np.median(times))}))
"""


def reference_model(out: Path) -> Path:
    import paddle

    from stfpm.model.artifact import save_model
    from stfpm.model.card import Calibration, InputSpec, MapSpec, ModelCard
    from stfpm.nn import STFPM

    paddle.seed(0)
    save_model(STFPM("efficientnet_lite0"), out, ModelCard(
        model_name="STFPM", backbone="efficientnet_lite0", input=InputSpec.for_backbone("efficientnet_lite0", 256),
        calibration=Calibration(1.0, 0.0, 2.0), map=MapSpec(layer_norm="median")))
    return out


def measure(model_dir: Path, runs: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), str(runs)], capture_output=True, text=True,
                         check=True)
    meta = json.loads((model_dir / "model.json").read_text())
    files_mb = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2 ** 20
    return {"model": str(model_dir), "kind": meta.get("model_name", "STFPM"), "backbone": meta["backbone"],
            "bank_size": meta.get("patchcore", {}).get("bank_size"), "files_mb": round(files_mb, 1),
            **{k: round(v, 1) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--reference-out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        reference = reference_model(args.reference_out or Path(tmp) / "stfpm_lite0")
        print(f"{'kind':<10} {'backbone':<19} {'bank':>6} {'files MB':>9} {'RSS gain MB':>12} "
              f"{'batch-1 ms':>11}  model")
        for model_dir in [reference, *args.models]:
            r = measure(model_dir, args.runs)
            print(f"{r['kind']:<10} {r['backbone']:<19} {r['bank_size'] or '-':>6} {r['files_mb']:>9} "
                  f"{r['rss_gain_mb']:>12} {r['latency_ms']:>11}  {r['model']}", flush=True)


if __name__ == "__main__":
    main()
