"""The in-distribution check on the dev sets without training: it reads only the frozen
teacher's feature profile (stfpm.nn.feature_profile), so the pretrained teacher is all it
needs. Per set: statistics fitted on (up to 120 of) the training split, limit from (up to 60
of) the held-out split as in training (stfpm.model.ood.InDistribution.fit), then the share of each
set's test images flagged, for each profile the check can read (stfpm.model.ood.PROFILES:
the channel means it read before issue 25, the share of cells unlike training it reads now).

    python bench/ood_teacher.py --image-size 128
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import paddle

from stfpm.data import load_dataset, split_holdout
from stfpm.nn import backbone_spec
from stfpm.nn.stfpm import feature_profile, profile_layout
from stfpm.model.ood import PROFILES, InDistribution
from stfpm.training.config import load_images
from stfpm.training.loop import build_network

SETS = ("mvtec_bottle_dev", "mvtec_screw_dev", "magnetic_tile_dev", "elpv_mono_dev")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--defective", type=int, default=40, help="defective test images per set (the first ones)")
    args = ap.parse_args()
    spec, teacher = backbone_spec(args.backbone), build_network(args.backbone).teacher

    def profiles(paths: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(paths), 32):
            with paddle.no_grad():
                feats = teacher(paddle.to_tensor(load_images(paths[i:i + 32], args.image_size, spec.mean, spec.std)[0]))
            out.append(feature_profile(feats).numpy())
        return np.concatenate(out)

    sets = {}
    for name in (s for s in SETS if (args.data / s).is_dir()):
        ds = load_dataset(str(args.data / name))
        kept, held = split_holdout(ds.train, 0.2, 0)
        sets[name] = {"train": profiles([s.image for s in kept][:120]), "holdout": profiles([s.image for s in held][:60]),
                      "good": profiles([s.image for s in ds.test if s.label == 0]),
                      "defective": profiles([s.image for s in ds.test if s.label == 1][:args.defective])}
    for profile in PROFILES:
        for name, d in sets.items():
            check = InDistribution.fit(d["train"], d["holdout"], *profile_layout(args.backbone), profile=profile)
            row = {k: float((check.score(d[k]) > 1).mean()) for k in ("good", "defective")}
            row.update({other: float((check.score(o["good"]) > 1).mean()) for other, o in sets.items() if other != name})
            print(profile, name, {k: round(v, 3) for k, v in row.items()}, flush=True)


if __name__ == "__main__":
    main()
