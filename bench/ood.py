"""The in-distribution check on real images, through trained model directories: one model
per dev set and model kind, then the share of each set's test images that each model flags
as `ood` (model.predict, as a user sees it).

    python bench/ood.py --out /tmp/ood-models --model patchcore --image-size 256
    python bench/ood.py --out /tmp/ood-models --model stfpm --epochs 1 --image-size 128

The check does not depend on the student (it compares the frozen teacher's feature profile
with training), so a short training measures it. Rows: the model; columns: the test images
(its own good and defective ones, the other sets' good ones); a cell is the flagged share
(and the largest ood_score). "good" is the false-flag rate, "defective" the share of real
defects taken for "wrong model", the other sets the misrouted categories caught. Needs
../shared/data (skips a missing set). --json writes the figures.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from stfpm import create_model
from stfpm.data import load_dataset
from stfpm.training.config import TrainConfig
from stfpm.training.run import train

SETS = ("mvtec_bottle_dev", "mvtec_screw_dev", "magnetic_tile_dev", "elpv_mono_dev")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MODEL_NAMES = {"stfpm": "STFPM", "patchcore": "PatchCore"}


def flagged(model, paths: list[str]) -> dict:
    """Share flagged ood, how many, and the largest ood_score over `paths`."""
    scores = np.array([r["ood_score"] for r in model.predict(paths, batch_size=16)])
    return {"share": float((scores > 1).mean()), "flagged": int((scores > 1).sum()), "of": len(scores),
            "max_score": float(scores.max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the models")
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--model", choices=sorted(MODEL_NAMES), default="stfpm")
    ap.add_argument("--epochs", type=int, default=1, help="STFPM only")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--sets", default=",".join(SETS), help="comma-separated dev sets")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    sets = [s for s in args.sets.split(",") if (args.data / s).is_dir()]
    if not sets:
        raise SystemExit(f"none of the dev sets {args.sets} is under {args.data} (pass --data)")
    tests = {s: load_dataset(str(args.data / s)).test for s in sets}
    figures = {}
    for name in sets:
        model_dir = args.out / f"{args.model}-{args.image_size}" / name
        started = time.perf_counter()
        if not (model_dir / "model.json").is_file():
            cfg = TrainConfig(backbone=args.backbone, model=args.model, image_size=args.image_size,
                              epochs=args.epochs if args.model == "stfpm" else None)
            train(str(args.data / name), str(model_dir), cfg, progress=False)
        trained = time.perf_counter()
        model = create_model(MODEL_NAMES[args.model], model_dir=model_dir)
        row = {"good": flagged(model, [s.image for s in tests[name] if s.label == 0]),
               "defective": flagged(model, [s.image for s in tests[name] if s.label == 1])}
        for other in sets:
            if other != name:
                row[other] = flagged(model, [s.image for s in tests[other] if s.label == 0])
        figures[name] = row
        print(name, f"(train {trained - started:.0f} s, predict {time.perf_counter() - trained:.0f} s)",
              json.dumps({k: f"{v['flagged']}/{v['of']} = {v['share']:.3f} (max {v['max_score']:.2f})"
                          for k, v in row.items()}), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                             "figures": figures}, indent=1))


if __name__ == "__main__":
    main()
