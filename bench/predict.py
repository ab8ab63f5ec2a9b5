"""Prediction speed: our batched predictor vs a PaddleX-style baseline, same images, one process.

Baseline (what PaddleX's STFPM predictor does): one image per forward pass, dynamic graph,
full ResNet18 teacher and student including layer4 (computed, then thrown away), the map
thresholded at a hard-coded 0.01 into a 256x256 mask. Ours: `create_model(...).predict`
with batches (maps resized back to each input, scores, normalised scores, masks), on its
default CPU engine (Paddle Inference + oneDNN) and, to show where the gain comes from, on
the dynamic graph (`--engines onednn,dygraph`).

    python bench/predict.py --n 64 --batch-size 16

Prints images/s for each and their ratio; both use random weights (speed does not depend
on their values) so it runs offline. Also reports efficientnet_lite0 and batch-1 latency.
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
import paddle  # noqa: E402
import paddle.nn.functional as F  # noqa: E402

from stfpm import create_model  # noqa: E402
from stfpm.model.artifact import load_model, save_model  # noqa: E402
from stfpm.model.card import Calibration, InputSpec, ModelCard  # noqa: E402
from stfpm.model.inference import Predictor  # noqa: E402
from stfpm.nn import STFPM  # noqa: E402


def make_images(folder: Path, n: int, size: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        img = cv2.GaussianBlur(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), (5, 5), 0)
        paths.append(str(folder / f"img_{i:04d}.png"))
        cv2.imwrite(paths[-1], img)
    return paths


def make_model_dir(folder: Path, backbone: str, size: int) -> Path:
    paddle.seed(0)
    card = ModelCard(model_name="STFPM", backbone=backbone, input=InputSpec.for_backbone(backbone, size),
                     calibration=Calibration(0.5, 0.0, 1.0))
    save_model(STFPM(backbone), folder / backbone, card)
    return folder / backbone


class PaddleXStyleSTFPM:
    """Full paddle.vision ResNet18 pair; features of layer1-3 used, layer4 still computed."""

    def __init__(self):
        paddle.seed(0)
        self.teacher = paddle.vision.models.resnet18()
        self.student = paddle.vision.models.resnet18()
        self.teacher.eval()
        self.student.eval()

    @staticmethod
    def _features(net, x):
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        f1 = net.layer1(x)
        f2 = net.layer2(f1)
        f3 = net.layer3(f2)
        net.layer4(f3)  # PaddleX's backbone returns layer4 too; STFPM discards it
        return [f1, f2, f3]

    def predict_one(self, path: str) -> np.ndarray:
        img = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
        img = cv2.resize(img, (256, 256)).astype(np.float32) / 255
        img = (img - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        x = paddle.to_tensor(img.transpose(2, 0, 1)[None].astype(np.float32))
        with paddle.no_grad():
            amap = None
            for t, s in zip(self._features(self.teacher, x), self._features(self.student, x)):
                d = 0.5 * paddle.sum((F.normalize(t, axis=1) - F.normalize(s, axis=1)) ** 2, axis=1, keepdim=True)
                d = F.interpolate(d, size=[256, 256], mode="bilinear", align_corners=False)
                amap = d if amap is None else amap * d
        amap = amap.numpy()[0, 0]
        return np.where(amap > 0.01, 255, 0).astype(np.uint8)


def rate(fn, n: int, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="images")
    ap.add_argument("--image-size", type=int, default=256, help="side of the input files")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many passes")
    ap.add_argument("--engines", default="onednn,dygraph", help="predictor engines to measure")
    ap.add_argument("--backbones", default="resnet18,efficientnet_lite0")
    args = ap.parse_args()
    from stfpm.runtime import configure_threads

    threads = configure_threads()  # the same for baseline and ours (Paddle's default is 1)
    print(f"paddle {paddle.__version__}, {threads} CPU threads for both")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp, args.n, args.image_size)
        baseline = PaddleXStyleSTFPM()
        baseline.predict_one(paths[0])  # warm-up
        base = rate(lambda: [baseline.predict_one(p) for p in paths], args.n, args.repeats)
        print(f"paddlex-style resnet18 (batch 1, full ResNet18, 0.01 mask): {base:7.2f} img/s")
        for backbone in args.backbones.split(","):
            model = create_model(model_dir=make_model_dir(tmp, backbone, 256))
            for engine in args.engines.split(","):
                model.predictor = Predictor.from_model(load_model(model.model_dir), engine=engine)
                list(model.predict(paths[: args.batch_size], batch_size=args.batch_size))  # warm-up
                ours = rate(lambda m=model: list(m.predict(paths, batch_size=args.batch_size)), args.n, args.repeats)
                list(model.predict(paths[:1], batch_size=1))  # warm-up of the batch-1 shape
                one = rate(lambda m=model: list(m.predict(paths[:16], batch_size=1)), 16, args.repeats)
                print(f"stfpm {backbone:<18} {engine:<7} batch {args.batch_size:>3}: {ours:7.2f} img/s "
                      f"({ours / base:.2f}x baseline); batch 1: {one:6.2f} img/s = {1000 / one:6.1f} ms/image "
                      f"({one / base:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
