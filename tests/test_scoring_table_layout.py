"""The score table's layout (issue 23, item 3): scores/bucket=NN/ folders by CRC-32 of
image_uri, so every row of an input lies in one bucket and the readers go bucket by bucket;
a flat table written before buckets is read as it is and moved into buckets by the first
run that ends in it (once, and a move killed midway is finished by the next)."""
from __future__ import annotations

import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_scoring import encode, make_model, texture, write_textures  # noqa: E402

from stfpm.scoring import read_scores  # noqa: E402
from stfpm.scoring.plan import plan_run  # noqa: E402
from stfpm.scoring.run import finish_run  # noqa: E402
from stfpm.scoring.sink import by_bucket, merge_stats, move_flat_files, write_file, write_table_file  # noqa: E402
from stfpm.scoring.table import BUCKETS, bucket_of, read_index, scan_shards, set_columns  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("layout") / "model", seed=0)


def _rows(plan, score: float = 0.25) -> pa.Table:
    n = len(plan.pending)
    none = lambda kind: ([None] * n, kind)  # noqa: E731
    return set_columns(plan.pending, status=(["ok"] * n, pa.string()), error=none(pa.string()),
                       error_kind=none(pa.string()), raw_score=([score] * n, pa.float64()),
                       score=([score] * n, pa.float64()), is_anomaly=([False] * n, pa.bool_()),
                       threshold=([next(iter(plan.models.values())).threshold] * n, pa.float64()), ood=none(pa.bool_()),
                       ood_score=none(pa.float64()), device=(["cpu"] * n, pa.string()),
                       width=([64] * n, pa.int32()), height=([64] * n, pa.int32()),
                       map_uri=none(pa.string()), overlay_uri=none(pa.string()))


def _files(scores: Path) -> tuple[list[Path], list[Path]]:
    """(files at the top of scores/, files in bucket folders)."""
    files = sorted(scores.rglob("*.parquet"))
    return [f for f in files if f.parent == scores], [f for f in files if f.parent != scores]


def _flat_table(model: Path, data: Path, out: Path) -> pa.Table:
    """A table written the way the code before buckets wrote it: part files at the top of
    scores/, and its _SUCCESS."""
    plan = plan_run(str(model), str(data), str(out))
    staged = out / "staged"
    write_table_file(_rows(plan), str(staged), plan.run_id, plan.schema)
    rows = pq.read_table(staged).drop_columns(["bucket"]).sort_by("image_uri")
    (out / "scores").mkdir(parents=True)
    for i in range(0, len(rows), 2):
        pq.write_table(rows.slice(i, 2), out / "scores" / f"part-{i:024x}.parquet", compression="zstd")
    for f in sorted(staged.rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    staged.rmdir()
    (out / "_SUCCESS").write_text(json.dumps({"models": {"model": {"model_version": plan.models[None].version}}}))
    return rows


def test_rows_lie_in_the_bucket_of_their_uri_and_pandas_reads_the_folders(model, tmp_path):
    write_textures(tmp_path / "data", 12)
    out = tmp_path / "out"
    plan = plan_run(str(model), str(tmp_path / "data"), str(out))
    stats = write_table_file(_rows(plan), str(out / "scores"), plan.run_id, plan.schema)
    top, bucketed = _files(out / "scores")
    assert not top and len(bucketed) == stats["files"] == len(stats["paths"]) > 1
    for f in bucketed:  # every row in the folder of its URI's CRC-32's top 4 bits
        uris = pq.read_table(f)["image_uri"].to_pylist()
        assert {f"bucket={zlib.crc32(u.encode()) >> 28:02d}" for u in uris} == {f.parent.name}
    frame = pd.read_parquet(out / "scores")  # hive-style folders: pandas adds the bucket column
    assert len(frame) == 12 and sorted(frame.image_uri) == sorted(plan.pending["image_uri"].to_pylist())
    assert sorted(set(frame.bucket.astype(int))) == sorted({int(f.parent.name[7:]) for f in bucketed})
    shards = list(scan_shards(str(out / "scores"), columns=["image_uri"]))
    assert len(shards) == len(bucketed) and sum(map(len, shards)) == 12
    uris = pa.chunked_array([[f"s3://b/{i}.png" for i in range(100)], [f"/d/{i}.png" for i in range(100)]])
    assert bucket_of(uris).tolist() == [zlib.crc32(u.encode()) >> 28 for u in uris.to_pylist()]
    assert set(bucket_of(uris, chunk=7).tolist()) == set(range(BUCKETS))


def test_a_flat_table_is_read_as_it_is_then_moved_into_buckets(model, tmp_path):
    data = tmp_path / "data"
    paths = write_textures(data, 6)
    out = tmp_path / "out"
    flat = _flat_table(model, data, out)
    top, bucketed = _files(out / "scores")
    assert len(top) == 3 and not bucketed
    # read as it is: the latest view, every row, the plan
    latest = read_scores(str(out))
    assert latest.image_uri.tolist() == flat["image_uri"].to_pylist() and (latest.score == 0.25).all()
    assert len(read_scores(str(out), latest=False)) == 6
    assert len(list(scan_shards(str(out / "scores")))) == 1  # the flat files are one shard
    again = plan_run(str(model), str(data), str(out))
    assert len(again.pending) == 0 and again.n_skipped == 6

    # a replaced file: the next run scores it, and its end moves the flat rows into buckets
    time.sleep(0.01)
    paths[2].write_bytes(encode(texture(np.random.default_rng(7))))
    run = plan_run(str(model), str(data), str(out))
    assert run.pending["image_uri"].to_pylist() == [str(paths[2])]
    written = write_table_file(_rows(run, score=0.75), str(out / "scores"), run.run_id, run.schema)["paths"]
    summary = finish_run(run, merge_stats([]), None, time.perf_counter(), written)
    top, bucketed = _files(out / "scores")
    assert not top and bucketed
    assert summary["counts"]["table_rows"] == 6 and summary["counts"]["superseded_rows_removed"] == 1
    latest = read_scores(str(out))
    assert latest.image_uri.tolist() == flat["image_uri"].to_pylist()
    assert latest.set_index("image_uri").score.to_dict() == {str(p): 0.75 if p == paths[2] else 0.25 for p in paths}
    assert len(read_index(str(out / "scores"))) == 6 and len(pd.read_parquet(out / "scores")) == 6
    assert len(plan_run(str(model), str(data), str(out)).pending) == 0  # nothing to score again


def test_a_move_killed_midway_is_finished_without_duplicates(model, tmp_path):
    write_textures(tmp_path / "data", 6)
    out = tmp_path / "out"
    flat = _flat_table(model, tmp_path / "data", out)
    top, _ = _files(out / "scores")
    for _, rows in by_bucket(pq.read_table(top[0])):  # killed after writing one file's rows, before deleting it
        write_file(rows, str(out / "scores"))
    assert len(pq.read_table(out / "scores")) == 8  # the copies, for now
    assert move_flat_files(str(out / "scores")) == 3
    top, bucketed = _files(out / "scores")
    table = pq.read_table(out / "scores").drop_columns(["bucket"]).sort_by("image_uri")
    assert not top and table.equals(flat)
    assert move_flat_files(str(out / "scores")) == 0


def test_the_plan_settles_each_input_by_its_own_models_rows(model, tmp_path):
    """A registry: an input is settled only by a row of its category's model version (the
    plan's anti-joins run per model, bucket by bucket); a category without a model is never
    settled."""
    other = make_model(tmp_path / "models" / "b-model", seed=1)
    registry = tmp_path / "models" / "registry.yaml"
    registry.write_text(f"models:\n  a: {model}\n  b: {other}\n")
    for category, n in (("a", 5), ("b", 5), ("c", 2)):
        write_textures(tmp_path / "data" / category, n, seed=ord(category))
    out = tmp_path / "out"
    args = (str(registry), str(tmp_path / "data"), str(out))
    first = plan_run(*args)
    assert len(first.pending) == 12
    rows = _registry_rows(first)
    category = pa.array(first.pending["category"].to_pylist())
    write_table_file(rows.filter(pa.compute.equal(category, "a")), str(out / "scores"), first.run_id, first.schema)
    (out / "_SUCCESS").write_text("{}")
    again = plan_run(*args)
    assert sorted(set(again.pending["category"].to_pylist())) == ["b", "c"] and len(again.pending) == 7
    # b's inputs scored by a's model version: not b's rows, still pending
    wrong = rows.filter(pa.compute.equal(category, "b"))
    wrong = wrong.set_column(wrong.column_names.index("model_version"), "model_version",
                             pa.array([first.models["a"].version] * len(wrong)))
    write_table_file(wrong, str(out / "scores"), "r2", first.schema)
    assert len(plan_run(*args).pending) == 7
    write_table_file(rows.filter(pa.compute.invert(pa.compute.equal(category, "a"))), str(out / "scores"), "r3",
                     first.schema)
    last = plan_run(*args)
    assert last.pending["category"].to_pylist() == ["c", "c"] and last.n_skipped == 10


def _registry_rows(plan) -> pa.Table:
    """ok rows for every pending input, each at its own model's threshold."""
    rows = _rows(plan)
    thresholds = [plan.models[c].threshold if c in plan.models else None for c in plan.pending["category"].to_pylist()]
    return rows.set_column(rows.column_names.index("threshold"), "threshold", pa.array(thresholds, pa.float64()))
