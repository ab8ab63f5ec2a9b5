"""Can a teacher's features see a category's defects at all, before any student is trained?

    python bench/teacher_knn.py ../shared/data/mvtec_screw_dev --backbone efficientnet_lite2

A PatchCore-style probe: the stride-4 and stride-8 taps of the frozen teacher, pooled to
stride 8 and L2-normalised per tap, from every other train/good image form a memory bank
(40,000 random patches); an image's score is its largest nearest-neighbour patch distance.
Prints the image AUROC. A teacher that scores near chance here cannot help STFPM; one that
scores well while STFPM does not points at the student or at the map.
"""
from __future__ import annotations

import argparse
import warnings

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.nn.functional as F  # noqa: E402

from stfpm.data import load_dataset, preprocess, read_image  # noqa: E402
from stfpm.metrics import auroc  # noqa: E402
from stfpm.nn import backbone_spec  # noqa: E402
from stfpm.runtime import configure_threads  # noqa: E402
from stfpm.training.loop import build_network  # noqa: E402


def patch_features(teacher, spec, paths: list[str], size: int) -> np.ndarray:
    out = []
    for start in range(0, len(paths), 16):
        images = [read_image(p) for p in paths[start:start + 16]]
        with paddle.no_grad():
            f4, f8, _ = teacher(paddle.to_tensor(preprocess(images, size, spec.mean, spec.std)))
            f4 = F.normalize(F.avg_pool2d(f4, 3, stride=2, padding=1), axis=1)
            f8 = F.normalize(F.avg_pool2d(f8, 3, stride=1, padding=1), axis=1)
            out.append(paddle.concat([f4, f8], axis=1).numpy())
    feats = np.concatenate(out)
    return feats.transpose(0, 2, 3, 1).reshape(len(feats), -1, feats.shape[1])  # (N, patches, C)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--bank", type=int, default=40000, help="patches kept in the memory bank")
    args = ap.parse_args()
    configure_threads()
    dataset = load_dataset(args.data)
    spec = backbone_spec(args.backbone)
    teacher = build_network(args.backbone).teacher
    teacher.eval()
    bank = patch_features(teacher, spec, [s.image for s in dataset.train[::2]], args.image_size)
    bank = bank.reshape(-1, sum(spec.channels[:2]))
    rng = np.random.default_rng(0)
    bank = bank[rng.choice(len(bank), min(len(bank), args.bank), replace=False)]
    bank_sq = (bank ** 2).sum(1)
    test = patch_features(teacher, spec, [s.image for s in dataset.test], args.image_size)
    scores = []
    for patches in test:
        d2 = (patches ** 2).sum(1)[:, None] + bank_sq[None] - 2 * patches @ bank.T
        scores.append(float(np.sqrt(np.maximum(d2.min(1), 0)).max()))
    labels = np.array([s.label for s in dataset.test])
    print(f"{args.backbone} teacher kNN image AUROC on {args.data}: {auroc(labels, np.array(scores)):.3f}")


if __name__ == "__main__":
    main()
