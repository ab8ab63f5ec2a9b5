"""What each tapped layer and each map variant contributes, on students the harness trained.

    python bench/layer_maps.py MODELS_DIR [--train-subset 200] [--seed 0]

For every dev-set model in MODELS_DIR (`bench/accuracy.py --models`), scores the category's
test split once through the model's own compiled forward and prints image AUROC of: the
recipe's map; each layer map alone (its max); the "views" map over layer subsets and with the
stride-4 layer's map raised to a power below 1 (a softer vote for it); the views map smoothed
by a Gaussian; the in-distribution score alone; and the recipe's map per defect type. Every
variant's view scales are recomputed on the model's own held-out good images (the harness's
split), as training would record them: no labels are used to fit anything.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import DEV_ROOT, holdout_images  # noqa: E402

from stfpm.model.artifact import load_model  # noqa: E402
from stfpm.data import load_dataset  # noqa: E402
from stfpm.data.images import normalize_batch  # noqa: E402
from stfpm.model.inference import Predictor  # noqa: E402
from stfpm.nn.maps import _image_medians, anomaly_map, smooth_map  # noqa: E402

LAYER_SETS = {"views 0+1+2": ((0, 1, 2), 1.0), "views 1+2": ((1, 2), 1.0), "views 2": ((2,), 1.0),
              "views 0^0.5+1+2": ((0, 1, 2), 0.5), "views 0^0.25+1+2": ((0, 1, 2), 0.25)}
SIGMAS = (2, 4, 8)


def layers_of(maps: list, layers: tuple, power: float) -> list:
    return [maps[i] ** power if i == 0 and power != 1 else maps[i] for i in layers]


def views_scores(maps: list, size, sigma: float = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the paper's map score (max, after smoothing) and the product of layer medians."""
    plain = smooth_map(anomaly_map(maps, size), sigma)
    return plain.reshape(len(plain), -1).max(1), np.prod([_image_medians(m) for m in maps], axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models")
    ap.add_argument("--train-subset", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for model_dir in sorted(p for p in Path(args.models).iterdir() if (p / "model.json").is_file()):
        model = load_model(model_dir)
        data = Path(model.card.training["data"])
        if not (data / "test").is_dir():  # the harness trains on a temporary subset folder
            data = DEV_ROOT / model_dir.name.split("-stfpm-")[0]
        pred = Predictor.from_model(model, threads=1)
        size = (pred.size, pred.size)
        held = pred.layer_forward(normalize_batch(holdout_images(str(model_dir), data, args.train_subset, args.seed),
                                                  pred.mean, pred.std))[0]
        variants = {name: (layers, power, 0) for name, (layers, power) in LAYER_SETS.items()}
        variants.update({f"views sigma {s}": ((0, 1, 2), 1.0, s) for s in SIGMAS})
        scales = {}
        for name, (layers, power, sigma) in variants.items():
            plain, levels = views_scores(layers_of(held, layers, power), size, sigma)
            scales[name] = (np.median(plain), np.median(plain / levels))
        dataset = load_dataset(data)
        scores = {k: [] for k in ["recipe", "ood", "layer 0", "layer 1", "layer 2", *variants]}
        labels, kinds = [], []
        for i in range(0, len(dataset.test), 16):
            samples = dataset.test[i:i + 16]
            inputs = [pred.prepare(Path(s.image).read_bytes(), s.image) for s in samples]
            pix = np.stack([x.pixels for x in inputs])
            maps, profiles = pred.layer_forward(normalize_batch(pix, pred.mean, pred.std))
            recipe = anomaly_map(maps, size, **pred.card.map.options())
            scores["recipe"] += list(recipe.reshape(len(pix), -1).max(1))
            scores["ood"] += pred.ood_scores(profiles, len(pix))
            for j in range(3):
                scores[f"layer {j}"] += list(maps[j].reshape(len(pix), -1).max(1))
            for name, (layers, power, sigma) in variants.items():
                plain, levels = views_scores(layers_of(maps, layers, power), size, sigma)
                s0, s1 = scales[name]
                scores[name] += list(np.maximum(plain / s0, plain / (s1 * levels)))
            labels += [s.label for s in samples]
            kinds += [s.defect_type for s in samples]
        y = np.array(labels)
        line = " ".join(f"{k} {roc_auc_score(y, v):.3f}" for k, v in scores.items() if None not in v)
        print(f"{data.name}: {line}")
        for kind in sorted(set(kinds) - {"good"}):
            m = np.array([k in ("good", kind) for k in kinds])
            print(f"  {kind:<18} recipe {roc_auc_score(y[m], np.array(scores['recipe'])[m]):.3f}")


if __name__ == "__main__":
    main()
