"""Normalised-score candidates on a trained model's test images: do they keep the raw
scores' ranks (ties, top 5) and leave room in 8-bit maps (share of above-threshold pixels
at 255)?

    stfpm demo --out demo && python bench/score_scale.py demo/model demo/data

All candidates are 0.5 at the threshold (the 0.99 quantile of the held-out good scores) and
use the held-out good images the model was calibrated on; "chosen" is stfpm.model.score_scale.
"""
from __future__ import annotations

import argparse

import numpy as np

from stfpm.model.artifact import load_model
from stfpm.data import load_dataset, read_image, split_holdout
from stfpm.data.images import preprocess
from stfpm.model.inference import Predictor
from stfpm.model.score_scale import ScoreScale


def maps_of(predictor: Predictor, paths: list[str]) -> np.ndarray:
    return np.concatenate([predictor.forward(preprocess([read_image(p) for p in paths[i:i + 16]], predictor.size,
                                                        predictor.mean, predictor.std))[0]
                           for i in range(0, len(paths), 16)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("data")
    args = ap.parse_args()
    model = load_model(args.model_dir)
    predictor = Predictor.from_model(model)
    dataset = load_dataset(args.data)
    holdout = split_holdout(dataset.train, model.card.recipe["holdout_fraction"], model.card.recipe["seed"])[1]
    good = maps_of(predictor, [s.image for s in holdout]).reshape(len(holdout), -1).max(axis=1).astype(np.float64)
    test_maps = maps_of(predictor, [s.image for s in dataset.test])
    raw = test_maps.reshape(len(test_maps), -1).max(axis=1).astype(np.float64)
    thr = float(np.quantile(good, 0.99))
    lo, hi, spread = good.min(), good.max(), good.std()
    chosen = ScoreScale.fit(good, thr)
    b = chosen.log_scale

    def below(r):
        return 0.5 * (np.minimum(r, thr) / thr) ** (1 / b)

    candidates = {
        "clipped linear (before)": lambda r: np.clip((r - thr) / (hi - lo) + 0.5, 0, 1),
        "exp tail, scale = good std": lambda r: np.where(r <= thr, below(r), 1 - 0.5 * np.exp(-(r - thr) / spread)),
        "exp tail, scale = good range": lambda r: np.where(r <= thr, below(r), 1 - 0.5 * np.exp(-(r - thr) / (hi - lo))),
        "power tail, exponent 1/b": lambda r: np.where(r <= thr, below(r), 1 - 0.5 * (thr / np.maximum(r, thr)) ** (1 / b)),
        "chosen: 1 - 0.5 thr/raw": lambda r: chosen.normalize(r, thr),
    }
    top_raw = list(np.argsort(-raw, kind="stable")[:5])
    defect_pixels = np.concatenate([m[m >= thr] for m, s in zip(test_maps, dataset.test) if s.label == 1])
    print(f"threshold {thr:.2f}, held-out good {lo:.2f}-{hi:.2f} (median {np.median(good):.2f}), b {b:.3f}; "
          f"test raw max {raw.max():.1f}")
    print(f"{'candidate':<30}{'ties':>6}{'at 1.0':>8}{'top-5 = raw':>13}{'defect px at 255':>18}{'median px':>11}")
    for name, f in candidates.items():
        s = f(raw)
        pixels = np.rint(255 * f(defect_pixels.astype(np.float64)))
        print(f"{name:<30}{len(s) - len(np.unique(s)):>6}{int((s >= 1).sum()):>8}"
              f"{list(np.argsort(-s, kind='stable')[:5]) == top_raw!s:>13}{np.mean(pixels == 255):>18.3f}"
              f"{np.median(pixels):>11.0f}")


if __name__ == "__main__":
    main()
