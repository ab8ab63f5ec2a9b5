"""The driver's side of scoring in Arrow (issue 23) and a re-run's identity (issue 24, item 4):
what is already scored is (image_uri, input_version, model_version) scored with the
threshold this run uses; a model is its model_version, whatever its directory is called;
the end of a run compacts the files it wrote and those that held its inputs' rows only."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_scoring import _ray_teardown, encode, make_model, ray_local, pipeline_rows, texture, write_textures  # noqa: E402,F401

from stfpm.scoring import read_scores  # noqa: E402
from stfpm.scoring.plan import plan_run  # noqa: E402
from stfpm.scoring.sink import remove_superseded, write_table_file  # noqa: E402
from stfpm.scoring.sources import list_inputs, read_manifest  # noqa: E402
from stfpm.scoring.table import read_index  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("driver") / "model", seed=0)


def test_rows_of_another_threshold_are_not_already_scored(model, tmp_path):
    write_textures(tmp_path / "data", 3)
    out = str(tmp_path / "out")
    plan = plan_run(str(model), str(tmp_path / "data"), out)
    threshold = plan.models[None].threshold
    write_table_file(pipeline_rows(plan, ["ok", "error", "error"], [None, "input", "transient"], threshold),
                     f"{out}/scores", plan.run_id, plan.schema)
    assert plan_run(str(model), str(tmp_path / "data"), out).n_skipped == 2
    # another threshold: the ok row is scored again; the bad file stays settled (no threshold in it)
    other = plan_run(str(model), str(tmp_path / "data"), out, threshold=threshold + 0.25)
    assert other.n_skipped == 1 and len(other.pending) == 2
    assert other.pending["image_uri"].to_pylist() == sorted(other.pending["image_uri"].to_pylist())


def test_compaction_looks_at_the_runs_files_and_those_of_its_inputs_only(model, tmp_path):
    data = write_textures(tmp_path / "data", 4)
    out = tmp_path / "out"
    scores = str(out / "scores")
    first = plan_run(str(model), str(tmp_path / "data"), str(out))
    threshold = first.models[None].threshold
    settled = write_table_file(pipeline_rows(first, ["ok"] * 4, [None] * 4, threshold).filter(pa.array(
        [True, True, False, False])), scores, first.run_id, first.schema)["paths"]
    failed = pipeline_rows(first, ["error"] * 4, ["transient"] * 4, threshold)
    retried = sorted(write_table_file(failed.slice(i, 1), scores, first.run_id, first.schema)["paths"][0]
                     for i in (2, 3))
    (out / "_SUCCESS").write_text("{}")  # that run finished
    again = plan_run(str(model), str(tmp_path / "data"), str(out))
    assert again.pending["image_uri"].to_pylist() == [str(p) for p in data[2:]]
    assert again.table_files == retried  # the file of the settled inputs is not looked at
    before = [Path(f).stat().st_mtime_ns for f in settled]
    rows = pipeline_rows(again, ["ok"] * 2, [None] * 2, threshold)
    written = write_table_file(rows, scores, again.run_id, again.schema)["paths"]
    assert remove_superseded(scores, sorted({*again.table_files, *written})) == 2
    assert [Path(f).stat().st_mtime_ns for f in settled] == before and not any(Path(f).exists() for f in retried)
    index = read_index(scores)
    assert len(index) == 4 and index["status"].to_pylist() == ["ok"] * 4
    # a run killed before its compaction (no _SUCCESS) left two rows of one input: the next
    # run compacts the whole table
    write_table_file(pipeline_rows(first, ["ok"] * 4, [None] * 4, threshold).slice(0, 1), scores, "killed", first.schema)
    (out / "_SUCCESS").unlink()
    later = plan_run(str(model), str(tmp_path / "data"), str(out))
    assert len(later.pending) == 0 and later.table_files is None
    assert remove_superseded(scores, later.table_files) == 1 and len(read_index(scores)) == 4


def test_manifests_and_listings_become_arrow_columns(tmp_path):
    paths = write_textures(tmp_path / "d" / "line=l1" / "cam", 2)
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": [str(paths[1]), "d/./line=l1/cam/0.png", f"{tmp_path}//d/line=l1/cam/1.png",
                                     "s3://bucket/k/x.png"],
                             "input_version": ["v1", None, None, "v9"]}), manifest)
    uris, extra = read_manifest(str(manifest))
    assert isinstance(uris, pa.Array) and uris.to_pylist() == [str(paths[1]), str(paths[0]), str(paths[1]),
                                                              "s3://bucket/k/x.png"]
    table = list_inputs(str(manifest), ["line", "kind"])
    assert table["image_uri"].to_pylist() == [str(paths[0]), str(paths[1]), "s3://bucket/k/x.png"]
    assert table["input_version"].to_pylist()[1:] == ["v1", "v9"]  # the first of a URI named twice
    assert table["input_version"][0].as_py().startswith(f"{paths[0].stat().st_size}-")  # looked up
    folder = list_inputs(str(tmp_path / "d"), ["line", "kind"])
    assert folder["line"].to_pylist() == ["l1", "l1"] and folder["kind"].to_pylist() == ["cam", "cam"]


@pytest.mark.usefixtures("ray_local")
def test_a_copied_model_directory_and_a_new_threshold(model, tmp_path):
    """Issue 24, item 4: a `cp -r` of the model scoring into the same OUTPUT skips everything
    (same model_version) and read_scores still shows every input; --threshold on a re-run
    scores again with that threshold instead of keeping the other threshold's rows."""
    from stfpm.scoring import score

    data = tmp_path / "data"
    write_textures(data, 4)
    out = str(tmp_path / "out")
    first = score(str(model), str(data), out, batch_size=2, verbose=False)
    assert first["counts"]["ok"] == 4
    copy = tmp_path / "copied-model"
    subprocess.run(["cp", "-r", str(model), str(copy)], check=True)
    again = score(str(copy), str(data), out, batch_size=2, verbose=False)
    assert again["counts"]["scored"] == 0 and again["counts"]["skipped_already_scored"] == 4
    assert again["counts"]["latest_rows"] == 4 and len(read_scores(out)) == 4  # was 0 rows
    low = score(str(copy), str(data), out, batch_size=2, threshold=0.001, verbose=False)
    assert low["counts"]["scored"] == 4 and low["counts"]["table_rows"] == 4  # the other threshold's rows replaced
    latest = read_scores(out)
    assert len(latest) == 4 and (latest.threshold == 0.001).all() and latest.is_anomaly.all()
    assert len(read_scores(out, latest=False)) == 4  # one row per input and model version
    success = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert success["models"]["copied-model"]["threshold"] == 0.001
    back = score(str(model), str(data), out, batch_size=2, verbose=False)  # the model's own threshold again
    assert back["counts"]["scored"] == 4 and (read_scores(out).threshold == first["models"]["model"]["threshold"]).all()
    assert not (tmp_path / "out" / "_pending").exists() or not any((tmp_path / "out" / "_pending").iterdir())


def test_s3_prefixes_are_listed_concurrently_and_completely(s3_env):
    """Item 5: the first levels are listed with a delimiter and the prefixes below them at
    once; the same objects as the one sequential pass, files at every level included."""
    import boto3

    from stfpm.scoring import sources
    from stfpm.storage import filesystem_for

    s3 = boto3.client("s3")
    keys = [f"in/cam{c}/day{d}/{i}.png" for c in range(3) for d in range(4) for i in range(5)]
    keys += ["in/top.png", "in/cam0/mid.png", "in/cam1/day0/deep/x/y.png", "other/no.png"]
    for key in keys:
        s3.put_object(Bucket=s3_env, Key=key, Body=b"x")
    fs, root = filesystem_for(f"s3://{s3_env}/in")
    every = sorted(i.path for i in sources.s3_files(fs, root, workers=1))
    assert every == sorted(f"{s3_env}/{k}" for k in keys if k.startswith("in/"))
    for workers, levels in ((4, 1), (16, 2), (2, 3)):
        assert sorted(i.path for i in sources.s3_files(fs, root, workers=workers, levels=levels)) == every
    listed = sources.list_files(f"s3://{s3_env}/in/", (".png",))
    assert [f.uri for f in listed] == [f"s3://{p}" for p in every]
