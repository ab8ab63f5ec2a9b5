"""Data-parallel training speed: 1 vs 2 Ray Train workers on this machine.

    python bench/train.py --n-train 64 --image-size 128 --epochs 3

Each worker is limited to one intra-op thread, so the ratio shows what data parallelism
adds rather than what more threads add. Images/s are averaged over the epochs after the
first (warm-up) from the per-epoch records; cluster start and data loading are excluded.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import ray  # noqa: E402

from stfpm.data import make_synthetic_dataset  # noqa: E402
from stfpm.raytrain.driver import train_distributed  # noqa: E402
from stfpm.training.config import TrainConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16, help="global batch (split across workers)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_synthetic_dataset(tmp / "data", n_train=args.n_train, n_test=4, size=args.image_size, seed=0)
        t0 = time.time()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        print(f"ray.init: {time.time() - t0:.1f} s")
        cfg = TrainConfig(backbone=args.backbone, epochs=args.epochs, image_size=args.image_size,
                          batch_size=args.batch_size, seed=0)
        rates = {}
        for workers in (1, 2):
            t0 = time.time()
            result = train_distributed(str(tmp / "data"), str(tmp / f"model{workers}"), cfg, num_workers=workers,
                                       storage=str(tmp / "storage"), name=f"bench{workers}", threads_per_worker=1)
            rates[workers] = float(np.mean([r["images_per_s"] for r in result.history[1:]]))
            print(f"{workers} worker(s): {rates[workers]:6.2f} train images/s "
                  f"(wall {time.time() - t0:.0f} s incl. start-up and finalize)")
        print(f"speed-up 2 vs 1 worker: {rates[2] / rates[1]:.2f}x")
        ray.shutdown()


if __name__ == "__main__":
    main()
