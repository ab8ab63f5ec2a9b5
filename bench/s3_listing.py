"""S3 listing: one sequential recursive pass vs prefixes listed concurrently (sources.s3_files).

    python bench/s3_listing.py --objects 20000 --repeats 3

A local S3 server (moto, server mode: real HTTP, real pagination of 1,000 keys) holds
--objects empty-ish objects under cam<c>/day<d>/img-<i>.png (8 cameras x 10 days). Each
repeat lists the bucket both ways (alternating which goes first) through the scorer's own
listing (`sources.s3_files`, which `stfpm score` and the audit list S3 prefixes with) and
checks both find every object. With the scorer's default S3 timeouts the one sequential pass
over a 20k-key prefix timed out against moto on this loaded machine (a page took > 3 s), so
both use a 120 s request timeout here. Prints the median seconds of each and their ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=16)
    args = parser.parse_args()

    import logging

    import boto3
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    from stfpm.scoring import sources

    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="listing")
    t0 = time.perf_counter()
    keys = [f"cam{i % 8}/day{i // 8 % 10:02d}/img-{i:07d}.png" for i in range(args.objects)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket="listing", Key=k, Body=b"x"), keys))
    print(f"{args.objects:,} objects written in {time.perf_counter() - t0:.0f} s", flush=True)

    # moto answers a page of a 20k-key listing in seconds on a loaded machine: a longer timeout
    # than the scorer's default for both modes, so the sequential pass can finish at all
    fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                           request_timeout=120, connect_timeout=30)
    times: dict[str, list[float]] = {"sequential": [], "concurrent": []}
    for r in range(args.repeats):
        order = ["sequential", "concurrent"] if r % 2 == 0 else ["concurrent", "sequential"]
        for mode in order:
            t0 = time.perf_counter()
            found = sources.s3_files(fs, "listing", workers=1 if mode == "sequential" else args.workers)
            times[mode].append(time.perf_counter() - t0)
            assert len(found) == args.objects, (mode, len(found))
            print(f"  repeat {r + 1} {mode:<10} {times[mode][-1]:7.2f} s", flush=True)
    seq, conc = (statistics.median(times[m]) for m in ("sequential", "concurrent"))
    print(f"{args.objects:,} objects: sequential {seq:.2f} s, concurrent ({args.workers} listers) {conc:.2f} s, "
          f"ratio {seq / conc:.2f}x")
    server.stop()


if __name__ == "__main__":
    main()
