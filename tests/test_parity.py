"""Scores must not depend on which door an image comes in by: the same JPEGs (300-1024 px,
some with an EXIF orientation, most large enough to be decoded at reduced scale) scored by
`predict`, `evaluate` and `stfpm score` give the same raw scores, and the threshold stored in
model.json decides in all three; also for a tiled model (model.json input.tile_size), whose
images are cut into tiles at full resolution and whose maps are stitched, and for the
whole+tiles views (input.tile_whole), whose whole-image and tile maps are combined."""
from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from stfpm.model.artifact import save_model
from stfpm.model.card import Calibration, InputSpec, MapSpec, ModelCard, read_card, write_card
from stfpm.data.tiling import tiling_of
from stfpm.cli import app
from stfpm.data import decode_image, load_dataset
from stfpm.evaluate import evaluate_model

SIZE = 64
# (name, width, height, EXIF orientation or None): 1/8, 1/4 and 1/2 scale decodes and a full one
JPEGS = [("good/a.jpg", 1024, 768, None), ("good/b.jpg", 640, 480, 6), ("good/c.jpg", 300, 420, None),
         ("good/d.jpg", 900, 600, 3), ("crack/e.jpg", 1024, 1024, 8), ("crack/f.jpg", 512, 384, None),
         ("crack/g.jpg", 333, 301, 6), ("crack/h.jpg", 800, 1000, None)]


def with_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an EXIF APP1 segment holding one tag: Orientation (0x0112)."""
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def picture(rng, width: int, height: int, defect: bool) -> np.ndarray:
    """Smooth texture with detail at every scale (so decoding at reduced scale changes pixels)."""
    image = cv2.resize(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8), (width, height),
                       interpolation=cv2.INTER_CUBIC)
    image = cv2.add(image, rng.integers(0, 40, (height, width, 3), dtype=np.uint8))
    if defect:
        cv2.line(image, (width // 4, height // 3), (width // 2, height // 2), (255, 255, 255), max(3, width // 60))
    return image


@pytest.fixture(scope="module", params=[None, (256, 32), (256, 32, True)], ids=["whole", "tiled", "whole+tiles"])
def workspace(tmp_path_factory, request) -> Path:
    """An MVTec-layout folder of JPEGs and a random-weight Lite0 model (input 64; untiled,
    tiles of 256 px sharing 32, or the whole image and those tiles) whose stored threshold is the median of the test images'
    scores (so decisions are mixed)."""
    import paddle

    from stfpm.model.inference import Predictor
    from stfpm.nn import STFPM

    root = tmp_path_factory.mktemp("parity")
    rng = np.random.default_rng(0)
    data = root / "data"
    for i in range(3):
        (data / "train" / "good").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(data / "train" / "good" / f"{i}.png"), picture(rng, 96, 96, False))
    for name, width, height, orientation in JPEGS:
        path = data / "test" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        jpeg = cv2.imencode(".jpg", picture(rng, width, height, "crack" in name), [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
        path.write_bytes(with_orientation(jpeg.tobytes(), orientation) if orientation else jpeg.tobytes())
    paddle.seed(0)
    model = root / "model"
    save_model(STFPM("efficientnet_lite0"), model, ModelCard(
        model_name="STFPM", backbone="efficientnet_lite0",
        input=InputSpec.for_backbone("efficientnet_lite0", SIZE, tiling_of(*request.param) if request.param else None),
        map=MapSpec(tile_view_scale=(1.0, 2.0) if request.param and len(request.param) == 3 else None),
        calibration=Calibration(0.0, 0.0, 1.0)))
    paths = [str(data / "test" / name) for name, *_ in JPEGS]
    scores = [p.score for p in Predictor.open(model).predict([Path(p).read_bytes() for p in paths], paths)]
    write_card(model, dataclasses.replace(read_card(model), calibration=Calibration(
        float(np.median(scores)), min(scores), max(scores), source="test")))
    return root


def test_the_jpegs_exercise_orientation_and_reduced_decoding(workspace):
    for name, width, height, orientation in JPEGS:
        image = decode_image((workspace / "data" / "test" / name).read_bytes(), name)
        assert image.shape[:2] == ((width, height) if orientation in (6, 8) else (height, width)), name
        reduced = decode_image((workspace / "data" / "test" / name).read_bytes(), name, min_side=SIZE)
        assert reduced.shape[0] < image.shape[0] or min(width, height) < 2 * SIZE, name


def test_predict_evaluate_and_score_agree(workspace):
    from stfpm import create_model, load_model

    data, model_dir = workspace / "data", workspace / "model"
    threshold = read_card(model_dir).calibration.threshold
    predicted = {r["input_path"]: r for r in create_model(model_dir=model_dir).predict(str(data / "test"), batch_size=3)}
    evaluated = {r["image"]: r for r in evaluate_model(load_model(model_dir), load_dataset(data), batch_size=5)["images"]}
    result = CliRunner().invoke(app, ["score", str(model_dir), str(data / "test"), str(workspace / "audit"),
                                      "--batch-size", "4", "--cpus-per-actor", "0.5"])
    assert result.exit_code == 0, result.output
    layout = json.loads((workspace / "audit" / "_SUCCESS").read_text())["layout"]
    assert layout["fused"] is True and layout["actors"][0] >= 1  # score's own local Ray: fused actors
    table = pd.read_parquet(workspace / "audit" / "scores").set_index("image_uri")
    assert set(predicted) == set(evaluated) == set(table.index) and len(table) == len(JPEGS)
    decisions = set()
    for uri, res in predicted.items():
        raw = res["score"]
        for other in (evaluated[uri]["score"], table.loc[uri, "raw_score"]):
            assert other == pytest.approx(raw, rel=1e-4), uri
        assert res["is_anomaly"] == evaluated[uri]["is_anomaly"] == bool(table.loc[uri, "is_anomaly"]) == (
            raw >= threshold), uri
        assert table.loc[uri, "threshold"] == res["threshold"] == threshold
        h, w = res["anomaly_map"].shape
        assert (table.loc[uri, "height"], table.loc[uri, "width"]) == (h, w), uri  # maps at the full size
        decisions.add(res["is_anomaly"])
    assert decisions == {True, False}
