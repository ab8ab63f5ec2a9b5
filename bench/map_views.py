"""Two views of the same trained students, each calibrated on held-out good images, combined.

    python bench/map_views.py MODELS --train-subset 200 [--seed 0]   # MODELS: bench/accuracy.py --models DIR

For every STFPM model the harness kept in MODELS, image AUROC on the category's test split of:
- "none": the paper's map (product of the layer maps), image score = its max;
- "median": each layer map divided by its image median first (the offline teachers' default);
- "max_ratio": max(none / h_none, median / h_median), each view's score divided by its median
  over the model's held-out good images (the harness's own split): an image is anomalous when
  either view says so against what that view gives good images. This is the model's own
  `layer_norm="views"` map (the Lite teachers' default since issue 15), run through
  `stfpm.nn.anomaly_map` with the `view_scale` training would record from those images;
- "max_z": the same with (score - mean) / std over the held-out images (a study only).
No labels are used for the combination: the scales come from good images alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from accuracy import DEV_ROOT, holdout_images  # noqa: E402
from stfpm.model.artifact import load_model  # noqa: E402
from stfpm.data import load_dataset  # noqa: E402
from stfpm.data.images import normalize_batch  # noqa: E402
from stfpm.model.inference import Predictor  # noqa: E402
from stfpm.metrics import auroc  # noqa: E402
from stfpm.nn import anomaly_map, view_scale  # noqa: E402

VIEWS = ("none", "median")


def layer_maps(predictor: Predictor, pixels: np.ndarray, batch_size: int = 32) -> list[np.ndarray]:
    """The per-layer maps of RGB uint8 model inputs, one forward per batch."""
    batches = [predictor.layer_forward(normalize_batch(pixels[i:i + batch_size], predictor.mean, predictor.std))[0]
               for i in range(0, len(pixels), batch_size)]
    return [np.concatenate(layer) for layer in zip(*batches)]


def image_scores(layers: list[np.ndarray], size: int, **map_options) -> np.ndarray:
    maps = anomaly_map(layers, (size, size), **map_options)
    return maps.reshape(len(maps), -1).max(1)


def study(model_dir: Path, data: Path, subset: int | None, seed: int) -> dict:
    predictor = Predictor.from_model(load_model(model_dir))
    held_layers = layer_maps(predictor, holdout_images(str(model_dir), data, subset, seed))
    dataset = load_dataset(data)
    test_layers = layer_maps(predictor, np.stack([predictor.prepare(Path(s.image).read_bytes(), s.image).pixels
                                                  for s in dataset.test]))
    labels = np.array([s.label for s in dataset.test])
    held = {v: image_scores(held_layers, predictor.size, layer_norm=v) for v in VIEWS}
    test = {v: image_scores(test_layers, predictor.size, layer_norm=v) for v in VIEWS}
    z = {v: (test[v] - held[v].mean()) / held[v].std() for v in VIEWS}
    result = {v: auroc(labels, test[v]) for v in VIEWS}
    # the product's own map, with the scales training would record from these held-out images
    result["max_ratio"] = auroc(labels, image_scores(test_layers, predictor.size, layer_norm="views",
                                                     view_scale=view_scale(held_layers, (predictor.size,) * 2)))
    result["max_z"] = auroc(labels, np.maximum(*z.values()))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", help="a bench/accuracy.py --models folder")
    ap.add_argument("--train-subset", type=int, default=None, help="as given to bench/accuracy.py")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the table as JSON")
    args = ap.parse_args()
    rows = {}
    for model_dir in sorted(Path(args.models).glob(f"*-stfpm-s{args.seed}-*")):
        name = model_dir.name.split("-stfpm-")[0]
        rows[name] = study(model_dir, DEV_ROOT / name, args.train_subset, args.seed)
        print(f"{name:<20} " + "  ".join(f"{k} {v:.3f}" for k, v in rows[name].items()), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
