"""Batch scoring speed and memory: the Ray Data pipeline vs an in-process loop, same work.

    python bench/score.py --n 1000 --scale 4

Both score the same synthetic PNGs (the project's woven-texture generator) with the same
random-weight model directory and the same stage functions: read + decode + resize,
the batched Predictor, map PNGs, Parquet table files. The loop runs them one batch after
another in one process; the pipeline is `stfpm.scoring.score` as a user runs it on one
machine: it starts its own local Ray (all CPUs), whose start and stop are reported apart and
not counted, and chooses its own layout (fused actors, one per CPU) unless --stages/--fused
and --actors say otherwise. Each (mode, N) runs in its own
process so peak RSS (ru_maxrss) is that run's: the driver's, and the scoring actor's
(reported by the actor itself). Prints images/s for both (median of --repeats runs, loop
and pipeline alternating), the median of the per-repeat pipeline/loop ratios, and peak memory
at N and scale * N images.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(work: Path, n_max: int, image_size: int, model_size: int) -> list[str]:
    """n_max synthetic texture PNGs and a random-weight model directory under `work`."""
    from stfpm.data import make_synthetic_dataset

    data = work / "data"
    if not data.is_dir():
        make_synthetic_dataset(data, n_train=n_max, n_test=0, size=image_size)
    model = work / "model"
    if not (model / "model.json").is_file():
        import paddle

        from stfpm.model.artifact import save_model
        from stfpm.model.card import Calibration, InputSpec, ModelCard
        from stfpm.nn import STFPM

        paddle.seed(0)
        save_model(STFPM("efficientnet_lite0"), model, ModelCard(
            model_name="STFPM", backbone="efficientnet_lite0",
            input=InputSpec.for_backbone("efficientnet_lite0", model_size), calibration=Calibration(1.5, 1.0, 2.0)))
    images = sorted(str(p) for p in (data / "train" / "good").glob("*.png"))
    if len(images) < n_max:
        raise SystemExit(f"{data} holds {len(images)} images, fewer than {n_max}; use another --work")
    return images


def manifest(work: Path, n: int) -> str:
    """A text manifest of the first n images: both runs of one N score the same files."""
    images = sorted(str(p) for p in (work / "data" / "train" / "good").glob("*.png"))[:n]
    path = work / f"first-{n}.txt"
    path.write_text("".join(f"{p}\n" for p in images))
    return str(path)


def run_loop(work: Path, n: int, batch_size: int) -> dict:
    """The same stages, batch after batch, in this process."""
    from stfpm.scoring.plan import plan_run
    from stfpm.scoring.sink import write_table_file
    from stfpm.scoring.stages import MAX_BYTES, ScoreActor, load_images, write_maps
    from stfpm.scoring.table import SCORES
    from stfpm.storage import join_uri

    out = tempfile.mkdtemp(dir=work, prefix=f"loop-{n}-")
    t0 = time.perf_counter()
    plan = plan_run(str(work / "model"), manifest(work, n), out)
    (ref,) = plan.models.values()  # one model directory
    models = {"": ref.uri}
    actor = ScoreActor(models, None, os.path.join(tempfile.gettempdir(), "stfpm-models"))
    for i in range(0, len(plan.pending), batch_size):
        batch = load_images(plan.pending.slice(i, batch_size), 100_000_000, MAX_BYTES)
        batch = write_maps(actor(batch), out)
        write_table_file(batch, join_uri(out, SCORES), plan.run_id, plan.schema)
    wall = time.perf_counter() - t0
    return {"mode": "loop", "n": n, "seconds": wall, "images_per_s": n / wall, "driver_peak_mb": peak_rss_mb()}


def run_pipeline(work: Path, n: int, batch_size: int, actors: str | None, cpus_per_actor: float,
                 threads_per_actor: int | None, fused: bool | None = None) -> dict:
    from stfpm.scoring import score

    out = tempfile.mkdtemp(dir=work, prefix=f"pipeline-{n}-")
    t0 = time.perf_counter()
    summary = score(str(work / "model"), manifest(work, n), out, batch_size=batch_size, actors=actors,
                    cpus_per_actor=cpus_per_actor, threads_per_actor=threads_per_actor, verbose=False,
                    fused=fused)
    timings = summary["timings_s"]
    ray_start = timings["ray_start_s"]
    wall = time.perf_counter() - t0 - ray_start - timings["ray_stop_s"]
    assert summary["counts"]["ok"] == n, summary["counts"]
    return {"mode": "pipeline", "n": n, "seconds": wall, "images_per_s": n / wall, "ray_start_s": ray_start,
            "driver_peak_mb": peak_rss_mb(), "actor_peak_mb": summary["actor_peak_rss_mb"],
            "stages": summary["stages"]}


def child(args) -> dict:
    work = Path(args.work)
    if args.mode == "loop":
        return run_loop(work, args.n, args.batch_size)
    return run_pipeline(work, args.n, args.batch_size, args.actors, args.cpus_per_actor,
                        args.threads_per_actor, args.layout)


def measure(cmd: list[str], env: dict, attempts: int = 2) -> dict:
    """Run one measurement process; on a shared machine a Ray start can fail (ports taken by
    another Ray starting at the same moment), so a failed run is shown and tried once more."""
    for attempt in range(1, attempts + 1):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  run failed (attempt {attempt}/{attempts}):\n" + "\n".join(proc.stderr.splitlines()[-15:]), flush=True)
    raise SystemExit(f"{' '.join(cmd)} failed {attempts} times")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="images in the small run (>= 1000 for the record)")
    parser.add_argument("--scale", type=int, default=4, help="the large run scores scale * n images")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--model-size", type=int, default=64, help="model input side")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", default=None, help="scoring actors: N or MIN..MAX (default: score's choice)")
    parser.add_argument("--cpus-per-actor", type=float, default=1)
    parser.add_argument("--threads-per-actor", type=int, default=None,
                        help="Paddle CPU threads per scoring actor (default: its CPUs)")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--fused", dest="layout", action="store_const", const=True, default=None,
                        help="stfpm score --fused: the actors also decode and write maps")
    layout.add_argument("--stages", dest="layout", action="store_const", const=False,
                        help="stfpm score --no-fused: decoding and maps in separate CPU tasks")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each (mode, N); the median is reported")
    parser.add_argument("--work", default=None, help="folder for images, model and outputs (default: a temp dir)")
    parser.add_argument("--mode", choices=["loop", "pipeline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # one measurement, in its own process
        print(json.dumps(child(args)))
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="stfpm-bench-score-"))
    t0 = time.perf_counter()
    prepare(work, args.n * args.scale, args.image_size, args.model_size)
    layout = {None: "score's choice", True: "fused", False: "separate stages"}[args.layout]
    print(f"{args.n * args.scale} images of {args.image_size}px, model input {args.model_size}, "
          f"batch {args.batch_size}, {os.cpu_count()} CPUs, actors {args.actors or 'default'} x {args.cpus_per_actor} "
          f"CPU ({args.threads_per_actor or 'default'} threads, {layout}); "
          f"prepared in {time.perf_counter() - t0:.0f}s ({work})", flush=True)
    runs = {}
    for n in (args.n, args.n * args.scale):
        for repeat in range(args.repeats):  # loop and pipeline alternate, so load drifts hit both
            for mode in ("loop", "pipeline"):
                cmd = [sys.executable, __file__, "--mode", mode, "--n", str(n), "--work", str(work),
                       "--batch-size", str(args.batch_size), "--cpus-per-actor", str(args.cpus_per_actor)]
                if args.actors:
                    cmd += ["--actors", args.actors]
                if args.threads_per_actor:
                    cmd += ["--threads-per-actor", str(args.threads_per_actor)]
                if args.layout is not None:
                    cmd += ["--fused" if args.layout else "--stages"]
                env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
                r = measure(cmd, env)
                runs.setdefault((mode, n), []).append(r)
                print(f"  {mode:<8} N={n:<6} run {repeat + 1}: {r['images_per_s']:7.1f} images/s ({r['seconds']:.1f}s)"
                      + (f", ray start {r['ray_start_s']:.1f}s" if mode == "pipeline" else ""), flush=True)
    # the median run of each (mode, N), and the median of the per-repeat ratios
    results = {k: sorted(v, key=lambda r: r["images_per_s"])[len(v) // 2] for k, v in runs.items()}
    ratios = {n: statistics.median(p["images_per_s"] / lo["images_per_s"]
                                   for lo, p in zip(runs["loop", n], runs["pipeline", n]))
              for n in (args.n, args.n * args.scale)}
    print("\nN        loop img/s  pipeline img/s  ratio  ray start s  loop peak MB  driver peak MB  actor peak MB")
    for n in (args.n, args.n * args.scale):
        loop, pipe = results["loop", n], results["pipeline", n]
        print(f"{n:<8} {loop['images_per_s']:>10.1f} {pipe['images_per_s']:>15.1f} "
              f"{ratios[n]:>6.2f} {pipe['ray_start_s']:>12.1f} "
              f"{loop['driver_peak_mb']:>13.0f} {pipe['driver_peak_mb']:>15.0f} {pipe['actor_peak_mb']:>14.0f}")
    small, large = results["pipeline", args.n], results["pipeline", args.n * args.scale]
    growth = {k: large[k] / small[k] - 1 for k in ("driver_peak_mb", "actor_peak_mb")}
    print(f"peak memory at {args.scale}x N vs N: driver {growth['driver_peak_mb']:+.1%}, "
          f"actor {growth['actor_peak_mb']:+.1%}")
    print("pipeline stages at the large N (busy seconds; images per busy second of one task/actor):")
    for stage, s in large["stages"].items():
        print(f"  {stage:<8} {s['busy_s']:>8.1f}s  {s['images_per_busy_s']}")


if __name__ == "__main__":
    main()
