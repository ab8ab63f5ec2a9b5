"""The in-distribution check on real images: one short-trained model per dev set, then the
share of each set's test images that each model flags as `ood`.

    python bench/ood.py --out /tmp/ood-models --epochs 1 --image-size 128

The check does not depend on the student (it compares the frozen teacher's feature profile
with training), so a short training measures it. Rows: the model; columns: the test images
(its own good and defective ones, the other sets' good ones); a cell is the flagged share.
The diagonal "good" column is the false-flag rate. Needs ../shared/data (skips a missing set).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from stfpm import create_model
from stfpm.data import load_dataset
from stfpm.training.config import TrainConfig
from stfpm.training.run import train

SETS = ("mvtec_bottle_dev", "mvtec_screw_dev", "magnetic_tile_dev", "elpv_mono_dev")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def flagged(model, paths: list[str]) -> tuple[float, float]:
    """(share flagged ood, largest ood_score) over `paths`."""
    scores = np.array([r["ood_score"] for r in model.predict(paths, batch_size=16)])
    return float((scores > 1).mean()), float(scores.max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the models")
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    args = ap.parse_args()
    sets = [s for s in SETS if (args.data / s).is_dir()]
    tests = {s: load_dataset(str(args.data / s)).test for s in sets}
    for name in sets:
        model_dir = args.out / name
        if not (model_dir / "model.json").is_file():
            train(str(args.data / name), str(model_dir), TrainConfig(backbone=args.backbone, epochs=args.epochs,
                                                                   image_size=args.image_size), progress=False)
        model = create_model(model_dir=model_dir)
        row = {"good": flagged(model, [s.image for s in tests[name] if s.label == 0]),
               "defective": flagged(model, [s.image for s in tests[name] if s.label == 1])}
        for other in sets:
            if other != name:
                row[other] = flagged(model, [s.image for s in tests[other] if s.label == 0])
        print(name, json.dumps({k: f"{share:.3f} (max {top:.2f})" for k, (share, top) in row.items()}), flush=True)


if __name__ == "__main__":
    main()
