"""Batch scoring on a real local Ray: local folders, S3 (moto server) in and out, awkward and
broken files, re-runs, a model registry, and GPU actors on a fake-GPU cluster.

Each pipeline run costs ~10 s here (Ray Data's fixed overhead plus actor start), so the
images are tiny (64 px, model input 64) and the runs few."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from stfpm.model.card import ModelDirError
from stfpm.scoring import map_to_raw, score
from stfpm.scoring.plan import plan_run
from stfpm.scoring.progress import ScoringProgress, progress_text
from stfpm.scoring.run import build_pipeline, parse_actors
from stfpm.scoring.sources import list_inputs, resolve_models
from stfpm.scoring.table import image_id
from stfpm.scoring.table import read_index, table_schema
from stfpm.runtime import paddle_device
from stfpm.model.score_scale import ScoreScale
from test_images import cmyk_jpeg, hand_png, png_chunk

REPO = Path(__file__).resolve().parents[1]

SIZE = 64


# ------------------------------------------------------------------------------- fixtures

def make_model(path: Path, seed: int) -> Path:
    """A random-weight STFPM (efficientnet_lite0) model directory with input 64."""
    import paddle

    from stfpm.model.artifact import save_model
    from stfpm.model.card import Calibration, InputSpec, ModelCard
    from stfpm.nn import STFPM

    paddle.seed(seed)
    card = ModelCard(model_name="STFPM", backbone="efficientnet_lite0",
                     input=InputSpec.for_backbone("efficientnet_lite0", SIZE), calibration=Calibration(0.0, 0.0, 1.0))
    save_model(STFPM("efficientnet_lite0"), path, card)
    return path


def with_threshold_at_median(model_dir: Path, images: list[np.ndarray]) -> None:
    """Threshold = median score of `images`, range = their min..max: mixed decisions."""
    from stfpm.model.card import Calibration, read_card, write_card
    from stfpm.model.inference import Predictor

    scores = [p.score for p in Predictor.open(model_dir).predict(images)]
    calibration = Calibration(float(np.median(scores)), min(scores), max(scores))
    write_card(model_dir, dataclasses.replace(read_card(model_dir), calibration=calibration))


def texture(rng, h=SIZE, w=SIZE) -> np.ndarray:
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)


def encode(image: np.ndarray, ext: str = ".png") -> bytes:
    return cv2.imencode(ext, image)[1].tobytes()


def write_textures(folder: Path, names: int | list[str], seed: int = 0) -> list[Path]:
    """PNG textures under `folder` (made if missing): `names`, or 0.png .. n-1.png for a count."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / (f"{i}.png" if isinstance(names, int) else i) for i in (range(names) if isinstance(names, int) else names)]
    for p in paths:
        p.write_bytes(encode(texture(rng)))
    return paths


def pipeline_rows(plan, status: list[str], kinds: list[str | None], threshold: float | None = None) -> pa.Table:
    """plan.pending as the stages would leave it: the given status and error kind per row, scored
    at `threshold` (default: the plan's model's; a row of another threshold is not "already scored")."""
    from stfpm.scoring.table import set_columns

    n = len(plan.pending)
    threshold = next(iter(plan.models.values())).threshold if threshold is None else threshold
    return set_columns(plan.pending, status=(status, pa.string()),
                       error=([None if s == "ok" else "x: y" for s in status], pa.string()),
                       error_kind=(kinds, pa.string()), raw_score=([1.0] * n, pa.float64()),
                       score=([0.5] * n, pa.float64()), is_anomaly=([False] * n, pa.bool_()),
                       threshold=([threshold] * n, pa.float64()), ood=([None] * n, pa.bool_()),
                       ood_score=([None] * n, pa.float64()), device=(["cpu"] * n, pa.string()),
                       width=([64] * n, pa.int32()), height=([64] * n, pa.int32()),
                       map_uri=([None] * n, pa.string()), overlay_uri=([None] * n, pa.string()))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height over a few bytes of pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 100))
            + png_chunk(b"IEND", b""))


BAD_FILES = {  # name -> (bytes maker, reason expected in the error column)
    "empty.png": (lambda rng: b"", "empty file"),
    "notes.jpg": (lambda rng: b"not an image at all\n", "not a PNG, JPEG"),
    "cut.png": (lambda rng: encode(texture(rng))[:300], "truncated or corrupt PNG"),
    "cut.jpg": (lambda rng: encode(texture(rng), ".jpg")[:-200], "truncated or corrupt JPEG"),
    "bomb.png": (lambda rng: png_claiming(10**5, 10**5), "above max_pixels"),
    "float.tiff": (lambda rng: encode(texture(rng).astype(np.float32) / 255, ".tiff"), "unsupported pixel type"),
}


def write_dataset(root: Path, rng) -> dict[str, np.ndarray]:
    """category a and b: good PNGs, odd modes decode_image converts, a large JPEG (decoded at
    reduced scale), broken files; plus files that must not be listed. Returns the readable
    images by path."""
    good = {}
    for category in ("a", "b"):
        for i in range(3):
            good[f"{category}/{i}.png"] = texture(rng)
    good["a/wide.png"] = texture(rng, 48, 80)
    good["b/large.jpg"] = texture(rng, 300, 200)  # >= 2x the input on both sides
    for rel, image in good.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(encode(image, Path(rel).suffix))
    (root / "a" / "deep" / "x").mkdir(parents=True)
    cv2.imwrite(str(root / "a" / "deep" / "x" / "gray16.png"), (texture(rng)[..., 0].astype(np.uint16) * 257))
    (root / "b" / "palette.png").write_bytes(hand_png(4, 4, 3, bytes(range(4)) * 4, plte=bytes(range(12))))
    (root / "b" / "cmyk.jpg").write_bytes(cmyk_jpeg())
    for name, (make, _) in BAD_FILES.items():
        (root / "b" / name).write_bytes(make(rng))
    (root / "root-level.png").write_bytes(encode(texture(rng)))
    (root / "README.txt").write_text("not listed: extension")
    (root / "a" / ".thumbs").mkdir()
    (root / "a" / ".thumbs" / "t.png").write_bytes(encode(texture(rng)))
    return good


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    rng = np.random.default_rng(0)
    good = write_dataset(root / "data", rng)
    model = make_model(root / "model", seed=0)
    with_threshold_at_median(model, [good[k] for k in sorted(good) if k.endswith(".png")])
    return root, good


@pytest.fixture(scope="module")
def _ray_teardown():
    yield
    ray.shutdown()


@pytest.fixture
def ray_local(_ray_teardown, s3_server):
    """A 2-CPU local Ray whose workers can reach the moto S3 server (its dummy credentials,
    the same as the s3_env fixture's). Re-started if a test shut it down."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {
            "AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}})
    yield


def listed_files(data: Path) -> set[str]:
    return {str(p) for p in data.rglob("*") if p.is_file() and p.suffix != ".txt" and ".thumbs" not in p.parts}


def read_table(output) -> pd.DataFrame:
    return pd.read_parquet(Path(output) / "scores")


# ---------------------------------------------------------------------------------- tests

def test_local_folder_end_to_end(workspace, ray_local):
    from stfpm.model.inference import Predictor

    root, good = workspace
    out = root / "out-e2e"
    summary = score(str(root / "model"), str(root / "data"), str(out), partitions=["category", "line"],
                    batch_size=4, overlays=True, threads_per_actor=2, verbose=False)  # more threads than CPUs
    df = read_table(out)
    files = listed_files(root / "data")
    assert sorted(df.image_uri) == sorted(files)                       # one row per input file
    assert pq.read_schema(next((out / "scores").rglob("part-*.parquet"))) == table_schema(["category", "line"])
    assert (df.image_id == df.image_uri.map(image_id)).all()
    rows = df.set_index("image_uri")
    data = root / "data"
    assert rows.loc[str(data / "a/deep/x/gray16.png"), ["category", "line"]].tolist() == ["a", "deep"]
    assert rows.loc[str(data / "root-level.png"), ["category", "line"]].isna().all()

    for name, (_, reason) in BAD_FILES.items():                        # broken files: error rows
        row = rows.loc[str(data / "b" / name)]
        assert row.status == "error" and row.error.startswith("decode: ") and reason in row.error
        assert pd.isna(row.map_uri) and pd.isna(row.raw_score)
    odd = [data / "a/deep/x/gray16.png", data / "b/palette.png", data / "b/cmyk.jpg"]
    assert (rows.loc[[str(p) for p in odd], "status"] == "ok").all()   # converted by decode_image

    ok = df[df.status == "ok"]
    assert len(ok) == len(files) - len(BAD_FILES)
    meta = json.loads((root / "model" / "model.json").read_text())
    cal = meta["threshold"]
    assert (ok.model_version == meta["model_version"]).all() and (ok.model_name == "model").all()
    assert (ok.is_anomaly == (ok.raw_score >= cal["value"])).all() and 0 < ok.is_anomaly.sum() < len(ok)
    scale = ScoreScale.from_range(cal["score_min"], cal["score_max"], cal["value"])  # no stored scale: its range
    assert np.allclose(ok.score, scale.normalize(ok.raw_score, cal["value"]))
    assert ok.ood.isna().all() and ok.ood_score.isna().all()           # random weights: no calibration

    # scores are the one Predictor's, maps are at the input's size with the documented scaling
    predictor = Predictor.open(root / "model")
    pngs = sorted(k for k in good if k.endswith(".png"))
    expected = {str(data / k): p.score for k, p in zip(pngs, predictor.predict([good[k] for k in pngs]))}
    assert np.allclose(rows.loc[list(expected), "raw_score"], list(expected.values()), rtol=1e-5)
    success = json.loads((out / "_SUCCESS").read_text())
    for uri, row in ok.set_index("image_uri").iterrows():
        heat = cv2.imread(row.map_uri, cv2.IMREAD_UNCHANGED)
        assert heat.dtype == np.uint8 and heat.shape == (row.height, row.width)
        assert Path(row.map_uri).name == f"{image_id(uri)}.png" and row.model_version in row.map_uri
        if (row.height, row.width) == (SIZE, SIZE):                    # no resize: exact
            assert heat.max() == round(255 * row.score)
            back = map_to_raw(heat, row.threshold, success["models"]["model"]["log_scale"])  # the exact inverse
            assert abs(scale.normalize(back.max(), row.threshold) - row.score) <= 0.5 / 255 + 1e-9
        assert pd.isna(row.overlay_uri) != row.is_anomaly              # overlays for anomalous inputs only
    large = rows.loc[str(data / "b/large.jpg")]
    assert (large.width, large.height) == (200, 300)                   # full size, though decoded at 1/2

    assert success == summary and success["counts"]["scored"] == len(files)
    assert success["counts"]["error"] == len(BAD_FILES)
    assert success["models"]["model"]["model_version"] == meta["model_version"]
    assert set(success["stages"]) == {"read", "decode", "predict", "maps", "table"}
    assert success["devices"] == ["cpu"]


def test_fused_actors_write_what_the_separate_stages_write(workspace, ray_local, tmp_path):
    """--fused (one machine): the actors also decode and write maps; every row, error and map
    is the same as with decoding and maps in their own tasks."""
    root, _ = workspace
    runs = {}
    for fused in (False, True):
        out = tmp_path / f"fused-{fused}"
        summary = score(str(root / "model"), str(root / "data"), str(out), batch_size=4, overlays=True,
                        fused=fused, verbose=False)
        assert set(summary["stages"]) == {"read", "decode", "predict", "maps", "table"}
        df = read_table(out).set_index("image_uri").sort_index()
        df["map_png"] = [None if pd.isna(u) else Path(u).read_bytes() for u in df.map_uri]
        runs[fused] = df
    columns = ["status", "error", "error_kind", "raw_score", "score", "is_anomaly", "height", "width", "map_png"]
    pd.testing.assert_frame_equal(runs[True][columns], runs[False][columns])
    assert runs[True].overlay_uri.notna().sum() == runs[False].overlay_uri.notna().sum() > 0


def test_progress_lines_and_bar():
    assert progress_text(25, 100, 5.0, bar=False) == "scored 25/100 rows (25%), 5.0 images/s, ETA 00:00:15"
    assert progress_text(50, 100, 10.0, bar=True) == "[" + "#" * 15 + "." * 15 + "] 50/100 rows  5.0 images/s  ETA 00:00:10"
    assert progress_text(0, 100, 3.0, bar=False).endswith("0.0 images/s, ETA --:--:--")
    stream = io.StringIO()
    with ScoringProgress(10, stream=stream, bar=False, interval=0.2) as progress:
        progress.add(4)
        deadline = time.monotonic() + 60
        while "scored 4/10 rows (40%)" not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.1)
        progress.add(6)
    lines = stream.getvalue().splitlines()
    assert "scored 4/10 rows (40%)" in lines[0] and lines[-1].startswith("scored 10/10 rows (100%)")
    assert len(lines) == len(set(lines))  # a line only when the count moved, and the final one


def test_rerun_skips_scored_inputs_and_finishes_a_killed_run(workspace, ray_local, tmp_path, capfd):
    root, _ = workspace
    out = tmp_path / "out"
    args = (str(root / "model"), str(root / "data"), str(out))
    first = score(*args, batch_size=4, rows_per_file=4)  # verbose: the report and the progress lines
    n = len(listed_files(root / "data"))
    assert f"scored {n}/{n} rows (100%)" in capfd.readouterr().err
    files = sorted((out / "scores").rglob("part-*.parquet"))
    assert len(files) >= 3 and first["counts"]["scored"] == len(listed_files(root / "data"))

    # a run killed midway: its _SUCCESS never written, one table file never written, a
    # temp file of an unfinished write left behind (readers skip names starting with ".")
    (out / "_SUCCESS").unlink()
    lost = set(pq.read_table(files[0])["image_uri"].to_pylist())
    files[0].unlink()
    (out / "scores" / ".part-unfinished.parquet.tmp").write_bytes(b"PAR1 half a file")
    second = score(*args, batch_size=4, rows_per_file=4, verbose=False, progress=True)  # as the demo runs it
    err, k = capfd.readouterr().err, second["counts"]["scored"]
    assert f"scored {k}/{k} rows (100%)" in err and "inputs listed" not in err
    df = read_table(out)
    assert sorted(df.image_uri) == sorted(listed_files(root / "data"))  # exactly one row each
    assert second["counts"]["scored"] == len(lost)                       # only the lost rows: bad files
    assert second["counts"]["superseded_rows_removed"] == 0              # are settled (error_kind "input")
    assert set(df[df.status == "error"].error_kind) == {"input"}

    third = score(*args, batch_size=4, verbose=False)                   # complete: nothing to score
    assert third["counts"]["scored"] == 0 and (out / "_SUCCESS").is_file()
    assert sorted(read_table(out).image_uri) == sorted(listed_files(root / "data"))
    assert len(read_index(str(out / "scores"))) == len(listed_files(root / "data"))


def test_s3_input_model_and_output(workspace, ray_local, s3_env):
    """Inputs, the model directory (fetched inside the actors) and the output all on S3."""
    import pyarrow.fs as pafs

    from stfpm.storage import filesystem_for, write_bytes

    root, _ = workspace
    bucket = s3_env
    for path in (root / "model").iterdir():
        write_bytes(f"s3://{bucket}/models/m/{path.name}", path.read_bytes())
    data = root / "data"
    inputs = ["a/0.png", "a/1.png", "b/large.jpg", "b/empty.png", "b/cut.png"]
    for rel in inputs:
        write_bytes(f"s3://{bucket}/line3/2026-11-25/{rel}", (data / rel).read_bytes())
    output = f"s3://{bucket}/audits/2026-11-25"
    summary = score(f"s3://{bucket}/models/m", f"s3://{bucket}/line3/2026-11-25/", output + "/",
                    partitions=["category"], batch_size=2, verbose=False)

    fs, path = filesystem_for(output)
    table = pq.read_table(f"{path}/scores", filesystem=fs).to_pandas().set_index("image_uri")
    assert sorted(table.index) == sorted(f"s3://{bucket}/line3/2026-11-25/{rel}" for rel in inputs)
    assert table.status.value_counts().to_dict() == {"ok": 3, "error": 2}
    assert table.loc[f"s3://{bucket}/line3/2026-11-25/b/large.jpg", "category"] == "b"
    for map_uri in table.map_uri.dropna():
        assert map_uri.startswith(f"{output}/maps/") and fs.get_file_info(map_uri[5:]).type == pafs.FileType.File
    assert json.loads(fs.open_input_stream(f"{path}/_SUCCESS").read())["counts"]["scored"] == 5
    assert summary["models"]["m"]["uri"] == f"s3://{bucket}/models/m"
    # rerun: nothing new to score (the two error rows are bad files, settled for this content)
    assert score(f"s3://{bucket}/models/m", f"s3://{bucket}/line3/2026-11-25/", output,
                 partitions=["category"], verbose=False)["counts"]["scored"] == 0


def test_registry_scores_each_category_with_its_own_model(workspace, ray_local, tmp_path):
    """Through the CLI: `stfpm score registry.yaml DATA OUT` on the running Ray."""
    from typer.testing import CliRunner

    from stfpm.cli import app

    root, good = workspace
    other = make_model(tmp_path / "models" / "b-model", seed=1)
    registry = tmp_path / "models" / "registry.yaml"
    registry.write_text(f"models:\n  a: {root / 'model'}\n  b: b-model\n")  # relative to the YAML
    data = tmp_path / "data"
    for rel in ("a/0.png", "b/0.png", "b/1.png", "c/0.png"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(encode(good[rel if rel[0] != "c" else "a/1.png"]))
    result = CliRunner().invoke(app, ["score", str(registry), str(data), str(tmp_path / "out"), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert f"table: {tmp_path / 'out'}/scores" in result.output
    df = read_table(tmp_path / "out").set_index("category")
    versions = {c: json.loads((p / "model.json").read_text())["model_version"]
                for c, p in (("a", root / "model"), ("b", other))}
    assert df.loc["a", "model_version"] == versions["a"] and df.loc["a", "model_name"] == "a"
    assert (df.loc["b", "model_version"] == versions["b"]).all() and (df.loc["b", "status"] == "ok").all()
    assert df.loc["c", "status"] == "error" and "no model for category 'c'" in df.loc["c", "error"]
    result = CliRunner().invoke(app, ["score", str(registry), str(data), str(tmp_path / "out2"),
                                      "--partitions", "line"])
    assert result.exit_code == 2 and "error: a model registry picks the model by the 'category' column" in result.output


def test_load_stage_turns_every_failure_into_an_error_row(tmp_path):
    """The decode stage alone (no Ray): files gone since listing, files over max_bytes, and
    headers claiming sizes no column can hold become error rows; the batch never fails."""
    from stfpm.scoring.stages import load_images

    rng = np.random.default_rng(0)
    (tmp_path / "ok.png").write_bytes(encode(texture(rng)))
    (tmp_path / "big.png").write_bytes(encode(texture(rng, 256, 256)))
    (tmp_path / "liar.png").write_bytes(png_claiming(0xFFFFFFFF, 7))
    uris = [str(tmp_path / n) for n in ("ok.png", "gone.png", "big.png", "liar.png")]
    none = pa.array([None] * 4, pa.string())
    batch = pa.table({"image_uri": uris, "status": none, "error": none, "error_kind": none,
                      "_size": pa.array([SIZE] * 4, pa.int32())})
    out = load_images(batch, max_pixels=10**8, max_bytes=len((tmp_path / "ok.png").read_bytes()) + 1).to_pydict()
    assert out["status"] == ["ok", "error", "error", "error"]
    assert out["error_kind"] == [None, "input", "input", "input"]
    assert out["error"][1].startswith("read: no such file")
    assert out["error"][2].startswith("read: file is") and "above max_bytes" in out["error"][2]
    assert out["error"][3].startswith("decode: ") and out["width"][3] is None and out["height"][3] == 7
    assert len(out["_image"][0]) == SIZE * SIZE * 3 and (out["height"][0], out["width"][0]) == (SIZE, SIZE)


def test_manifests_list_exactly_their_entries(tmp_path):
    data = tmp_path / "data"
    (data / "x").mkdir(parents=True)
    for name in ("1.png", "2.jpg"):
        (data / "x" / name).write_bytes(b"")
    (tmp_path / "list.txt").write_text("# inputs\ndata/x/1.png\n\ndata/x/2.jpg\ndata/x/1.png\nmissing.bmp\n")
    table = list_inputs(str(tmp_path / "list.txt"), ["folder"])
    assert table["image_uri"].to_pylist() == [str(data / "x/1.png"), str(data / "x/2.jpg"),
                                              str(tmp_path / "missing.bmp")]
    assert table["folder"].to_pylist() == ["data", "data", None]  # levels under the entries' common folder
    manifest = pa.table({"uri": ["s3://b/k/2.png", "s3://b/k/1.png"], "line": ["l2", "l1"], "note": ["x", "y"]})
    pq.write_table(manifest, tmp_path / "m.parquet")
    table = list_inputs(str(tmp_path / "m.parquet"), ["line", "folder"])  # line from the column, folder from paths
    assert table.select(["image_uri", "size_bytes", "line", "folder"]).to_pydict() == {
        "image_uri": ["s3://b/k/1.png", "s3://b/k/2.png"], "size_bytes": [None, None],
        "line": ["l1", "l2"], "folder": [None, None]}
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_inputs(str(tmp_path / "nowhere"), [])
    with pytest.raises(ModelDirError, match="model.json"):
        resolve_models(str(tmp_path))


@pytest.mark.parametrize("gpus", [0, 1])
def test_decoding_stays_out_of_the_actors(workspace, ray_local, tmp_path, capsys, gpus):
    """Ray Data fuses a task stage into the actor stage after it when their resources match;
    the pipeline must keep decoding in its own CPU tasks, with CPU or GPU actors."""
    root, _ = workspace
    plan = plan_run(str(root / "model"), str(root / "data" / "a"), str(tmp_path / "out"))
    ds, _ = build_pipeline(plan, batch_size=4, gpus_per_actor=gpus)
    ds.explain()
    physical = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[MapBatches(load_images)]" in physical
    assert "ActorPoolMapOperator[MapBatches(ScoreActor)]" in physical
    # a Ray of a few CPUs gets no per-stage reservations: with them, the maps stage waited for
    # decoding and prediction to end (bench/RESULTS.md, issue 14)
    assert ds.context.op_resource_reservation_enabled is False


def test_map_writing_tasks_never_import_paddle():
    """The maps stage's module and the heat-map helpers load without Paddle (1-4 s per worker)."""
    code = ("import sys, stfpm.model.heatmap, stfpm.scoring.stages, stfpm.scoring.sink; "
            "sys.exit('paddle' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO))).returncode == 0


def test_plan_makes_local_uris_absolute_and_skips_its_own_output(workspace, tmp_path, monkeypatch):
    root, _ = workspace
    (tmp_path / "data" / "x").mkdir(parents=True)
    (tmp_path / "data" / "x" / "1.png").write_bytes(b"")
    (tmp_path / "data" / "out" / "maps").mkdir(parents=True)
    (tmp_path / "data" / "out" / "maps" / "old.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    plan = plan_run(str(root / "model"), "data", "data/out/", partitions=["kind"])
    assert plan.output == str(tmp_path / "data" / "out")
    assert plan.pending["image_uri"].to_pylist() == [str(tmp_path / "data" / "x" / "1.png")]
    assert plan.pending["kind"].to_pylist() == ["x"] and plan.n_skipped == 0
    with pytest.raises(ValueError, match="score"):
        plan_run(str(root / "model"), "data", "out", partitions=["score"])


def test_actor_counts_and_gpu_device_mapping():
    assert parse_actors("1..8") == (1, 8) and parse_actors("3") == (3, 3) and parse_actors(2) == (2, 2)
    with pytest.raises(ValueError):
        parse_actors("4..2")
    assert paddle_device([], None, True) == ("cpu", "cpu")
    assert paddle_device([3], "3", True) == ("gpu:0", "gpu:0 (ray gpu 3)")      # Ray set CUDA_VISIBLE_DEVICES
    assert paddle_device([3], "1,3", True) == ("gpu:1", "gpu:1 (ray gpu 3)")
    assert paddle_device([2], None, True) == ("gpu:2", "gpu:2 (ray gpu 2)")
    assert paddle_device([1], "1", False)[0] == "cpu"


def test_score_fuses_the_stages_only_on_a_local_ray_of_its_own():
    """On the local Ray score starts itself (no GPUs): fused actors, one per CPU, capped; on a
    Ray that was already running, or with GPU actors: separate stages and one actor; what
    the caller gives is kept."""
    from stfpm.scoring.run import MAX_LOCAL_ACTORS, choose_layout

    own = dict(gpus_per_actor=0, cpus_per_actor=1, own_local_ray=True)
    assert choose_layout(None, None, cpus=2, **own) == (True, (2, 2))
    assert choose_layout(None, None, cpus=64, **own) == (True, (MAX_LOCAL_ACTORS, MAX_LOCAL_ACTORS))
    assert choose_layout(None, None, cpus=4, **{**own, "cpus_per_actor": 2}) == (True, (2, 2))
    assert choose_layout(None, None, cpus=2, **{**own, "cpus_per_actor": 0.5}) == (True, (2, 2))  # one per CPU
    assert choose_layout(None, "1..3", cpus=2, **own) == (True, (1, 3))
    assert choose_layout(False, None, cpus=2, **own) == (False, (1, 1))
    assert choose_layout(None, None, cpus=8, **{**own, "gpus_per_actor": 1}) == (False, (1, 1))
    assert choose_layout(None, None, cpus=8, **{**own, "own_local_ray": False}) == (False, (1, 1))
    assert choose_layout(True, None, cpus=8, **{**own, "own_local_ray": False}) == (True, (1, 1))
    with pytest.raises(ValueError, match="actors must be"):
        choose_layout(None, "3..1", cpus=2, **own)


def test_actors_may_not_take_every_cpu_of_a_local_ray():
    """Measured: 2 actors x 1 CPU on ray.init(num_cpus=2) leave no CPU for decoding and the
    run waits forever without an error; score() refuses that on a Ray it starts itself."""
    from stfpm.scoring.run import check_cpus_left_for_decoding

    check_cpus_left_for_decoding(1, 1, 2)
    check_cpus_left_for_decoding(2, 0.5, 2)
    with pytest.raises(ValueError, match=r"2 scoring actor\(s\) x 1 CPU take all 2 CPUs.*--cpus-per-actor.*0\.5"):
        check_cpus_left_for_decoding(2, 1, 2)


def test_gpu_actors_run_on_the_gpu_ray_assigns(workspace, tmp_path, private_ray_tmpdir):
    """A CPU-only head (decoding) and a node with 2 fake GPUs: each actor asks for a GPU and
    records the one Ray gave it (Paddle here has no CUDA, so the forward runs on the CPU).
    The cluster is advertised in a private RAY_TMPDIR only: other Rays on the machine never
    take it for theirs."""
    from ray.cluster_utils import Cluster

    root, _ = workspace
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        cluster.add_node(num_cpus=2, num_gpus=2)
        ray.init(address=cluster.address)
        summary = score(str(root / "model"), str(root / "data" / "a"), str(tmp_path / "out"), batch_size=2,
                        actors=2, gpus_per_actor=1, wait_for_actors_s=120, verbose=False)
    finally:
        ray.shutdown()
        cluster.shutdown()
    df = read_table(tmp_path / "out")
    assert summary["counts"]["ok"] == len(df) == 5
    pattern = r"cpu \(ray gpu (\d) assigned; paddle built without CUDA\)"
    ids = {int(re.fullmatch(pattern, device).group(1)) for device in df.device}
    assert ids and ids <= {0, 1}
