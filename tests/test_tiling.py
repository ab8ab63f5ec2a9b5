"""Tiling (stfpm.data.tiling): tiles cover every pixel with the overlap asked for, stitching
puts each tile's map back where it came from, and a model trained with --tile records it so
that training's calibration, predict, an export and the card all cut the same tiles."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from stfpm.model.card import ModelDirError, read_card
from stfpm.cli import app
from stfpm.data.images import prepare_input
from stfpm.data.tiling import Tiling, starts


@pytest.mark.parametrize("length,size,overlap", [(1000, 256, 0), (1000, 256, 64), (256, 256, 32), (257, 256, 0),
                                                 (100, 256, 0), (4000, 512, 100)])
def test_tiles_cover_the_side_with_the_overlap_asked_for(length, size, overlap):
    offsets = starts(length, size, overlap)
    assert offsets[0] == 0 and offsets == sorted(set(offsets))
    if length <= size:
        assert offsets == [0]
        return
    assert offsets[-1] == length - size  # the last tile ends at the edge: no pixel left out
    shared = [a + size - b for a, b in zip(offsets, offsets[1:])]
    assert min(shared) >= overlap
    assert len(offsets) == 1 or len(starts(length, size, overlap)) <= length // (size - overlap) + 1  # no more than needed


def test_tiling_refuses_a_bad_size_or_overlap():
    for size, overlap in ((8, 0), (256, 256), (256, -1), (256.0, 0), (True, 0)):
        with pytest.raises(ValueError, match="tile"):
            Tiling(size, overlap)


@pytest.mark.parametrize("tile,model_size", [(64, 64), (96, 64), (48, 64)])
def test_stitching_puts_each_tile_map_back_where_it_came_from(tile, model_size):
    """Tile maps that are the tiles themselves (one channel) stitch back into the image at the
    tiles' model scale, overlaps included, and a short side's mirrored padding is cropped off."""
    rng = np.random.default_rng(0)
    tiling = Tiling(tile, tile // 4)
    for h, w in ((200, 310), (40, 150), (tile, tile)):
        image = cv2.resize(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8), (w, h))
        tiles = tiling.cut(image, model_size)
        assert tiles.shape == (tiling.count(h, w), model_size, model_size, 3)
        stitched = tiling.stitch(tiles[..., 0].astype(np.float32), h, w)
        assert stitched.shape == tiling.map_shape(h, w, model_size)
        expected = cv2.resize(image[..., 0], stitched.shape[::-1], interpolation=cv2.INTER_AREA).astype(np.float32)
        if tile == model_size:
            np.testing.assert_array_equal(stitched, image[..., 0])  # the source's own resolution
        else:
            assert np.abs(stitched - expected).mean() < 6  # resampling, not misplacement (that gives ~50)


def test_a_tiled_input_is_decoded_at_full_resolution():
    jpeg = cv2.imencode(".jpg", np.full((1024, 768, 3), 128, np.uint8))[1].tobytes()
    whole = prepare_input(jpeg, 64)
    tiled = prepare_input(jpeg, 64, tiling=Tiling(256, 0))
    assert whole.pixels.shape == (64, 64, 3) and whole.tiles.shape == (1, 64, 64, 3)
    assert tiled.pixels.shape == (12, 64, 64, 3) and (tiled.height, tiled.width) == (1024, 768)


@pytest.fixture(scope="module")
def tiled_model(tmp_path_factory) -> Path:
    """A 1-epoch Lite0 model trained with --tile 96 --tile-overlap 16 on 160-px synthetic images."""
    root = tmp_path_factory.mktemp("tiled")
    runner = CliRunner()
    done = runner.invoke(app, ["synth", str(root / "data"), "--n-train", "10", "--n-test", "4", "--size", "160"])
    assert done.exit_code == 0, done.output
    done = runner.invoke(app, ["train", str(root / "data"), "--out", str(root / "model"), "--backbone",
                               "efficientnet_lite0", "--epochs", "1", "--image-size", "64", "--batch-size", "8",
                               "--tile", "96", "--tile-overlap", "16"])
    assert done.exit_code == 0, done.output
    return root


def test_training_records_the_tiling_and_calibrates_on_whole_images(tiled_model):
    from stfpm.model.inference import Predictor

    card = read_card(tiled_model / "model")
    assert (card.input.tile_size, card.input.tile_overlap) == (96, 16)
    assert card.recipe["tile_size"] == 96
    holdout = json.loads((tiled_model / "model" / "model.json").read_text())["validation"]
    assert holdout["n_rows"] == 4 * holdout["n_images"]  # 160 px in tiles of 96 sharing >= 16: 2 x 2 each
    predictor = Predictor.open(tiled_model / "model")
    goods = sorted((tiled_model / "data" / "train" / "good").iterdir())
    p = predictor.predict([goods[0].read_bytes()])[0]
    assert p.anomaly_map.shape == (160, 160)  # stitched at the tiles' model scale, then resized to the image
    assert p.score >= float(p.anomaly_map.max()) > 0.9 * p.score  # the score: the stitched map's max
    # the threshold is a quantile of whole images' scores: of the maximum over each image's tiles
    cal = card.calibration
    assert cal.details["n_images"] == holdout["n_images"]


def test_an_export_tiles_as_the_model_does(tiled_model):
    from stfpm.model.inference import Predictor

    model, exported = tiled_model / "model", tiled_model / "exported"
    done = CliRunner().invoke(app, ["export", str(model), "--out", str(exported)])
    assert done.exit_code == 0, done.output
    assert "Tile" in (exported / "inference.yml").read_text()
    images = [p.read_bytes() for p in sorted((tiled_model / "data" / "test").rglob("*.png"))]
    ours = [p.score for p in Predictor.open(model).predict(images)]
    theirs = [p.score for p in Predictor.open(exported).predict(images)]
    np.testing.assert_allclose(theirs, ours, rtol=1e-4)


def test_a_card_with_a_bad_tiling_is_refused_naming_the_key(tiled_model, tmp_path):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(tiled_model / "model", broken)
    doc = json.loads((broken / "model.json").read_text())
    for bad, key in (({"tile_size": 4}, "input.tile_size"), ({"tile_size": 96, "tile_overlap": 96}, "input.tile_size"),
                     ({"tile_size": None, "tile_overlap": 8}, "input.tile_overlap"),
                     ({"tile_size": "96"}, "input.tile_size")):
        (broken / "model.json").write_text(json.dumps({**doc, "input": {**doc["input"], **bad}}))
        with pytest.raises(ModelDirError, match=key.replace(".", r"\.")):
            read_card(broken)


def test_train_refuses_a_bad_tile_naming_it(tmp_path):
    from stfpm.training.config import TrainConfig

    with pytest.raises(ValueError, match="tile overlap"):
        TrainConfig(backbone="efficientnet_lite0", tile_size=64, tile_overlap=64).resolved()
    with pytest.raises(ValueError, match="tile_overlap needs tile_size"):
        TrainConfig(backbone="efficientnet_lite0", tile_overlap=8).resolved()


def test_ray_train_reads_a_tiled_image_as_one_row_per_tile(tmp_path):
    """Ray Train's decode (run here without Ray) gives the rows and cache keys one-process training does."""
    from stfpm.raytrain.driver import _decode_resize
    from stfpm.training.config import load_images

    paths = []
    for i, (h, w) in enumerate(((160, 160), (100, 250))):
        paths.append(str(tmp_path / f"{i}.png"))
        cv2.imwrite(paths[-1], np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8))
    rows = _decode_resize({"bytes": [Path(p).read_bytes() for p in paths], "path": np.array(paths)}, 64, 96, 16)
    batch, keys = load_images(paths, 64, (0.5,) * 3, (0.25,) * 3, Tiling(96, 16))
    assert list(rows["path"]) == keys == [f"{paths[0]}#{k}" for k in range(4)] + [f"{paths[1]}#{k}" for k in range(6)]
    assert rows["image"].shape == (10, 64, 64, 3)  # 2 x 2 tiles and 2 x 3
    np.testing.assert_allclose((rows["image"] / 255.0 - 0.5) / 0.25, batch.transpose(0, 2, 3, 1), atol=1e-5)


def test_patchcore_builds_its_bank_from_tiles(tiled_model, tmp_path):
    out = tmp_path / "pc"
    done = CliRunner().invoke(app, ["train", str(tiled_model / "data"), "--out", str(out), "--model", "patchcore",
                                    "--backbone", "efficientnet_lite0", "--image-size", "64", "--tile", "96"])
    assert done.exit_code == 0, done.output
    card = read_card(out)
    assert card.input.tile_size == 96 and card.patchcore["pool_size"] >= 4 * 8  # 8 training images, 4 tiles each
    from stfpm.model.inference import Predictor

    image = sorted((tiled_model / "data" / "test").rglob("*.png"))[0].read_bytes()
    assert Predictor.open(out).predict([image])[0].anomaly_map.shape == (160, 160)
