"""Skip-what-is-done at 1M-5M inputs: the driver's Arrow anti-join vs Ray Data's Dataset.join.

    python bench/plan_join.py --sizes 1000000,5000000 --work /tmp/plan_join

The plan's "leave out what OUTPUT already settles" step (stfpm.scoring.plan: `settled` +
`_not_settled`), two ways, each (N, method) in its own process so peak RSS is its own:

    arrow   the driver reads the settled keys of the table (pyarrow.dataset, three columns)
            and runs pyarrow's hash anti-join (plan._not_settled), then writes the pending
            keys as Parquet (as the run's _pending/ files)
    ray     a local Ray (2 CPUs, started before the clock) reads the table with
            read_parquet, takes the listing from the driver (from_arrow: the listing is made
            on the driver), `Dataset.join(join_type="left_anti")` on the three keys, and
            write_parquet of the pending keys

Synthetic: N inputs (s3 URIs, input_version, one model_version) held by the driver as the
listing is; a table of N rows in files of 65,536 rows, half of which settle their input (the
other half are an older version of the file). Prints, per N and method: wall s, the driver's
CPU s (all its threads), its peak RSS (ru_maxrss, imports included) and the pending count
(which must be N/2 both ways).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
FILE_ROWS = 65_536
KEYS = ["image_uri", "input_version", "model_version"]


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def listing(n: int):
    """The driver's listing: N inputs, as list_inputs gives them (keys only)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    i = pa.array(np.arange(n), pa.int64())
    uris = pc.binary_join_element_wise("s3://bench-images/cam", pc.cast(pc.bit_wise_and(i, 7), pa.string()),
                                       "/img-", pc.utf8_lpad(pc.cast(i, pa.string()), 9, "0"), ".png", "")
    versions = pc.binary_join_element_wise("2048-", pc.cast(pc.add(i, 1_700_000_000_000_000_000), pa.string()), "")
    return pa.table({"image_uri": uris, "input_version": versions,
                     "model_version": pa.array(["m" * 16] * n, pa.string())})


def prepare(work: Path, n: int) -> Path:
    """A table of N rows: the even inputs at their current version (settled), the odd ones at an older one."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    folder = work / f"table-{n}"
    if (folder / "_done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    table = listing(n)
    odd = pa.array(np.arange(n) % 2 == 1)
    table = table.set_column(1, "input_version", pc.if_else(odd, "1-1", table["input_version"]))
    table = table.append_column("status", pa.array(["ok"] * n))
    for k, start in enumerate(range(0, n, FILE_ROWS)):
        pq.write_table(table.slice(start, FILE_ROWS), folder / f"part-{k:05d}.parquet")
    (folder / "_done").touch()
    return folder


def run_arrow(table_dir: Path, n: int, out: Path) -> int:
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from stfpm.scoring.plan import _not_settled

    inputs = listing(n)
    t0, c0 = time.perf_counter(), cpu_s()
    done = pads.dataset(table_dir, format="parquet").to_table(columns=KEYS, filter=pads.field("status") == "ok")
    pending = _not_settled(inputs, done)
    out.mkdir(parents=True, exist_ok=True)
    for k, start in enumerate(range(0, len(pending), max(1, len(pending) // 4 + 1))):
        pq.write_table(pending.slice(start, len(pending) // 4 + 1), out / f"pending-{k}.parquet")
    return len(pending), time.perf_counter() - t0, cpu_s() - c0


def run_ray(table_dir: Path, n: int, out: Path, partitions: int) -> int:
    import pyarrow.dataset as pads
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    inputs = listing(n)
    try:
        t0, c0 = time.perf_counter(), cpu_s()
        left = ray.data.from_arrow(inputs)
        right = ray.data.read_parquet(str(table_dir), columns=KEYS + ["status"]).filter(expr="status == 'ok'")
        right = right.select_columns(KEYS)
        pending = left.join(right, join_type="left_anti", num_partitions=partitions, on=tuple(KEYS))
        pending.write_parquet(str(out))
        return pads.dataset(out, format="parquet").count_rows(), time.perf_counter() - t0, cpu_s() - c0
    finally:
        ray.shutdown()


def child(args) -> None:
    work = Path(args.work)
    table_dir = prepare(work, args.n)
    if args.method == "prepare":
        return
    out = work / f"pending-{args.method}-{args.n}-{time.time_ns()}"
    base_rss = rss_mb()
    if args.method == "arrow":
        found, wall, cpu = run_arrow(table_dir, args.n, out)
    else:
        found, wall, cpu = run_ray(table_dir, args.n, out, args.partitions)
    print(json.dumps({"n": args.n, "method": args.method, "pending": found, "wall_s": round(wall, 2),
                      "driver_cpu_s": round(cpu, 2), "peak_rss_mb": round(rss_mb()), "rss_before_mb": round(base_rss)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,5000000")
    parser.add_argument("--methods", default="arrow,ray")
    parser.add_argument("--work", default="/tmp/plan_join")
    parser.add_argument("--partitions", type=int, default=16, help="num_partitions of the Ray Data join")
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        return child(args)
    for n in (int(s) for s in args.sizes.split(",")):
        subprocess.run([sys.executable, str(HERE), "--n", str(n), "--method", "prepare", "--work", args.work],
                       check=True)
        for method in args.methods.split(","):
            cmd = [sys.executable, str(HERE), "--n", str(n), "--method", method, "--work", args.work,
                   "--partitions", str(args.partitions)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("{")), None)
            if line is None:
                print(f"{n} {method}: failed (exit {done.returncode}): {done.stderr.strip()[-600:]}", flush=True)
                continue
            r = json.loads(line)
            print(f"N={n:>9,} {method:<5} pending {r['pending']:>9,}  wall {r['wall_s']:7.2f} s  driver CPU "
                  f"{r['driver_cpu_s']:7.2f} s  driver peak RSS {r['peak_rss_mb']:6,} MB "
                  f"(after set-up {r['rss_before_mb']:,} MB)", flush=True)


if __name__ == "__main__":
    main()
