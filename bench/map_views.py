"""Two views of the same trained students, each calibrated on held-out good images, combined.

    python bench/map_views.py MODELS --train-subset 200 [--seed 0]   # MODELS: bench/accuracy.py --models DIR

For every STFPM model the harness kept in MODELS, image AUROC on the category's test split of:
- "none": the paper's map (product of the layer maps), image score = its max;
- "median": each layer map divided by its image median first (the offline teachers' default);
- "max_ratio": max(none / h_none, median / h_median), each view's score divided by its median
  over the model's held-out good images (the harness's own split): an image is anomalous when
  either view says so against what that view gives good images;
- "max_z": the same with (score - mean) / std over the held-out images.
No labels are used for the combination: the scales come from good images alone. A study for
issue 15 (the median map wins screw and loses elpv and magnetic tile; neither view alone is
safe), not a model option: the product's map is still one view.
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
from stfpm.artifact import load_model  # noqa: E402
from stfpm.data import load_dataset  # noqa: E402
from stfpm.data.images import normalize_batch  # noqa: E402
from stfpm.inference import Predictor  # noqa: E402
from stfpm.metrics import auroc  # noqa: E402
from stfpm.nn import anomaly_map  # noqa: E402

VIEWS = ("none", "median")


def view_scores(predictor: Predictor, pixels: np.ndarray, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Each view's image scores (max of the product map) from one forward per batch."""
    out = {v: [] for v in VIEWS}
    for i in range(0, len(pixels), batch_size):
        layer_maps, _ = predictor.layer_forward(normalize_batch(pixels[i:i + batch_size], predictor.mean, predictor.std))
        for view in VIEWS:
            maps = anomaly_map(layer_maps, (predictor.size, predictor.size), layer_norm=view, combine="product")
            out[view].append(maps.reshape(len(maps), -1).max(1))
    return {v: np.concatenate(s) for v, s in out.items()}


def study(model_dir: Path, data: Path, subset: int | None, seed: int) -> dict:
    predictor = Predictor.from_model(load_model(model_dir))
    held = view_scores(predictor, holdout_images(str(model_dir), data, subset, seed))
    dataset = load_dataset(data)
    test = view_scores(predictor, np.stack([predictor.prepare(Path(s.image).read_bytes(), s.image).pixels
                                            for s in dataset.test]))
    labels = np.array([s.label for s in dataset.test])
    ratio = {v: test[v] / np.median(held[v]) for v in VIEWS}
    z = {v: (test[v] - held[v].mean()) / held[v].std() for v in VIEWS}
    result = {v: auroc(labels, test[v]) for v in VIEWS}
    result["max_ratio"] = auroc(labels, np.maximum(*ratio.values()))
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
