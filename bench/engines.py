"""CPU engines of the forward side by side, in one run: Paddle Inference with oneDNN (the
Predictor's engine until now), ONNX Runtime and OpenVINO (the network converted to ONNX in
memory at load, `Predictor.from_model(engine=...)`), on both models at 256 px.

    python bench/engines.py --threads 1,2

For each model, thread count (a scoring actor's: the CPUs Ray gives it) and engine it prints:
load time (program save + compile, or save + ONNX conversion + session), images/s of
`Predictor.forward` at batch 32 (the forward plus the map work every engine shares: upsampling,
PatchCore's smoothing), batch-1 latency (median), each also per CPU-second of the process (the
steadier figure when other work shares the cores), the ratio to oneDNN in the same run, and the
largest map difference to oneDNN (exactness). Random weights (speed does not depend on their
values), so it runs offline: a Lite0 STFPM, and a Lite0 PatchCore with a bank of --bank
patches (a 10% coreset of ~160 training images at 256 px is ~16k). Engines are timed in
turns (oneDNN, ORT, OpenVINO, oneDNN, ...) so a load change on a shared machine hits each alike.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from stfpm.model.artifact import LoadedModel  # noqa: E402
from stfpm.model.card import Calibration, InputSpec, MapSpec, ModelCard  # noqa: E402
from stfpm.model.inference import Predictor  # noqa: E402
from stfpm.nn import STFPM  # noqa: E402
from stfpm.nn.maps import SMOOTH_SIGMA  # noqa: E402
from stfpm.nn.patchcore import PatchCore  # noqa: E402

ENGINES = ("onednn", "onnxruntime", "openvino")


def stfpm_model(backbone: str, size: int) -> LoadedModel:
    paddle.seed(0)
    card = ModelCard(model_name="STFPM", backbone=backbone, input=InputSpec.for_backbone(backbone, size),
                     calibration=Calibration(0.5, 0.0, 1.0))
    return LoadedModel(network=STFPM(backbone), card=card, path="")


def patchcore_model(backbone: str, size: int, bank: int) -> LoadedModel:
    paddle.seed(0)
    network = PatchCore(backbone)
    network.set_bank(np.random.default_rng(0).standard_normal((bank, network.feature_dim)).astype(np.float32))
    patches = (size // 8) ** 2
    card = ModelCard(model_name="PatchCore", backbone=backbone, input=InputSpec.for_backbone(backbone, size),
                     calibration=Calibration(0.5, 0.0, 1.0), map=MapSpec(smooth_sigma=SMOOTH_SIGMA),
                     patchcore={"taps": list(network.taps), "feature_dim": network.feature_dim, "bank_size": bank,
                                "patches_per_image": patches})
    return LoadedModel(network=network, card=card, path="")


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds (all threads of this process) of `repeats`
    calls after one warm-up. On a shared machine the CPU time is the steadier measure of
    throughput (what a node full of actors gets), the wall time that of latency."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", default="1,2", help="CPU threads per engine (a scoring actor's CPUs)")
    ap.add_argument("--models", default="stfpm,patchcore")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--bank", type=int, default=16384, help="PatchCore memory-bank patches")
    ap.add_argument("--rounds", type=int, default=3, help="turns of all engines; each turn times every engine")
    ap.add_argument("--repeats", type=int, default=3, help="batch calls per turn (batch 1: 5x as many)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    print(f"paddle {paddle.__version__}; {args.size} px, batch {args.batch} and 1, {args.rounds} turns; "
          f"load = save + compile (oneDNN) or save + ONNX conversion + session")
    for name in args.models.split(","):
        model = stfpm_model(args.backbone, args.size) if name == "stfpm" else patchcore_model(
            args.backbone, args.size, args.bank)
        label = f"{name} {args.backbone}" + (f" bank {args.bank}" if name == "patchcore" else "")
        for threads in (int(t) for t in args.threads.split(",")):
            predictors, loads = {}, {}
            for engine in ENGINES:
                t0 = time.perf_counter()
                predictors[engine] = Predictor.from_model(model, engine=engine, threads=threads)
                loads[engine] = time.perf_counter() - t0
            reference = predictors["onednn"].forward(batch[:4])[0]
            diffs = {e: float(np.abs(p.forward(batch[:4])[0] - reference).max()) for e, p in predictors.items()}
            big = {e: [] for e in ENGINES}
            one = {e: [] for e in ENGINES}
            for _ in range(args.rounds):
                for engine, p in predictors.items():
                    big[engine].append(timed(lambda p=p: p.forward(batch), args.repeats))
                    one[engine].append(timed(lambda p=p: p.forward(batch[:1]), 5 * args.repeats))
            def med(runs, i):
                return statistics.median(r[i] for r in runs)

            base = {k: (med(big["onednn"], k), med(one["onednn"], k)) for k in (0, 1)}
            for engine in ENGINES:
                (b, o), (bc, oc) = ((med(big[engine], k), med(one[engine], k)) for k in (0, 1))
                print(f"{label:<34} {threads} thr {engine:<11} load {loads[engine]:5.1f} s | batch {args.batch}: "
                      f"{args.batch / b:6.1f} img/s ({base[0][0] / b:4.2f}x), {args.batch / bc:6.1f} img/cpu-s "
                      f"({base[1][0] / bc:4.2f}x) | batch 1: {1000 * o:6.1f} ms ({base[0][1] / o:4.2f}x), "
                      f"{1000 * oc:6.1f} cpu-ms ({base[1][1] / oc:4.2f}x) | map diff {diffs[engine]:.1e} "
                      f"(max {float(reference.max()):.3g})", flush=True)


if __name__ == "__main__":
    main()
