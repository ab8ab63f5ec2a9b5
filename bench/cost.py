"""What a night of millions of images needs and costs on the cluster in ray_cluster.yaml.

    python bench/cost.py                       # measure per-core rates here, then the table
    python bench/cost.py --success OUT/_SUCCESS --format png   # stage rates from a real run
    python bench/cost.py --rates 50.7,262,113.5                # PNG, JPEG, map rates measured before

A scoring pipeline is a chain of stages (read + decode + resize on CPU tasks, the forward on
GPU actors, map PNGs on CPU tasks); its throughput is that of the slowest stage times the
workers it has. This model takes per-worker rates of each stage and sizes the cluster:

- CPU seconds per image = 1 / decode rate + 1 / map-writing rate (both per vCPU);
- vCPUs that keep one GPU busy = GPU forward rate x CPU seconds per image;
- GPUs = the fewest that finish inside the window (at most the GPU node type's max_workers);
  CPU decode nodes are then added until the GPUs are busy (at most the CPU type's
  max_workers), since an hour of a GPU waiting for decode costs more than the CPUs that feed
  it; the GPU nodes' own vCPUs, less one per actor, decode too;
- wall time = images / min(GPU rate x GPUs, vCPUs / CPU seconds per image);
- cost = node-hours x hourly price + the head for the wall time + S3 requests (one GET per
  image, one PUT per map). Not counted: node start-up (minutes), overlays, listing.

Inputs, each printed with its source: the CPU rates are measured here (one core, OpenCV with
one thread, the project's own decode and resize), or read from a real run's `_SUCCESS`
(`stages.<name>.images_per_busy_s`, which are per task/actor); the GPU forward rate is the
published/measured figure in docs (H100 ~9,300 images/s fp32 for STFPM-R18 at 256 with maps;
an A10G is assumed at a third of that, 3,000/s, until measured); node shapes and limits come
from ray_cluster.yaml; prices are the on-demand list prices assumed in cluster/README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]

# On-demand list prices (USD per hour, us-west-2) assumed in cluster/README.md; check yours.
PRICES = {"m6i.xlarge": 0.192, "g5.2xlarge": 1.212, "c6i.8xlarge": 1.36}
S3_PUT_PER_1000, S3_GET_PER_1000 = 0.005, 0.0004
H100_FORWARD = 9300.0     # images/s, STFPM-R18 256x256 fp32 batch 256, maps included (docs)
A10G_FORWARD = H100_FORWARD / 3  # assumed until measured on the GPU node type


def cluster_shape(path: Path) -> dict:
    """{role: (instance type, vCPUs, GPUs, max_workers)} for head, GPU and CPU node types."""
    config = yaml.safe_load(path.read_text())
    shape = {}
    for name, node in config["available_node_types"].items():
        res = node.get("resources", {})
        itype = node["node_config"]["InstanceType"]
        if itype not in PRICES:
            raise SystemExit(f"{path}: no price for instance type {itype!r}; add it to PRICES in {__file__}")
        role = "head" if name == config["head_node_type"] else ("gpu" if res.get("GPU") else "cpu")
        shape[role] = {"type": itype, "cpus": float(res.get("CPU", 0)), "gpus": float(res.get("GPU", 0)),
                       "max": int(node.get("max_workers", 0)), "price": PRICES[itype]}
    return shape


def test_image(size: int) -> np.ndarray:
    """A size x size textured part image (the project's synthetic generator): compresses like
    a photograph, unlike random noise."""
    from stfpm.data.synth import render_texture, texture_family

    return render_texture(np.random.default_rng(0), size, texture_family(0))


def per_core_rate(fn, seconds: float = 3.0) -> float:
    """Calls of `fn` per second on one core (after a warm-up call)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def measure_cpu_rates(source_px: int, model_px: int) -> dict:
    """Per-core images/s of decode + resize (PNG; JPEG q90 at full and reduced scale) and of
    writing one 8-bit map PNG at the source size, through the project's own functions."""
    from stfpm.data.images import decode_image, resize_for_model

    cv2.setNumThreads(1)
    image = test_image(source_px)
    png = cv2.imencode(".png", image)[1].tobytes()
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    heat = cv2.GaussianBlur(image[..., 0], (0, 0), 8)
    return {
        "png": per_core_rate(lambda: resize_for_model(decode_image(png), model_px)),
        "jpeg_full": per_core_rate(lambda: resize_for_model(decode_image(jpeg), model_px)),
        "jpeg": per_core_rate(lambda: resize_for_model(decode_image(jpeg, min_side=model_px), model_px)),
        "maps": per_core_rate(lambda: cv2.imencode(".png", heat)),
        "png_bytes": len(png), "jpeg_bytes": len(jpeg),
    }


def rates_from_success(path: Path) -> dict:
    stages = json.loads(path.read_text())["stages"]
    rate = {name: s.get("images_per_busy_s") for name, s in stages.items()}
    if not rate.get("decode") or not rate.get("maps"):
        raise SystemExit(f"{path} has no decode/maps stage rates")
    return rate


def size_night(n_images: float, decode_rate: float, maps_rate: float, gpu_rate: float,
               shape: dict, window_h: float) -> dict:
    """The fewest GPUs (within the node limits) that score n_images inside window_h, each kept
    busy by enough CPU decode nodes (a GPU waiting for decode is the expensive idle), or the
    largest cluster and its wall time when none fits the window."""
    cpu_s = 1 / decode_rate + 1 / maps_rate          # vCPU seconds per image
    gpu, cpu = shape["gpu"], shape["cpu"]
    needed_rate = n_images / (window_h * 3600)
    gpus = min(gpu["max"], max(1, math.ceil(needed_rate / gpu_rate)))
    target = gpus * gpu_rate
    own_vcpus = gpus * (gpu["cpus"] - 1)              # each GPU node keeps one CPU for its actor
    cpu_nodes = min(cpu["max"], max(0, math.ceil((target * cpu_s - own_vcpus) / cpu["cpus"])))
    vcpus = own_vcpus + cpu_nodes * cpu["cpus"]
    rate = min(gpus * gpu_rate, vcpus / cpu_s)
    wall_h = n_images / rate / 3600
    compute = wall_h * (gpus * gpu["price"] + cpu_nodes * cpu["price"] + shape["head"]["price"])
    s3 = n_images * (S3_GET_PER_1000 + S3_PUT_PER_1000) / 1000   # one read, one map written
    return {"gpus": gpus, "cpu_nodes": cpu_nodes, "vcpus_per_gpu": gpu_rate * cpu_s, "decode_vcpus": vcpus,
            "rate": rate, "bound": "GPU" if gpus * gpu_rate <= vcpus / cpu_s else "CPU decode",
            "wall_h": wall_h, "compute_usd": compute, "s3_usd": s3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cluster", default=str(REPO / "ray_cluster.yaml"))
    ap.add_argument("--source-px", type=int, default=900, help="side of the square source images")
    ap.add_argument("--model-px", type=int, default=256)
    ap.add_argument("--gpu-rate", type=float, default=A10G_FORWARD, help="forward images/s per GPU")
    ap.add_argument("--window-h", type=float, default=8.0, help="the night: hours the run may take")
    ap.add_argument("--success", help="a run's _SUCCESS: take decode/maps rates from it instead of measuring")
    ap.add_argument("--format", choices=["png", "jpeg"], help="with --success: the inputs' format")
    ap.add_argument("--rates", help="PNG,JPEG,MAPS per-core images/s measured earlier (e.g. on a quiet machine) "
                                    "instead of measuring now")
    args = ap.parse_args()

    shape = cluster_shape(Path(args.cluster))
    if args.success:
        rate = rates_from_success(Path(args.success))
        formats = {args.format or "images": (rate["decode"], rate["maps"])}
        print(f"stage rates from {args.success}: decode {rate['decode']}, maps {rate['maps']} images per busy s")
    elif args.rates:
        png, jpeg, maps = (float(x) for x in args.rates.split(","))
        formats = {"png": (png, maps), "jpeg": (jpeg, maps)}
        print(f"given per-core rates: decode+resize PNG {png:g}/s, JPEG {jpeg:g}/s; map PNG {maps:g}/s")
    else:
        m = measure_cpu_rates(args.source_px, args.model_px)
        print(f"measured here, one core, {args.source_px}-px source -> {args.model_px} input "
              f"(PNG {m['png_bytes'] // 1024} KB, JPEG q90 {m['jpeg_bytes'] // 1024} KB):")
        print(f"  decode+resize PNG {m['png']:.1f}/s, JPEG full scale {m['jpeg_full']:.1f}/s, "
              f"JPEG reduced scale {m['jpeg']:.1f}/s ({m['jpeg'] / m['jpeg_full']:.2f}x); "
              f"map PNG {m['maps']:.1f}/s")
        formats = {"png": (m["png"], m["maps"]), "jpeg": (m["jpeg"], m["maps"])}
    print(f"GPU forward {args.gpu_rate:,.0f} images/s per {shape['gpu']['type']} (assumed: H100 "
          f"{H100_FORWARD:,.0f}/s measured / 3); window {args.window_h:g} h; cluster {args.cluster}: "
          f"GPU nodes {shape['gpu']['type']} x<= {shape['gpu']['max']}, CPU nodes {shape['cpu']['type']} "
          f"({shape['cpu']['cpus']:g} vCPU) x<= {shape['cpu']['max']}")
    print()
    print("| images | format | GPUs | CPU nodes | vCPUs per busy GPU | bound | images/s | wall time | "
          "compute $ | S3 requests $ | $ per million |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in (1e6, 1e7, 1e8):
        for fmt, (decode_rate, maps_rate) in formats.items():
            r = size_night(n, decode_rate, maps_rate, args.gpu_rate, shape, args.window_h)
            print(f"| {n / 1e6:g} M | {fmt} | {r['gpus']} | {r['cpu_nodes']} | {r['vcpus_per_gpu']:.0f} | "
                  f"{r['bound']} | {r['rate']:,.0f} | {r['wall_h']:.2f} h | {r['compute_usd']:,.2f} | "
                  f"{r['s3_usd']:,.2f} | {(r['compute_usd'] + r['s3_usd']) / n * 1e6:.2f} |")


if __name__ == "__main__":
    main()
