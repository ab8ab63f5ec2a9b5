"""The scoring service under load vs `predict` in-process, on the same cores, in one run.

Starts `stfpm serve`'s app (stfpm.serving.app.run) on a local Ray on 127.0.0.1, then drives
POST /v1/{category}/predict with a bounded load generator (aiohttp): a fixed number of requests
per level, cut off after --max-seconds, at 1, 4 and 16 concurrent clients, each client sending
its next image when the last answer came. Reports throughput and client-side p50/p95/p99
latency per level, and failures (any answer but 200, any client error). Baseline, in this
process before Ray starts and again after it stopped (the machine's load drifts): the Predictor
on the same image bytes, one image per call (batch-1 latency) and --max-batch-size images per
call (the batched predictor's images/s). Ratios are against the better of the two baseline runs
(the faster batch-1 p50, the higher batched images/s): the conservative side for the targets.

    python bench/serve.py --n 200 --clients 1,4,16

Targets (issue 27, 2 cores, Lite0 at 256 px): p50 at 1 client <= 2x in-process batch-1;
images/s at 16 clients >= 0.7x the in-process batched predictor; no request lost or failed.
Random weights (speed does not depend on them), so it runs offline.
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from predict import make_model_dir  # noqa: E402


def make_images(n: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [cv2.imencode(".png", cv2.GaussianBlur(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), (5, 5), 0))[1]
            .tobytes() for _ in range(n)]


def percentiles(latencies_s: list[float]) -> tuple[float, float, float]:
    if not latencies_s:
        return (float("nan"),) * 3
    p50, p95, p99 = np.percentile(np.array(latencies_s) * 1000, [50, 95, 99])
    return float(p50), float(p95), float(p99)


def in_process(model_dir: Path, images: list[bytes], n: int, batch: int, threads: int) -> dict:
    from stfpm.model.inference import Predictor

    predictor = Predictor.open(model_dir, threads=threads)
    predictor.predict(images[:batch])  # warm-up (oneDNN kernels for both shapes)
    predictor.predict(images[:1])
    latencies = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        predictor.predict([images[i % len(images)]])
        latencies.append(time.perf_counter() - t)
    batch1_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    done = 0
    while done < n:
        chunk = [images[(done + j) % len(images)] for j in range(min(batch, n - done))]
        predictor.predict(chunk)
        done += len(chunk)
    batched_wall = time.perf_counter() - t0
    return {"batch1": percentiles(latencies), "batch1_ips": n / batch1_wall, "batched_ips": n / batched_wall}


async def load(url: str, images: list[bytes], n: int, clients: int, max_seconds: float) -> dict:
    """`n` requests (or as many as start within max_seconds) from `clients` concurrent clients."""
    import aiohttp

    latencies, failures, sent = [], [], 0
    deadline = time.perf_counter() + max_seconds

    async def client(session):
        nonlocal sent
        while sent < n and time.perf_counter() < deadline:
            i, sent = sent, sent + 1
            t = time.perf_counter()
            try:
                async with session.post(url, data=images[i % len(images)]) as answer:
                    body = await answer.json()
                    if answer.status != 200:
                        failures.append(f"{answer.status}: {body}")
                        continue
            except Exception as e:  # noqa: BLE001 - counted, the run goes on
                failures.append(f"{type(e).__name__}: {e}")
                continue
            latencies.append(time.perf_counter() - t)

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"clients": clients, "sent": sent, "ok": len(latencies), "failed": len(failures),
            "first_failures": failures[:3], "ips": len(latencies) / wall, "latency": percentiles(latencies)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="requests per concurrency level (and in-process images)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--size", type=int, default=256, help="model input size")
    ap.add_argument("--image-px", type=int, default=256, help="side of the posted PNGs")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2, help="Paddle threads, in-process and in the replica")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="cut-off per level")
    args = ap.parse_args()

    import ray
    from ray import serve

    from stfpm.serving.app import ServeOptions, run

    images = make_images(32, args.image_px)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp), args.backbone, args.size)
        print(f"in-process: {args.n} images, batch 1 then batch {args.max_batch_size}, {args.threads} threads", flush=True)
        before = in_process(model_dir, images, args.n, args.max_batch_size, args.threads)
        print(f"  before: batch-1 p50 {before['batch1'][0]:.1f} ms; batched {before['batched_ips']:.1f} images/s", flush=True)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
        try:
            t0 = time.perf_counter()
            run(ServeOptions(model=str(model_dir), max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                             cpus_per_replica=args.threads, threads_per_replica=args.threads),
                port=port, blocking=False)
            print(f"service up in {time.perf_counter() - t0:.1f}s on 127.0.0.1:{port}", flush=True)
            url = f"http://127.0.0.1:{port}/v1/{model_dir.name}/predict"
            asyncio.run(load(url, images, 2 * args.max_batch_size, args.max_batch_size, 60))  # warm-up
            results = [asyncio.run(load(url, images, args.n, c, args.max_seconds))
                       for c in (int(c) for c in args.clients.split(","))]
        finally:
            serve.shutdown()
            ray.shutdown()
        after = in_process(model_dir, images, args.n, args.max_batch_size, args.threads)
        print(f"  after: batch-1 p50 {after['batch1'][0]:.1f} ms; batched {after['batched_ips']:.1f} images/s", flush=True)
    base = {"batch1": min(before["batch1"], after["batch1"]), "batched_ips": max(before["batched_ips"], after["batched_ips"])}

    print(f"\n{args.backbone} at {args.size} px, {args.image_px}-px PNGs, max_batch_size {args.max_batch_size}, "
          f"batch_wait_ms {args.batch_wait_ms:g}, {args.threads} threads\n")
    print("| clients | requests ok / sent | failed | images/s | p50 ms | p95 ms | p99 ms | images/s vs in-process batched "
          "| p50 vs in-process batch-1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    b50 = base["batch1"][0]
    for when, b in (("before", before), ("after", after)):
        p50, p95, p99 = b["batch1"]
        print(f"| in-process batch 1 ({when}) | {args.n} | 0 | {b['batch1_ips']:.1f} | {p50:.1f} | {p95:.1f} | {p99:.1f} | "
              f"{b['batch1_ips'] / base['batched_ips']:.2f}x | {p50 / b50:.2f}x |")
        print(f"| in-process batch {args.max_batch_size} ({when}) | {args.n} | 0 | {b['batched_ips']:.1f} | | | | "
              f"{b['batched_ips'] / base['batched_ips']:.2f}x | |")
    for r in results:
        p50, p95, p99 = r["latency"]
        print(f"| {r['clients']} | {r['ok']} / {r['sent']} | {r['failed']} | {r['ips']:.1f} | {p50:.1f} | {p95:.1f} | "
              f"{p99:.1f} | {r['ips'] / base['batched_ips']:.2f}x | {p50 / b50:.2f}x |")
    for r in results:
        if r["failed"]:
            print(f"failures at {r['clients']} clients: {r['first_failures']}")
    one, most = results[0], results[-1]
    print(f"\ntargets: p50 at {one['clients']} client(s) {one['latency'][0] / b50:.2f}x batch-1 (<= 2); "
          f"images/s at {most['clients']} clients {most['ips'] / base['batched_ips']:.2f}x batched (>= 0.7); "
          f"failed {sum(r['failed'] for r in results)}, lost {sum(r['sent'] - r['ok'] - r['failed'] for r in results)} (0)")


if __name__ == "__main__":
    main()
