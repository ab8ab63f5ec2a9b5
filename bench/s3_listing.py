"""S3 listing: one sequential recursive pass vs prefixes listed concurrently (sources.s3_files)
vs an incremental night of a `{date}` source (stfpm.scoring.dates).

    python bench/s3_listing.py --objects 20000 --repeats 3

A local S3 server (moto, server mode: real HTTP, real pagination of 1,000 keys) holds
--objects empty-ish objects under <day>/cam<c>/img-<i>.png (10 days x 8 cameras). Each
repeat lists the bucket three ways, rotating which goes first, through the scorer's own
listing (`sources.s3_files`, which `stfpm score` and the audit list S3 prefixes with):
the whole prefix sequentially, the whole prefix concurrently, and the night after the last
day as a `{date}` source lists it (`days_to_list`: the last run's day less the default
look-back of 1 day, to today: the two newest day prefixes, each listed concurrently);
each checks it finds every object it should. With the scorer's default S3 timeouts the one sequential pass
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
    from datetime import date, datetime, time as day_time, timedelta, timezone

    from stfpm.scoring import sources
    from stfpm.scoring.dates import DateTemplate, days_to_list

    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="listing")
    t0 = time.perf_counter()
    days = [date(2026, 11, 25) + timedelta(days=d) for d in range(10)]
    keys = [f"{days[i // 8 % 10]}/cam{i % 8}/img-{i:07d}.png" for i in range(args.objects)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket="listing", Key=k, Body=b"x"), keys))
    print(f"{args.objects:,} objects written in {time.perf_counter() - t0:.0f} s", flush=True)

    # moto answers a page of a 20k-key listing in seconds on a loaded machine: a longer timeout
    # than the scorer's default for both modes, so the sequential pass can finish at all
    fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                           request_timeout=120, connect_timeout=30)
    # the night of the last day: the run before it listed on the day before, at 02:00
    template = DateTemplate.parse("s3://listing/{date}/")
    last_run = datetime.combine(days[-2], day_time(2), timezone.utc)
    night = days_to_list(template, last_run, datetime.combine(days[-1], day_time(23), timezone.utc))
    expected = sum(k.split("/")[0] in {d.isoformat() for d in night} for k in keys)

    def incremental():
        return [f for d in night for f in sources.s3_files(fs, template.uri(d).removeprefix("s3://").rstrip("/"),
                                                           workers=args.workers)]

    modes = {"sequential": (lambda: sources.s3_files(fs, "listing", workers=1), args.objects),
             "concurrent": (lambda: sources.s3_files(fs, "listing", workers=args.workers), args.objects),
             "incremental": (incremental, expected)}
    times: dict[str, list[float]] = {m: [] for m in modes}
    names = list(modes)
    for r in range(args.repeats):
        for mode in names[r % 3:] + names[:r % 3]:
            t0 = time.perf_counter()
            found = modes[mode][0]()
            times[mode].append(time.perf_counter() - t0)
            assert len(found) == modes[mode][1], (mode, len(found))
            print(f"  repeat {r + 1} {mode:<11} {times[mode][-1]:7.2f} s ({len(found):,} objects)", flush=True)
    seq, conc, inc = (statistics.median(times[m]) for m in names)
    print(f"{args.objects:,} objects: sequential {seq:.2f} s, concurrent ({args.workers} listers) {conc:.2f} s "
          f"({seq / conc:.2f}x), incremental night ({len(night)} day prefixes, {expected:,} objects) {inc:.2f} s "
          f"({seq / inc:.2f}x vs sequential, {conc / inc:.2f}x vs concurrent)")
    server.stop()


if __name__ == "__main__":
    main()
