"""Train and evaluate STFPM on one MVTec-layout category; print metrics, speed and time.

    python bench/train_eval.py ../shared/data/mvtec_bottle_dev --backbone efficientnet_lite0 --epochs 10
    python bench/train_eval.py data/synth --image-size 128 --epochs 20

Any `stfpm train` option that TrainConfig knows can be given (--lr, --batch-size, --optimizer...).
The model directory goes to a temporary folder unless --out is given.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")

from stfpm.training.config import TrainConfig  # noqa: E402
from stfpm.training.run import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--out", default=None)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    for name, kind in (("epochs", int), ("batch-size", int), ("lr", float), ("image-size", int),
                       ("momentum", float), ("weight-decay", float), ("optimizer", str), ("augment", str),
                       ("layer-norm", str)):
        ap.add_argument(f"--{name}", type=kind, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-cache-mb", type=int, default=2048, help="0: the teacher runs on every step")
    args = ap.parse_args()
    cfg = TrainConfig(backbone=args.backbone, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      image_size=args.image_size, momentum=args.momentum, weight_decay=args.weight_decay,
                      optimizer=args.optimizer, augment=args.augment, layer_norm=args.layer_norm,
                      seed=args.seed, teacher_cache_mb=args.teacher_cache_mb)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        result = train(args.data, args.out or f"{tmp}/model", cfg)
        elapsed = time.time() - t0
    rates = [r["images_per_s"] for r in result.history]
    summary = {"data": args.data, "recipe": {k: v for k, v in vars(cfg.resolved()).items() if v is not None},
               "best_epoch": result.best_epoch, "train_images_per_s": sum(rates) / len(rates),
               "epoch_images_per_s": [round(r, 2) for r in rates],
               "total_time_s": round(elapsed, 1)}
    if result.metrics:
        summary.update({k: result.metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro")})
        summary["per_defect_type_image_auroc"] = result.metrics["per_defect_type_image_auroc"]
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
