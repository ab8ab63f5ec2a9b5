"""What the driver costs per input: plan, feed, end of run, read_scores, audit summary at 100k..10M.

    python bench/driver_scale.py --sizes 100000,1000000,5000000 --code before=/work/main --code after=.

Synthetic data only (no image is read): a Parquet manifest of N s3:// URIs that carries
input_version (so no HEAD is needed), score tables written as the scorer writes them, a
random-weight model directory. Each (code, N, step) runs in its own process with
PYTHONPATH=<code>, so its peak RSS (ru_maxrss, the whole process, imports included) is that
step's; the CPU seconds are the step's own (user + system, imports and data set-up not
counted). Steps:

    plan       plan_run: manifest of N URIs against a table of N rows, half of them done
    feed       from a plan of N pending inputs to the first batch out of a scoring actor
               (local Ray, 1 fused actor; Ray's start not counted); blocks/objects the driver made
    end        end of a run that wrote 100k rows into a table of N older rows (nothing superseded):
               compaction, the table's counts, _SUCCESS
    read       read_scores(OUTPUT) (the latest view) of a table of N rows
    audit      the audit's summarize + write_retries on a run of N rows (8 categories)

Prints one line per step and N: CPU s, peak RSS MB, bytes per input above the process's
RSS after its imports, and the growth of CPU and RSS from the smallest to the largest N.
--code NAME=PATH may be given several times (default: this checkout as "this").
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
RUN_ROWS = 100_000          # rows the "end" step's run added
ROWS_PER_FILE = 4096        # the scorer's table files
CATEGORIES = 8
STEPS = ("plan", "feed", "end", "read", "audit")


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def uri(i: int) -> str:
    return f"s3://bench-images/cam{i % CATEGORIES}/day{i // 250_000:03d}/img-{i:09d}.png"


# ------------------------------------------------------------------------------ data

def make_model(path: Path) -> None:
    if (path / "model.json").is_file():
        return
    import paddle

    from stfpm.model.artifact import save_model
    from stfpm.model.card import Calibration, InputSpec, ModelCard
    from stfpm.nn import STFPM

    paddle.seed(0)
    save_model(STFPM("efficientnet_lite0"), path, ModelCard(
        model_name="STFPM", backbone="efficientnet_lite0",
        input=InputSpec.for_backbone("efficientnet_lite0", 64), calibration=Calibration(1.5, 1.0, 2.0)))


def table_rows(start: int, n: int, version: str, threshold: float, run_id: str, category: bool = False):
    """n rows of the score table (2% errors, half of them transient), as the scorer writes them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from stfpm.scoring.table import table_schema

    rng = np.random.default_rng(start)
    idx = np.arange(start, start + n)
    uris = pa.array([uri(int(i)) for i in idx], pa.string())
    ids = pa.array([hashlib.sha256(uri(int(i)).encode()).hexdigest()[:32] for i in idx], pa.string())
    score = rng.random(n)
    error = rng.random(n) < 0.02
    status = pa.array(np.where(error, "error", "ok"))
    kind = pa.array(np.where(error, np.where(rng.random(n) < 0.5, "input", "transient"), None), pa.string())
    cols = {"image_id": ids, "image_uri": uris, "input_version": pa.array([f"{1000 + i % 997}-1764806400000000000"
                                                                           for i in idx]),
            "model_name": pa.array(["model"] * n), "model_version": pa.array([version] * n),
            "raw_score": pa.array(np.where(error, np.nan, score * 3)), "score": pa.array(score),
            "is_anomaly": pa.array(score >= 0.5), "threshold": pa.array([threshold] * n),
            "ood": pa.array([False] * n), "ood_score": pa.array(rng.random(n) * 0.5),
            "width": pa.array([900] * n, pa.int32()), "height": pa.array([900] * n, pa.int32()),
            "map_uri": pc.binary_join_element_wise(f"s3://bench-out/maps/{version}/", ids, ".png", ""),
            "overlay_uri": pa.nulls(n, pa.string()), "status": status,
            "error": pa.array(np.where(error, "decode: not an image", None), pa.string()), "error_kind": kind,
            "device": pa.array(["gpu:0"] * n), "run_id": pa.array([run_id] * n),
            "scored_at": pa.array(np.full(n, 1764806400_000000 + start, "datetime64[us]")).cast(
                pa.timestamp("us", tz="UTC"))}
    partitions = ["category"] if category else []
    if category:
        cols["category"] = pa.array([f"c{i % CATEGORIES}" for i in idx])
    schema = table_schema(partitions)
    return pa.table([cols[f.name].cast(f.type) for f in schema], schema=schema)


def write_table(folder: Path, start: int, n: int, version: str, threshold: float, run_id: str,
                category: bool = False) -> None:
    """A table of n rows the way this code version lays its files out: in bucket folders
    (sink.by_bucket) if it has them, else flat; files of ROWS_PER_FILE rows."""
    import pyarrow.parquet as pq

    from stfpm.scoring import sink

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(start, start + n, 250_000):
        rows = table_rows(s, min(250_000, start + n - s), version, threshold, run_id, category)
        if hasattr(sink, "by_bucket"):
            from stfpm.scoring.table import bucket_folder

            parts = [(folder / bucket_folder(b), b_rows) for b, b_rows in sink.by_bucket(rows)]
        else:  # the code before issue 23's buckets
            parts = [(folder, rows)]
        for where, part in parts:
            where.mkdir(parents=True, exist_ok=True)
            for i in range(0, len(part), ROWS_PER_FILE):
                pq.write_table(part.slice(i, ROWS_PER_FILE), where / f"part-{s + i:012d}.parquet", compression="zstd")


def prepare(work: Path, n: int) -> None:
    """Every step's data for N under work/<n> (idempotent)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stfpm.scoring.sources import resolve_models

    make_model(work / "model")
    (ref,) = resolve_models(str(work / "model")).values()
    d = work / str(n)
    if (d / "done").exists():
        return
    d.mkdir(parents=True, exist_ok=True)
    # plan: a manifest of N URIs; the table holds the first half (done) and N/2 others (history)
    idx = range(n)
    versions = [f"{1000 + i % 997}-1764806400000000000" for i in idx]
    pq.write_table(pa.table({"image_uri": [uri(i) for i in idx], "input_version": versions}), d / "manifest.parquet")
    write_table(d / "plan" / "scores", 0, n // 2, ref.version, ref.threshold, "r-old")
    write_table(d / "plan" / "scores", n, n - n // 2, ref.version, ref.threshold, "r-older")
    (d / "plan" / "_SUCCESS").write_text("{}")  # the last run finished
    # feed: N local paths that do not exist (each row fails fast in the actor: the driver is measured)
    pq.write_table(pa.table({"image_uri": [f"/nonexistent/bench/{i:09d}.png" for i in idx],
                             "input_version": versions}), d / "feed.parquet")
    # end / read: a table of N older rows and a run of RUN_ROWS new ones
    write_table(d / "table" / "scores", 0, n, ref.version, ref.threshold, "r-old")
    success = {"models": {"model": {"model_version": ref.version, "threshold": ref.threshold}}}
    (d / "table" / "_SUCCESS").write_text(json.dumps(success))
    # audit: a run of N rows, 8 categories, and its inputs
    write_table(d / "audit" / "run" / "scores", 0, n, ref.version, ref.threshold, "r-audit", category=True)
    pq.write_table(pa.table({"image_uri": [uri(i) for i in idx], "input_version": versions,
                             "category": [f"c{i % CATEGORIES}" for i in idx]}), d / "audit" / "inputs.parquet")
    (d / "done").touch()


# ------------------------------------------------------------------------------ steps

def step(name: str, work: Path, n: int) -> dict:
    import shutil

    d = work / str(n)
    model = str(work / "model")
    extra: dict = {}
    if name == "plan":
        from stfpm.scoring.plan import plan_run

        base, c0 = current_rss_mb(), cpu_s()
        plan = plan_run(model, str(d / "manifest.parquet"), str(d / "plan"))
        extra = {"pending": len(plan.pending), "skipped": plan.n_skipped}
        assert 0.45 * n < plan.n_skipped <= n // 2, extra  # the older rows hold 1% transient errors
    elif name == "feed":
        import ray

        from stfpm.scoring import run as scoring_run
        from stfpm.scoring.plan import plan_run

        out = d / "feed-out"
        shutil.rmtree(out, ignore_errors=True)
        plan = plan_run(model, str(d / "feed.parquet"), str(out))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            base, c0 = current_rss_mb(), cpu_s()
            t0 = time.perf_counter()
            ds, _ = scoring_run.build_pipeline(plan, batch_size=32, actors=(1, 1), fused=True)
            c_built = cpu_s() - c0
            first = next(iter(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
            extra = {"first_batch_rows": len(first), "build_cpu_s": round(c_built, 2),
                     "wall_s": round(time.perf_counter() - t0, 1)}
        finally:
            ray.shutdown()
    elif name == "end":
        from stfpm.scoring import run as scoring_run
        from stfpm.scoring.plan import Plan
        from stfpm.scoring.sources import resolve_models

        out = d / f"end-{os.getpid()}"
        shutil.copytree(d / "table", out)
        models = resolve_models(model)
        (ref,) = models.values()
        write_table(out / "scores", 10 * n, RUN_ROWS, ref.version, ref.threshold, "r-this")
        plan = Plan(output=str(out), run_id="r-this", models=models, partitions=[], pending=None,
                    n_listed=RUN_ROWS, n_skipped=0)
        totals = scoring_run.merge_stats([])
        base, c0 = current_rss_mb(), cpu_s()
        if hasattr(scoring_run, "finish_run"):
            written = [str(p) for p in sorted((out / "scores").rglob("part-*.parquet"))
                       if int(p.stem.split("-")[-1]) >= 10 * n]  # the files of this run's rows
            summary = scoring_run.finish_run(plan, totals, None, time.perf_counter(), written)
        else:  # the code before issue 23
            removed = scoring_run.remove_superseded(str(out / "scores"))
            index = scoring_run.read_index(str(out / "scores"))
            summary = scoring_run._summary(plan, totals, removed, index, None)
            scoring_run.write_bytes(str(out / "_SUCCESS"), json.dumps(summary).encode())
        c = summary["counts"]
        extra = {"table_rows": c["table_rows"], "latest_rows": c["latest_rows"]}
        assert c["table_rows"] == n + RUN_ROWS and c["superseded_rows_removed"] == 0, c
        measured = cpu_s() - c0
        shutil.rmtree(out)
        return {"cpu_s": round(measured, 2), "peak_rss_mb": round(rss_mb()), "base_rss_mb": round(base), **extra}
    elif name == "read":
        from stfpm.scoring import read_scores

        base, c0 = current_rss_mb(), cpu_s()
        df = read_scores(str(d / "table"))
        extra = {"rows": len(df)}
        assert len(df) == n
    elif name == "audit":
        import pyarrow.parquet as pq

        from stfpm.audit.config import AuditConfig
        from stfpm.audit.run import read_run_table, write_retries
        from stfpm.audit.summary import summarize
        from stfpm.audit.config import utc_now

        cfg = AuditConfig(output=str(d / "audit"), models=model, source=str(d), partitions=["category"])
        inputs = pq.read_table(d / "audit" / "inputs.parquet")
        base, c0 = current_rss_mb(), cpu_s()
        table = read_run_table(str(d / "audit" / "run"))
        summary = summarize(table, inputs, cfg, run_id="r-audit", since=None, until=utc_now(), attempts=1,
                            scoring=None)
        write_retries(str(d / "audit" / "run"), inputs, table)
        extra = {"scored": summary["totals"]["scored"], "categories": len(summary["categories"])}
        assert summary["totals"]["scored"] == n
    return {"cpu_s": round(cpu_s() - c0, 2), "peak_rss_mb": round(rss_mb()), "base_rss_mb": round(base), **extra}


# ------------------------------------------------------------------------------ driver

def run_child(code: str, args: list[str], timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": code, "RAY_DEDUP_LOGS": "0"}
    try:
        proc = subprocess.run([sys.executable, str(HERE), *args], capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--code", action="append", default=None, help="NAME=PATH of a checkout (repeatable)")
    parser.add_argument("--work", default="/tmp/driver_scale")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one step may take")
    parser.add_argument("--skip", action="append", default=[], help="CODE:STEP:N not to run (too big)")
    parser.add_argument("--child", nargs=3, metavar=("WHAT", "STEP", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    if args.child:
        what, name, n = args.child
        if what == "prepare":
            prepare(work / name, int(n))
            print(json.dumps({}))
        else:
            print(json.dumps(step(name, work / what, int(n))))
        return
    codes = [c.split("=", 1) for c in (args.code or [f"this={HERE.parents[1]}"])]
    sizes = [int(s) for s in args.sizes.split(",")]
    steps = args.steps.split(",")
    results: dict = {}
    print(f"{'code':<8}{'step':<7}{'N':>10}{'CPU s':>9}{'peak MB':>9}{'B/input':>9}  notes", flush=True)
    for label, code in codes:
        code = str(Path(code).resolve())
        for n in sizes:
            t0 = time.perf_counter()
            done = run_child(code, ["--work", str(work), "--child", "prepare", label, str(n)], args.timeout)
            if "error" in done:
                print(f"{label:<8}prepare {n}: {done['error']}", flush=True)
                continue
            print(f"  ({label} data for {n:,} ready in {time.perf_counter() - t0:.0f} s)", flush=True)
            for name in steps:
                if f"{label}:{name}:{n}" in args.skip:
                    continue
                r = run_child(code, ["--work", str(work), "--child", label, name, str(n)], args.timeout)
                results[(label, name, n)] = r
                if "error" in r:
                    print(f"{label:<8}{name:<7}{n:>10}  failed: {r['error']}", flush=True)
                    continue
                per = (r["peak_rss_mb"] - r["base_rss_mb"]) * 2**20 / n
                notes = {k: v for k, v in r.items() if k not in ("cpu_s", "peak_rss_mb", "base_rss_mb")}
                print(f"{label:<8}{name:<7}{n:>10}{r['cpu_s']:>9.2f}{r['peak_rss_mb']:>9}{per:>9.0f}  {notes}",
                      flush=True)
    for label, _ in codes:
        for name in steps:
            ok = [(n, results[(label, name, n)]) for n in sizes if "error" not in results.get((label, name, n),
                                                                                               {"error": 1})]
            if len(ok) >= 2:
                (n0, a), (n1, b) = ok[0], ok[-1]
                grown = lambda r: r["peak_rss_mb"] - r["base_rss_mb"]  # noqa: E731
                print(f"growth {label} {name} {n0:,} -> {n1:,} ({n1 / n0:g}x inputs): "
                      f"CPU x{b['cpu_s'] / max(a['cpu_s'], 0.01):.1f}, RSS above imports x{grown(b) / max(grown(a), 1):.1f}")


if __name__ == "__main__":
    main()
