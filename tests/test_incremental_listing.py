"""Incremental nightly listing (issue 23, item 5): a `{date}` source lists only the days a run
needs, and manifests that carry size and modification time (our Parquet, S3 Inventory CSV
and Parquet) give the same input_version a listing gives, with no HEAD or stat per entry."""
from __future__ import annotations

import gzip
import os
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_scoring import _ray_teardown, encode, make_model, ray_local, texture, write_textures  # noqa: E402,F401

from stfpm.audit import run as audit  # noqa: E402
from stfpm.audit.config import AuditConfig  # noqa: E402
from stfpm.errors import UserError  # noqa: E402
from stfpm.scoring import score  # noqa: E402
from stfpm.runtime import configure_logging  # noqa: E402
from stfpm.scoring.dates import DateTemplate, days_to_list, parse_days  # noqa: E402
from stfpm.scoring.plan import plan_run  # noqa: E402
from stfpm.scoring.sources import list_inputs  # noqa: E402

D1, D2, D3, D4 = (date(2026, 12, d) for d in (1, 2, 3, 4))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("dated") / "model", seed=0)


def test_bad_date_templates_are_one_line_errors(tmp_path):
    for bad, says in [("/d/{date}/{date}/", "exactly one"), ("/d/{day}/", "exactly one"),
                      ("/d/{date:%Y-%m}/", "does not name a day"), ("/d/{date}/{cam}/", "only {date}"),
                      ("s3://{date}/x/", "not the bucket"), ("{date}/x", "first level")]:
        with pytest.raises(UserError, match=says):
            DateTemplate.parse(bad)
    with pytest.raises(UserError, match="--dates"):
        parse_days("2026-12-40")
    with pytest.raises(UserError, match="ends before"):
        parse_days("2026-12-03..2026-12-01")
    assert parse_days("2026-12-01..2026-12-03") == [D1, D2, D3]
    with pytest.raises(UserError, match="source: .*does not name a day"):  # the audit config: exit 2 at load
        AuditConfig(output=str(tmp_path / "o"), models="m", source=str(tmp_path / "{date:%m-%d}"))
    with pytest.raises(UserError, match="dates apply to a source with"):
        score("any-model", str(tmp_path), str(tmp_path / "out"), dates=[D1])


def test_which_days_a_run_lists(tmp_path):
    """After a finished run: its day less the look-back, to today; before any: the day folders that exist."""
    template = DateTemplate.parse(str(tmp_path / "line3" / "day={date:%Y%m%d}"))
    for d in (D1, D3):
        (tmp_path / "line3" / f"day={d:%Y%m%d}").mkdir(parents=True)
    (tmp_path / "line3" / "day=notadate").mkdir()
    (tmp_path / "line3" / "other").mkdir()
    now = datetime(2026, 12, 5, 2, 0, tzinfo=timezone.utc)
    assert days_to_list(template, None, now) == [D1, D3]
    assert days_to_list(template, None, now, since=datetime(2026, 12, 2, tzinfo=timezone.utc)) == [D3]
    last = datetime(2026, 12, 3, 23, 50, tzinfo=timezone.utc)
    assert days_to_list(template, last, now) == [D2, D3, D4, date(2026, 12, 5)]
    assert days_to_list(template, last, now, lookback_days=0) == [D3, D4, date(2026, 12, 5)]
    nested = DateTemplate.parse("s3://b/cam/{date:%Y/%m/%d}/")
    assert nested.root == "s3://b/cam" and nested.uri(D2) == "s3://b/cam/2026/12/02/"


def test_a_dated_folder_source_lists_only_its_days(tmp_path, capsys):
    configure_logging()  # as the CLI and jobs do: the warning is a line on stderr, whatever ran before
    for d, names in ((D1, ["a.png"]), (D2, ["b.png", "c.png"]), (D3, ["d.png"])):
        write_textures(tmp_path / "line3" / d.isoformat() / "cam1", names)
    source = str(tmp_path / "line3" / "{date}")
    table = list_inputs(source, ["day", "camera"], dates=[D2, D3, D4])
    assert [Path(u).name for u in table["image_uri"].to_pylist()] == ["b.png", "c.png", "d.png"]
    assert table["day"].to_pylist() == ["2026-12-02", "2026-12-02", "2026-12-03"]  # levels from the template's root
    assert table["camera"].to_pylist() == ["cam1"] * 3
    err = capsys.readouterr().err
    assert "1 of 3 day folders" in err and "2026-12-04" in err
    assert len(list_inputs(source, [])) == 4  # no dates given: every day folder that exists
    empty = list_inputs(source, ["day"], dates=[D4])
    assert len(empty) == 0 and empty.column_names == ["image_uri", "input_version", "size_bytes", "day",
                                                      "_input_error"]


def test_a_dated_s3_source_lists_only_its_days(s3_env):
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for d in (D1, D2, D3):
        for cam in ("cam1", "cam2"):
            s3.put_object(Bucket=s3_env, Key=f"line3/{d:%Y/%m/%d}/{cam}/x.png", Body=b"png")
    s3.put_object(Bucket=s3_env, Key="line3/2026/12/notes.txt", Body=b"x")
    source = f"s3://{s3_env}/line3/{{date:%Y/%m/%d}}/"
    assert DateTemplate.parse(source).existing_days() == [D1, D2, D3]
    table = list_inputs(source, ["y", "m", "d", "camera"], dates=[D3, D4])
    assert table["image_uri"].to_pylist() == [f"s3://{s3_env}/line3/2026/12/03/{c}/x.png" for c in ("cam1", "cam2")]
    assert table["d"].to_pylist() == ["03", "03"] and table["camera"].to_pylist() == ["cam1", "cam2"]


def _inventory(s3, bucket: str, prefix: str) -> list[tuple]:
    """What an S3 Inventory lists with its optional fields Size and LastModifiedDate."""
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out.append((bucket, o["Key"], o["Size"], o["LastModified"]))
    return out


def test_s3_inventory_manifests_give_the_listings_input_version(s3_env, tmp_path):
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for k, name in enumerate(["a.png", "b c.png", "d+e.png"]):  # keys an inventory CSV URL-encodes
        s3.put_object(Bucket=s3_env, Key=f"line3/2026-12-03/{name}", Body=b"x" * (k + 1))
    listed = list_inputs(f"s3://{s3_env}/line3/2026-12-03/", [])
    s3.put_object(Bucket=s3_env, Key="line3/2026-12-03/notes.txt", Body=b"not an image")  # an inventory lists it
    rows = _inventory(s3, s3_env, "line3/")
    assert len(rows) == 4
    from urllib.parse import quote_plus

    csv = "".join(f'"{b}","{quote_plus(k)}","{n}","{t.strftime("%Y-%m-%dT%H:%M:%S.000Z")}","etag","STANDARD"\n'
                  for b, k, n, t in rows)
    (tmp_path / "inv.csv.gz").write_bytes(gzip.compress(csv.encode()))
    pq.write_table(pa.table({"bucket": [r[0] for r in rows], "key": [r[1] for r in rows],
                             "size": pa.array([r[2] for r in rows], pa.int64()),
                             "last_modified_date": pa.array([r[3] for r in rows], pa.timestamp("ms", "UTC"))}),
                   tmp_path / "inv.parquet")
    for manifest in ("inv.csv.gz", "inv.parquet"):
        for r in rows:  # gone since the inventory was taken: a HEAD would find nothing, the manifest still knows
            s3.delete_object(Bucket=s3_env, Key=r[1])
        fed = list_inputs(str(tmp_path / manifest), [])
        assert fed["image_uri"].to_pylist() == listed["image_uri"].to_pylist(), manifest
        assert fed["input_version"].to_pylist() == listed["input_version"].to_pylist(), manifest
        assert fed["input_version"].null_count == 0


def test_bad_manifest_rows_and_files(tmp_path):
    good = write_textures(tmp_path / "img", ["a.png", "b.png"])
    pq.write_table(pa.table({"uri": [str(p) for p in good], "size": pa.array([None, 5], pa.int64()),
                             "mtime": ["not a time", "2026-12-03T02:10:00Z"]}), tmp_path / "m.parquet")
    table = list_inputs(str(tmp_path / "m.parquet"), [])
    st = good[0].stat()
    # an entry whose size or time is unreadable is looked up (a stat), never dropped
    assert table["input_version"].to_pylist() == [f"{st.st_size}-{max(st.st_mtime_ns, st.st_ctime_ns)}",
                                                   "5-1796263800000000000"]
    (tmp_path / "wrong.csv").write_text('"b","k","STANDARD","true"\n')
    with pytest.raises(ValueError, match="wrong.csv: the third column is not a size"):
        list_inputs(str(tmp_path / "wrong.csv"), [])
    (tmp_path / "nokey.csv").write_text('bucket,key,size,last_modified_date\nb,,3,2026-12-03T02:10:00Z\n')
    with pytest.raises(ValueError, match="nokey.csv: row 1 has no bucket or key"):
        list_inputs(str(tmp_path / "nokey.csv"), [])


@pytest.mark.usefixtures("ray_local")
def test_a_manifest_fed_run_matches_a_listing_fed_run(model, tmp_path):
    """The same files scored from a listing, then planned from our own manifest (uri, size, mtime)
    and from a dated source: the same input_version, so the re-run skips everything."""
    day = tmp_path / "line3" / "2026-12-03"
    paths = write_textures(day, ["a.png", "b.png", "c.png"])
    out = tmp_path / "out"
    summary = score(str(model), str(day), str(out), verbose=False)
    assert summary["counts"]["scored"] == 3
    table = pq.read_table(out / "scores")
    stats = [p.stat() for p in paths]
    pq.write_table(pa.table({"uri": [str(p) for p in paths], "size": [s.st_size for s in stats],
                             "mtime": pa.array([max(s.st_mtime_ns, s.st_ctime_ns) for s in stats], pa.int64())}),
                   tmp_path / "manifest.parquet")
    fed = list_inputs(str(tmp_path / "manifest.parquet"), [])
    assert sorted(fed["input_version"].to_pylist()) == sorted(table["input_version"].to_pylist())
    again = plan_run(str(model), str(tmp_path / "manifest.parquet"), str(out))
    assert again.n_listed == 3 and again.n_skipped == 3 and len(again.pending) == 0
    dated = plan_run(str(model), str(tmp_path / "line3" / "{date}"), str(out), dates=[D2, D3])
    assert dated.n_listed == 3 and dated.n_skipped == 3


def test_the_audit_lists_the_days_since_its_last_run(tmp_path):
    """days_of_night: every existing day before the first finished run, then from the last cut-off's
    day less lookback_days; a day folder that does not exist is counted as missing, not an error."""
    for d in (D1, D2):
        write_textures(tmp_path / "src" / d.isoformat(), ["x.png"])
    cfg = AuditConfig(source=str(tmp_path / "src" / "{date}"), output=str(tmp_path / "out"), models=str(tmp_path),
                      lookback_days=1, partitions=["day"])
    cfg.check_paths()  # the template's root exists: accepted
    now = datetime(2026, 12, 4, 2, 0, tzinfo=timezone.utc)
    assert audit.days_of_night(cfg, None, now) == [D1, D2]
    days = audit.days_of_night(cfg, {"until": "2026-12-03T01:45:00+00:00"}, now)
    assert days == [D2, D3, D4]
    missing: list[str] = []
    items = audit.list_items(cfg, days, missing)
    assert [Path(f.uri).parent.name for f in items] == ["2026-12-02"] and missing == ["2026-12-03", "2026-12-04"]
    rows = audit.input_rows(cfg, items)
    assert rows["day"].to_pylist() == ["2026-12-02"]
    assert audit.source_root(cfg) == str(tmp_path / "src")


@pytest.mark.usefixtures("ray_local")
def test_a_dated_audit_lists_only_recent_days_and_warns_of_a_missing_one(model, tmp_path):
    """Night 1 (no finished run) takes every day folder; night 2 lists yesterday and today only:
    today's folder does not exist yet (a warning and listing.days.missing, exit as usual), a day
    older than the look-back is not listed; night 3 takes today's folder once it exists."""
    now = datetime.now(timezone.utc)
    today, yesterday = now.date(), now.date() - timedelta(days=1)
    src = tmp_path / "src"
    write_textures(src / (today - timedelta(days=2)).isoformat() / "cam1", ["a.png"])
    write_textures(src / yesterday.isoformat() / "cam1", ["b.png"], seed=1)
    cfg = AuditConfig(source=str(src / "{date}"), output=str(tmp_path / "audit"), models=str(model),
                      settle_minutes=0, partitions=["day", "camera"], alert=audit.AlertConfig(anomaly_rate=1.0))
    first = audit.run_audit(cfg, now=now, verbose=False)
    assert first.summary["listing"]["new"] == 2 and first.summary["totals"]["ok"] == 2
    assert first.summary["listing"]["days"]["listed"] == 2 and first.summary["listing"]["days"]["missing"] == []
    write_textures(src / (today - timedelta(days=3)).isoformat() / "cam1", ["late.png"], seed=2)  # before the look-back
    second = audit.run_audit(cfg, now=now + timedelta(minutes=30), verbose=False)
    listing = second.summary["listing"]
    assert listing["days"] == {"first": yesterday.isoformat(), "last": today.isoformat(), "listed": 1,
                               "missing": [today.isoformat()]}
    assert listing["listed"] == 1 and listing["seen"] == 1 and second.summary["totals"]["inputs"] == 0
    assert any("do not exist (yet)" in w and today.isoformat() in w for w in second.summary["warnings"])
    write_textures(src / today.isoformat() / "cam2", ["c.png"], seed=3)
    third = audit.run_audit(cfg, now=now + timedelta(minutes=60), verbose=False)
    assert third.summary["listing"]["new"] == 1 and third.summary["totals"]["ok"] == 1
    rows = pq.read_table(tmp_path / "audit" / "runs" / third.run_id / "inputs.parquet")
    assert rows["day"].to_pylist() == [today.isoformat()] and rows["camera"].to_pylist() == ["cam2"]


def test_the_audit_takes_inventory_manifests_with_their_versions(s3_env, tmp_path):
    """manifests: a folder of S3 Inventory CSVs: found by the audit's listing, and each entry's
    input_version (in the run's inputs.parquet) is the listing's, so the scorer HEADs none."""
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for name in ("cam1/a.png", "cam2/b.png"):
        s3.put_object(Bucket=s3_env, Key=f"line3/{name}", Body=b"png")
    listed = list_inputs(f"s3://{s3_env}/line3/", [])
    rows = _inventory(s3, s3_env, "line3/")
    (tmp_path / "inv").mkdir()
    (tmp_path / "inv" / "part-0.csv").write_text("".join(
        f'"{b}","{k}","{n}","{t.strftime("%Y-%m-%dT%H:%M:%S.000Z")}"\n' for b, k, n, t in rows))
    cfg = AuditConfig(manifests=str(tmp_path / "inv"), output=str(tmp_path / "out"), models=str(tmp_path),
                      root=f"s3://{s3_env}/line3", partitions=["camera"])
    items = audit.list_items(cfg)
    assert [Path(f.uri).name for f in items] == ["part-0.csv"]
    inputs = audit.input_rows(cfg, items)
    assert inputs["image_uri"].to_pylist() == listed["image_uri"].to_pylist()
    assert inputs["input_version"].to_pylist() == listed["input_version"].to_pylist()
    assert inputs["camera"].to_pylist() == ["cam1", "cam2"]


@pytest.mark.usefixtures("ray_local")
def test_a_dated_s3_source_scored_by_stfpm_score(model, s3_env, tmp_path):
    """`stfpm score` with {date} on S3: --dates lists that day; the next run's default days start
    at the last finished run's day (_SUCCESS), so the old day is not listed again at all."""
    from typer.testing import CliRunner

    from stfpm.cli import app

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    rng = np.random.default_rng(0)
    for name in ("cam1/a.png", "cam2/b.png"):
        s3.put_object(Bucket=s3_env, Key=f"line3/2026-06-15/{name}", Body=encode(texture(rng)))
    s3.put_object(Bucket=s3_env, Key="line3/2026-06-14/cam1/old.png", Body=encode(texture(rng)))
    source, out = f"s3://{s3_env}/line3/{{date}}/", str(tmp_path / "out")
    result = CliRunner().invoke(app, ["score", str(model), source, out, "--partitions", "day,camera",
                                      "--dates", "2026-06-15"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(Path(out) / "scores")
    assert sorted(table["image_uri"].to_pylist()) == [f"s3://{s3_env}/line3/2026-06-15/{n}"
                                                      for n in ("cam1/a.png", "cam2/b.png")]
    assert set(table["day"].to_pylist()) == {"2026-06-15"} and set(table["status"].to_pylist()) == {"ok"}
    again = score(str(model), source, out, verbose=False)  # yesterday and today (UTC): no such folders
    assert again["counts"]["listed"] == 0
    bad = CliRunner().invoke(app, ["score", str(model), source, out, "--dates", "2026-12-3x"])
    assert bad.exit_code == 2 and "--dates must be a day" in bad.output
