"""What the whole+tiles views cost per image: the same images through a whole-only model and a
whole+tiles one of each kind, interleaved in one process (this machine's load drifts), on the
default CPU engine.

    python bench/views_cost.py                       # 1024-px images, 256-px input, 2 x 2 tiles
    python bench/views_cost.py --size 640 --n 32 --threads 1

Models have random STFPM weights and a PatchCore bank of random training images' patches
(speed does not depend on the values), so it runs offline. Prints ms per image for each and
the ratio (views / whole); the whole+tiles model does 5 forwards per image where the whole
model does 1, and its PatchCore bank is two banks of the whole model's size.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from stfpm.model.inference import Predictor  # noqa: E402


def make_images(folder: Path, n: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        base = cv2.resize(rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8), (size, size),
                          interpolation=cv2.INTER_CUBIC)
        paths.append(folder / f"{i:03d}.png")
        cv2.imwrite(str(paths[-1]), cv2.add(base, rng.integers(0, 30, (size, size, 3), dtype=np.uint8)))
    return paths


def train_models(data: Path, out: Path, image_size: int) -> dict[str, Path]:
    """{kind/views: model dir}: STFPM for one epoch (the weights' values do not change the cost)
    and PatchCore, each whole-only and with the whole+tiles views."""
    from stfpm.training.config import TrainConfig
    from stfpm.training.run import train

    models = {}
    for kind in ("stfpm", "patchcore"):
        for views in ("whole", "whole+tiles"):
            models[f"{kind} {views}"] = out / f"{kind}-{views}"
            train(str(data), str(models[f"{kind} {views}"]),
                  TrainConfig(model=kind, image_size=image_size, views=views, epochs=1, batch_size=8), progress=False)
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="image side")
    ap.add_argument("--image-size", type=int, default=256, help="model input")
    ap.add_argument("--n", type=int, default=16, help="images predicted per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "data" / "train" / "good", 12, args.size)
        images = [p.read_bytes() for p in make_images(root / "images", args.n, args.size)]
        models = train_models(root / "data", root / "models", args.image_size)
        predictors = {name: Predictor.open(path, threads=args.threads) for name, path in models.items()}
        for p in predictors.values():
            p.predict(images[:2])  # warm up
        times = {name: [] for name in predictors}
        for _ in range(args.rounds):
            for name, p in predictors.items():
                t0 = time.perf_counter()
                for i in range(0, len(images), args.batch_size):
                    p.predict(images[i:i + args.batch_size])
                times[name].append((time.perf_counter() - t0) / len(images) * 1000)
    print(f"{args.size}-px images, {args.image_size}-px input, batch {args.batch_size}, "
          f"engine {next(iter(predictors.values())).engine}; ms per image, best of {args.rounds} rounds")
    for kind in ("stfpm", "patchcore"):
        whole, views = min(times[f"{kind} whole"]), min(times[f"{kind} whole+tiles"])
        print(f"{kind:<10} whole {whole:7.1f}   whole+tiles {views:7.1f}   ratio {views / whole:4.2f}x")


if __name__ == "__main__":
    main()
