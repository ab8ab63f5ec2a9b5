"""int8 post-training quantisation on CPU against float32, on trained models: accuracy on the
dev sets and speed, in one run.

    python bench/int8.py /tmp/s30/pc28 /tmp/s30/acc26 --threads 1,2

Each argument is a model directory, or a folder of them as `bench/accuracy.py --models` keeps
(`<dev set>-<kind>-s<seed>-<recipe>`); the dev set is read from the name (its test split in
../shared/data is what the model is evaluated on). Per model: the forward is converted to ONNX
in memory (as the CPU default engine does), quantised by `stfpm.model.export.quantize_onnx`
(ONNX Runtime's quantiser: QDQ, per-channel int8 weights, uint8 activations, the backbones
only) with ranges calibrated on --calib good training images (model.json's training data when
that folder still exists, else the dev set's train/good), and evaluated by the project's
`stfpm.evaluate.evaluate_model` on float32 ONNX Runtime, int8 ONNX Runtime and int8 OpenVINO
(which reads the same QDQ graph). Printed: image and pixel AUROC and their change against
float32, the rank correlation of the image scores, and the largest map difference relative to
the float32 map's maximum.

Speed (the first model of each kind, or every one with --speed-all): `Predictor.forward` (the
engine's forward plus the map work every engine shares) at batch --batch and batch 1 with the
threads a scoring actor uses, images/s (wall) and per CPU-second of the process (the steadier
figure on a shared machine), batch-1 latency and CPU-ms per call, ratios to float32 ONNX
Runtime; engines are timed in turns so a load change hits each alike (bench/engines.py's
`timed`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402

from accuracy import DEV_ROOT, DEV_SETS  # noqa: E402
from engines import timed  # noqa: E402
from stfpm.data import load_dataset  # noqa: E402
from stfpm.evaluate import evaluate_model  # noqa: E402
from stfpm.model.artifact import load_model  # noqa: E402
from stfpm.model.card import MODEL_JSON  # noqa: E402
from stfpm.model.engines import open_onnx, open_openvino  # noqa: E402
from stfpm.model.export import calibration_batches, network_onnx, quantize_onnx  # noqa: E402
from stfpm.model.inference import Predictor  # noqa: E402

VARIANTS = ("fp32 onnxruntime", "int8 onnxruntime", "int8 openvino")


def model_dirs(paths: list[str]) -> list[Path]:
    """The model directories named, or held by the folders named, each with a dev set in its name."""
    out = []
    for p in map(Path, paths):
        found = [p] if (p / MODEL_JSON).is_file() else sorted(d for d in p.iterdir() if (d / MODEL_JSON).is_file())
        out += [d for d in found if dev_set(d)]
    if not out:
        raise SystemExit(f"error: no model directory named after a dev set ({', '.join(DEV_SETS)}) in {paths}")
    return out


def dev_set(model_dir: Path) -> str | None:
    return next((name for name in DEV_SETS if model_dir.name.startswith(name)), None)


def calibration_data(model, data: Path) -> Path:
    """The model's recorded training data when that folder still exists, else the dev set."""
    recorded = (model.card.training or {}).get("data")
    return Path(recorded) if recorded and Path(recorded).is_dir() else data


def open_variant(variant: str, graph: bytes, threads: int, tmp: Path):
    if variant.endswith("onnxruntime"):
        return open_onnx(graph, threads)
    path = tmp / f"{variant.split()[0]}.onnx"  # OpenVINO reads the graph from a file
    path.write_bytes(graph)
    return open_openvino(path, threads)


def accuracy(model, data: Path, graphs: dict, threads: int, tmp: Path) -> dict:
    """Per variant: the project's evaluation on `data`'s test split, and its agreement with float32."""
    dataset = load_dataset(data)
    out, reference = {}, None
    for variant in VARIANTS:
        forward = open_variant(variant, graphs[variant.split()[0]], threads, tmp)
        predictor = Predictor(model.card, forward, engine=variant.split()[1])
        t0 = time.perf_counter()
        result = evaluate_model(model, dataset, predictor=predictor)
        scores = np.array([r["score"] for r in result["images"]])
        maps = predictor.forward(np.concatenate(calibration_batches(model.card, calibration_data(model, data), 4, 1)))[0]
        if reference is None:
            reference = scores, maps
        ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
        out[variant] = {"image_auroc": result["metrics"]["image_auroc"], "pixel_auroc": result["metrics"]["pixel_auroc"],
                        "score_rank_corr": float(np.corrcoef(ranks(scores), ranks(reference[0]))[0, 1]),
                        "map_diff_rel": float(np.abs(maps - reference[1]).max() / np.abs(reference[1]).max()),
                        "eval_s": round(time.perf_counter() - t0, 1)}
    return out


def speed(model, graphs: dict, threads_list: list[int], batch_size: int, rounds: int, repeats: int, tmp: Path) -> list:
    size = model.card.input.size
    batch = np.random.default_rng(0).standard_normal((batch_size, 3, size, size)).astype(np.float32)
    rows = []
    for threads in threads_list:
        predictors = {v: Predictor(model.card, open_variant(v, graphs[v.split()[0]], threads, tmp)) for v in VARIANTS}
        big, one = {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}
        for _ in range(rounds):
            for v, p in predictors.items():
                big[v].append(timed(lambda p=p: p.forward(batch), repeats))
                one[v].append(timed(lambda p=p: p.forward(batch[:1]), 5 * repeats))
        med = lambda runs, i: statistics.median(r[i] for r in runs)  # noqa: E731
        for v in VARIANTS:
            rows.append({"threads": threads, "variant": v, "batch": batch_size,
                         "img_s": batch_size / med(big[v], 0), "img_cpu_s": batch_size / med(big[v], 1),
                         "b1_ms": 1000 * med(one[v], 0), "b1_cpu_ms": 1000 * med(one[v], 1)})
    return rows


def delta(metrics: dict, base: dict, key: str) -> str:
    return "-" if metrics[key] is None else f"{metrics[key]:.4f} ({metrics[key] - base[key]:+.4f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="model directories, or folders of them (bench/accuracy.py --models)")
    ap.add_argument("--threads", default="1,2", help="CPU threads of the timed engines (a scoring actor's CPUs)")
    ap.add_argument("--eval-threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--calib", type=int, default=64, help="good training images the int8 ranges are calibrated on")
    ap.add_argument("--method", default="percentile", choices=("minmax", "percentile", "entropy"))
    ap.add_argument("--rounds", type=int, default=2, help="turns of all variants; each turn times every variant")
    ap.add_argument("--repeats", type=int, default=2, help="batch calls per turn (batch 1: 5x as many)")
    ap.add_argument("--speed-all", action="store_true", help="time every model, not the first of each kind")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    threads_list = [int(t) for t in args.threads.split(",")]
    record, timed_kinds = [], set()
    print(f"int8: ONNX Runtime QDQ, per-channel, calibrated ({args.method}) on {args.calib} good training images",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        for model_dir in model_dirs(args.models):
            data = DEV_ROOT / dev_set(model_dir)
            model = load_model(model_dir)
            kind = model.card.model_name
            fp32 = network_onnx(model.network, model.card.input.size)
            t0 = time.perf_counter()
            int8 = quantize_onnx(fp32, calibration_batches(model.card, calibration_data(model, data), args.calib), args.method)
            quant_s = time.perf_counter() - t0
            graphs = {"fp32": fp32, "int8": int8}
            entry = {"model": str(model_dir), "kind": kind, "dev_set": data.name, "quantise_s": round(quant_s, 1),
                     "onnx_mb": {k: round(len(g) / 2**20, 2) for k, g in graphs.items()}}
            if not args.no_accuracy:
                entry["accuracy"] = accuracy(model, data, graphs, args.eval_threads, Path(tmp))
                base = entry["accuracy"][VARIANTS[0]]
                for v, m in entry["accuracy"].items():
                    print(f"{kind:<9} {data.name:<18} {v:<17} image {delta(m, base, 'image_auroc'):<17} pixel "
                          f"{delta(m, base, 'pixel_auroc'):<17} score ranks r={m['score_rank_corr']:.4f} "
                          f"map diff {m['map_diff_rel']:.3f} of max | eval {m['eval_s']:.0f} s", flush=True)
            if not args.no_speed and (args.speed_all or kind not in timed_kinds):
                timed_kinds.add(kind)
                entry["speed"] = speed(model, graphs, threads_list, args.batch, args.rounds, args.repeats, Path(tmp))
                for r in entry["speed"]:
                    base = next(b for b in entry["speed"] if b["threads"] == r["threads"] and b["variant"] == VARIANTS[0])
                    print(f"{kind:<9} {data.name:<18} {r['threads']} thr {r['variant']:<17} batch {r['batch']}: "
                          f"{r['img_s']:6.1f} img/s ({r['img_s'] / base['img_s']:4.2f}x), {r['img_cpu_s']:6.1f} "
                          f"img/cpu-s ({r['img_cpu_s'] / base['img_cpu_s']:4.2f}x) | batch 1: {r['b1_ms']:6.1f} ms "
                          f"({base['b1_ms'] / r['b1_ms']:4.2f}x), {r['b1_cpu_ms']:6.1f} cpu-ms "
                          f"({base['b1_cpu_ms'] / r['b1_cpu_ms']:4.2f}x)", flush=True)
            print(f"{kind:<9} {data.name:<18} quantised in {quant_s:.0f} s; ONNX {entry['onnx_mb']} MB", flush=True)
            record.append(entry)
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
