"""The whole+tiles views (stfpm.data.tiling `whole`, stfpm.training.views): the whole image
comes first, then its tiles; each view's map is divided by its own held-out scale and the
larger kept; `--views auto` chooses them from the training images' sizes; the card records
every choice; and on a synthetic part whose defects are either a swapped layout (only the
whole view sees it) or a pinhole (only tiles at native resolution see it) the combined
model finds both where each single view misses one."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from stfpm.data.tiling import Tiling, combine_views, two_by_two
from stfpm.model.card import ModelDirError, read_card
from stfpm.training.config import TrainConfig

PART = 256    # the synthetic part's side, 4x the model input below
INPUT = 64


def test_the_whole_view_comes_first_and_the_views_combine_by_their_scales():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (200, 310, 3), dtype=np.uint8)
    tiles_only, both = Tiling(100, 10), Tiling(100, 10, whole=True)
    cut = both.cut(image, INPUT)
    assert both.count(200, 310) == tiles_only.count(200, 310) + 1 == len(cut)
    np.testing.assert_array_equal(cut[1:], tiles_only.cut(image, INPUT))
    np.testing.assert_array_equal(cut[0], cv2.resize(image, (INPUT, INPUT), interpolation=cv2.INTER_AREA))
    maps = rng.random((len(cut), INPUT, INPUT)).astype(np.float32)
    whole, tiles = both.views(maps, 200, 310)
    assert whole.shape == tiles.shape == both.map_shape(200, 310, INPUT)
    np.testing.assert_array_equal(tiles, tiles_only.stitch(maps[1:], 200, 310))
    combined = both.stitch(maps, 200, 310, (2.0, 0.5))
    np.testing.assert_allclose(combined, np.maximum(whole / 2.0, tiles / 0.5))
    np.testing.assert_array_equal(combined, combine_views(whole, tiles, (2.0, 0.5)))
    with pytest.raises(ValueError, match="tile_view_scale"):
        both.stitch(maps, 200, 310)
    assert two_by_two(1000, 1000) == 500 and two_by_two(640, 900) == 320


def write_images(folder: Path, sizes: list[tuple[int, int]]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(str(folder / f"{i:03d}.png"))
        cv2.imwrite(paths[-1], np.full((h, w, 3), 128, np.uint8))
    return paths


@pytest.mark.parametrize("given,sizes,expected", [
    (dict(), [(160, 200)] * 5, ("whole+tiles", 80)),             # 2.5x the input: whole and 2 x 2 tiles
    (dict(), [(120, 300)] * 5, ("whole", None)),                 # short side under 2x: whole only
    (dict(), [(100, 100), (600, 600), (600, 600)], ("whole+tiles", 300)),  # the median image decides
    (dict(tile_size=96), [(600, 600)] * 3, ("tiles", 96)),       # an explicit --tile keeps the tiles-only model
    (dict(views="whole+tiles"), [(100, 100)] * 3, ("whole+tiles", 50)),  # asked for: tiles even when small
    (dict(views="whole+tiles", tile_size=64), [(600, 600)] * 3, ("whole+tiles", 64)),
    (dict(views="whole"), [(600, 600)] * 3, ("whole", None)),
])
def test_views_auto_decides_from_the_training_images_sizes(tmp_path, given, sizes, expected):
    from stfpm.training.views import resolve_views

    paths = write_images(tmp_path, sizes)
    cfg = resolve_views(TrainConfig(image_size=INPUT, **given).resolved(), paths)
    assert (cfg.views, cfg.tile_size) == expected
    assert (cfg.tiling is not None and cfg.tiling.whole) == (expected[0] == "whole+tiles")
    if given.get("views", "auto") == "auto" and "tile_size" not in given:
        evidence = cfg.views_evidence
        assert evidence["median_short_side"] == sorted(min(s) for s in sizes)[len(sizes) // 2]
        assert evidence["ratio"] == pytest.approx(evidence["median_short_side"] / INPUT, abs=1e-3)


def test_a_bad_views_choice_is_refused_naming_it():
    with pytest.raises(ValueError, match="views must be one of"):
        TrainConfig(views="both").resolved()
    with pytest.raises(ValueError, match="views 'tiles' needs tile_size"):
        TrainConfig(views="tiles").resolved()
    with pytest.raises(ValueError, match="views 'whole' does not tile"):
        TrainConfig(views="whole", tile_size=128).resolved()


def stripes(rng: np.random.Generator, angle: float, period: float) -> np.ndarray:
    y, x = np.mgrid[0:PART // 2, 0:PART // 2]
    t = np.cos(np.deg2rad(angle)) * x + np.sin(np.deg2rad(angle)) * y
    return 128 + 80 * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))


def part(rng: np.random.Generator, defect: str | None = None) -> np.ndarray:
    """A fixed-layout part: four striped quadrants, each with its own direction. "swap": two
    quadrants trade places (every tile still looks like a good tile); "pinhole": a dark dot of
    7 px (2 px at the whole view's 64-px input, 3.5 in a 128-px tile)."""
    quads = [stripes(rng, a, p) for a, p in ((0, 12), (90, 12), (45, 16), (135, 16))]
    if defect == "swap":
        quads[0], quads[1] = quads[1], quads[0]
    gray = np.clip(np.block([[quads[0], quads[1]], [quads[2], quads[3]]]) + rng.normal(0, 6, (PART, PART)), 0, 255)
    image = cv2.merge([gray.astype(np.uint8)] * 3)
    if defect == "pinhole":
        y, x = rng.integers(20, PART - 20, 2)
        cv2.circle(image, (int(x), int(y)), 3, (0, 0, 0), -1)
    return image


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("views") / "part"
    rng = np.random.default_rng(0)
    for i in range(16):
        (root / "train" / "good").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "train" / "good" / f"{i:03d}.png"), part(rng))
    for kind in ("good", "swap", "pinhole"):
        (root / "test" / kind).mkdir(parents=True, exist_ok=True)
        for i in range(8):
            cv2.imwrite(str(root / "test" / kind / f"{i:03d}.png"), part(rng, None if kind == "good" else kind))
    return root


def test_whole_plus_tiles_find_what_either_view_alone_misses(parts, tmp_path):
    """PatchCore (deterministic, seconds) on the synthetic part: the whole view finds the
    swapped layout and misses the pinhole, the tiles the other way round, and the auto views
    (the whole image and its 2 x 2 tiles at native resolution) find both."""
    from sklearn.metrics import roc_auc_score

    from stfpm.model.inference import Predictor
    from stfpm.training.run import train

    auroc = {}
    for views, tile in (("whole", None), ("tiles", 128), ("auto", None)):
        out = tmp_path / views
        train(str(parts), str(out), TrainConfig(model="patchcore", image_size=INPUT, views=views, tile_size=tile,
                                                bank_fraction=0.25), progress=False)
        predictor = Predictor.open(out)
        scores = {kind: [p.score for p in predictor.predict(
            [f.read_bytes() for f in sorted((parts / "test" / kind).iterdir())])] for kind in ("good", "swap", "pinhole")}
        auroc[views] = {kind: roc_auc_score([0] * 8 + [1] * 8, scores["good"] + scores[kind])
                        for kind in ("swap", "pinhole")}
    card = read_card(tmp_path / "auto")
    assert (card.input.tile_size, card.input.tile_whole) == (128, True)  # 256 px at a 64-px input: 4x
    assert card.recipe["views"] == "whole+tiles" and card.recipe["views_evidence"]["ratio"] == 4.0
    assert len(card.map.tile_view_scale) == 2
    whole_bank, tiles_bank = card.patchcore["view_banks"]  # a bank per view, each an untiled bank's size
    assert whole_bank + tiles_bank == card.patchcore["bank_size"]
    assert whole_bank == read_card(tmp_path / "whole").patchcore["bank_size"]
    whole, tiles, both = auroc["whole"], auroc["tiles"], auroc["auto"]
    assert whole["swap"] >= 0.95 and tiles["swap"] <= 0.8, auroc      # the layout shows only whole
    assert tiles["pinhole"] >= 0.7 and whole["pinhole"] <= 0.6, auroc  # the pinhole only in tiles
    assert both["swap"] >= 0.95 and both["pinhole"] >= whole["pinhole"] + 0.15, auroc


def test_a_patchcore_model_with_a_bank_per_view_exports_and_searches_each_view_in_its_own(parts, tmp_path):
    """The ONNX export of a per-view-bank model gives the model directory's scores, and a
    forward that does not say which inputs are whole views falls back to the nearer bank."""
    from typer.testing import CliRunner

    from stfpm.cli import app
    from stfpm.model.inference import Predictor
    from stfpm.training.run import train

    model = tmp_path / "model"
    train(str(parts), str(model), TrainConfig(model="patchcore", image_size=INPUT, bank_fraction=0.1), progress=False)
    images = [f.read_bytes() for kind in ("good", "pinhole") for f in sorted((parts / "test" / kind).iterdir())[:3]]
    predictor = Predictor.open(model)
    ours = [p.score for p in predictor.predict(images)]
    done = CliRunner().invoke(app, ["export", str(model), "--out", str(tmp_path / "onnx"), "--format", "onnx"])
    assert done.exit_code == 0, done.output
    np.testing.assert_allclose([p.score for p in Predictor.open(tmp_path / "onnx").predict(images)], ours, rtol=1e-4)
    inputs = [predictor.prepare(b) for b in images[:2]]
    tiles = np.concatenate([x.tiles for x in inputs])
    rows = predictor.view_rows([len(x.tiles) for x in inputs])
    assert rows.tolist() == [True] + [False] * 4 + [True] + [False] * 4
    own, _ = predictor.tile_forward(tiles, rows)
    nearer, _ = predictor.tile_forward(tiles)
    assert np.all(nearer <= own + 1e-5)  # the views' patches lie far apart: the nearer bank is mostly the own one


def test_an_stfpm_model_with_both_views_trains_records_and_exports_alike(parts, tmp_path):
    """STFPM with the auto views: each epoch trains on every image's whole view and one of
    its tiles; the card records the views and their scales; the threshold is a quantile of
    the combined held-out scores; an ONNX export and a card without the scales behave."""
    from typer.testing import CliRunner

    from stfpm.cli import app
    from stfpm.model.inference import Predictor
    from stfpm.training.run import train

    model = tmp_path / "model"
    result = train(str(parts), str(model), TrainConfig(epochs=1, image_size=INPUT, batch_size=8), progress=False)
    card = read_card(model)
    assert card.input.tile_whole and card.input.tile_size == 128 and card.recipe["views"] == "whole+tiles"
    assert result.history[0]["images_per_s"] > 0
    log = [json.loads(line) for line in (model / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 1
    predictor = Predictor.open(model)
    goods = [f.read_bytes() for f in sorted((parts / "test" / "good").iterdir())]
    predictions = predictor.predict(goods)
    assert all(p.anomaly_map.shape == (PART, PART) for p in predictions)
    done = CliRunner().invoke(app, ["export", str(model), "--out", str(tmp_path / "onnx"), "--format", "onnx"])
    assert done.exit_code == 0, done.output
    exported = [p.score for p in Predictor.open(tmp_path / "onnx").predict(goods)]
    np.testing.assert_allclose(exported, [p.score for p in predictions], rtol=1e-4)
    doc = json.loads((model / "model.json").read_text())
    del doc["map"]["tile_view_scale"]
    (model / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelDirError, match=r"map\.tile_view_scale"):
        read_card(model)
    doc["input"]["tile_size"] = None
    (model / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelDirError, match=r"input\.tile_whole"):
        read_card(model)


def test_an_stfpm_epoch_trains_on_each_image_whole_and_one_tile():
    from stfpm.training.loop import epoch_rows

    keys = [f"{name}#{k}" for name in ("a.png", "b.png", "c#1.png") for k in range(5)]
    seen = set()
    for epoch in range(1, 41):
        rows = epoch_rows(keys, Tiling(128, 0, whole=True), epoch, seed=0)
        picked = [keys[r] for r in rows]
        assert [k.rsplit("#", 1)[0] for k in picked] == ["a.png", "a.png", "b.png", "b.png", "c#1.png", "c#1.png"]
        assert all(k.endswith("#0") for k in picked[::2]) and not any(k.endswith("#0") for k in picked[1::2])
        seen.update(picked)
        shuffled = keys[::-1]  # a Ray Train worker sees its rows in any order: the picks do not depend on it
        assert {shuffled[r] for r in epoch_rows(shuffled, Tiling(128, 0, whole=True), epoch, 0)} == set(picked)
    assert seen == set(keys)  # over the epochs every tile is trained on
    assert epoch_rows(keys, Tiling(128, 0), 1, 0) is None and epoch_rows(keys, None, 1, 0) is None
