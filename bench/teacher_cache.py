"""Training speed with and without the teacher-feature cache, and the loss curves of both.

    python bench/teacher_cache.py ../shared/data/mvtec_bottle_dev --n 40 --epochs 3

Trains the same recipe twice in this process on the first N train/good images (one run
with `teacher_cache_mb=0`, one with the default cache), prints per-epoch images/s, CPU
seconds and losses, and the largest loss difference. Epoch 1 fills the cache, so the figures
to read are those of the later epochs; on a shared machine wall-clock images/s follow the
neighbours' load, while this process's CPU seconds per epoch (all its threads) do not.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402

from stfpm.training.config import TrainConfig  # noqa: E402
from stfpm.training.run import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--n", type=int, default=40, help="train/good images used (the held-out 20% included)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    args = ap.parse_args()
    goods = sorted(p for p in (Path(args.data) / "train" / "good").iterdir() if p.is_file())[:args.n]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data" / "train" / "good"
        folder.mkdir(parents=True)
        for path in goods:
            os.symlink(path.resolve(), folder / path.name)
        for label, mb in (("no cache", 0), ("cache", 2048)):
            cfg = TrainConfig(backbone=args.backbone, epochs=args.epochs, image_size=args.image_size,
                              teacher_cache_mb=mb)
            cpu = [time.process_time()]
            runs[label] = train(str(Path(tmp) / "data"), f"{tmp}/{mb}", cfg, progress=False,
                                on_epoch=lambda record, cpu=cpu: cpu.append(time.process_time())).history
            for record, start, end in zip(runs[label], cpu, cpu[1:]):
                record["cpu_s"] = end - start
    for label, history in runs.items():
        later = history[1:] or history
        print(json.dumps({"run": label, "images_per_s": [round(r["images_per_s"], 2) for r in history],
                          "cpu_s": [round(r["cpu_s"], 1) for r in history],
                          "later_epochs_cpu_s": round(float(np.mean([r["cpu_s"] for r in later])), 1),
                          "later_epochs_images_per_s": round(float(np.mean([r["images_per_s"] for r in later])), 2),
                          "loss": [round(r["loss"], 6) for r in history],
                          "holdout_loss": [round(r["holdout_loss"], 6) for r in history]}))
    diff = max(abs(a[k] - b[k]) for a, b in zip(*runs.values()) for k in ("loss", "holdout_loss"))
    print(f"largest loss difference: {diff:.2e}")


if __name__ == "__main__":
    main()
