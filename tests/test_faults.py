"""Issue 11, "nothing lost, nothing escapes": what a fault-and-bad-input review of scoring,
the audit and model loading found, each turned into a test (killed and failing runs,
replaced and odd files, hostile manifests and model.json files, bad configs)."""
from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from stfpm.audit import run as audit_run, summary as audit_summary
from stfpm.cli import app
from stfpm.scoring import score
from stfpm.scoring.plan import plan_run
from stfpm.errors import UserError


def test_user_errors_share_one_base_and_print_one_line_with_exit_2(tmp_path):
    from stfpm.model.card import ModelDirError, read_card
    from stfpm.data.datasets import DatasetError

    assert issubclass(ModelDirError, UserError) and issubclass(DatasetError, UserError)
    with pytest.raises(UserError, match="no model.json"):
        read_card(tmp_path)
    image = write_textures(tmp_path / "images", 1)[0]
    result = CliRunner().invoke(app, ["predict", str(tmp_path), str(image), "--out", str(tmp_path / "o")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "model.json" in lines[0]


# ------------------------------------------------------------------- scoring without Ray

def _model(tmp_path_factory):
    from test_scoring import make_model

    return make_model(tmp_path_factory.mktemp("faults") / "model", seed=0)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return _model(tmp_path_factory)


def test_a_model_that_cannot_load_fails_the_run_before_any_row(model, tmp_path):
    """Item 2: one byte flipped in student.safetensors used to give an error row per input
    and exit 0; now the driver checks the weights and the CLI exits 2 with one line."""
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    weights = bytearray((broken / "student.safetensors").read_bytes())
    weights[-10] ^= 0xFF
    (broken / "student.safetensors").write_bytes(bytes(weights))
    write_textures(tmp_path / "data", 2)
    with pytest.raises(UserError, match="student.safetensors does not match the sha256"):
        score(str(broken), str(tmp_path / "data"), str(tmp_path / "out"), verbose=False)
    assert not (tmp_path / "out" / "scores").exists()
    result = CliRunner().invoke(app, ["score", str(broken), str(tmp_path / "data"), str(tmp_path / "out")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "student.safetensors" in result.output


def test_model_version_must_be_the_hash_of_the_weights_and_keys_stay_under_output(model, tmp_path):
    """Item 6: "model_version": "../../ESCAPED" (weights untouched) wrote maps beside OUTPUT."""
    from stfpm.storage import join_uri

    edited = tmp_path / "edited"
    shutil.copytree(model, edited)
    meta = json.loads((edited / "model.json").read_text())
    meta["model_version"] = "../../ESCAPED"
    (edited / "model.json").write_text(json.dumps(meta))
    write_textures(tmp_path / "data", 1)
    with pytest.raises(UserError, match=r"model_version.*'\.\./\.\./ESCAPED', but the weights"):
        score(str(edited), str(tmp_path / "data"), str(tmp_path / "out"), verbose=False)
    assert not (tmp_path / "ESCAPED").exists() and not (tmp_path / "out" / "maps").exists()
    for bad in ("../x", "a/../../b", "", "a\\b"):
        with pytest.raises(UserError, match="cannot be a file or folder name"):
            join_uri(str(tmp_path / "out"), "maps", bad)
    state = {"schema": 1, "input": str(tmp_path / "data"), "last_success": None, "runs": [],
             "open_run": {"run_id": "../../elsewhere", "since": None, "attempts": 1}}  # an edited state file
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "_audit_state.json").write_text(json.dumps(state))
    cfg = audit_run.AuditConfig(source=str(tmp_path / "data"), output=str(tmp_path / "audit"), models=str(model))
    with pytest.raises(UserError, match="cannot be a file or folder name"):
        audit_run.run_audit(cfg, verbose=False)
    assert not (tmp_path / "elsewhere").exists()


def test_input_errors_are_settled_and_transient_errors_retried(model, tmp_path):
    """Item 2: a bad file is not read again for the same content; a model or IO failure is."""
    from stfpm.scoring.sink import write_table_file

    paths = write_textures(tmp_path / "data", 3)
    out = str(tmp_path / "out")
    plan = plan_run(str(model), str(tmp_path / "data"), out)
    rows = pipeline_rows(plan, ["ok", "error", "error"], [None, "input", "transient"])
    write_table_file(rows, f"{out}/scores", plan.run_id, plan.schema)
    again = plan_run(str(model), str(tmp_path / "data"), out)
    assert again.pending["image_uri"].to_pylist() == [str(paths[2])] and again.n_skipped == 2


def test_an_input_is_its_canonical_uri_and_its_content_version(model, tmp_path):
    """Item 4: a replaced file (same name, new content) is scored again; one file named two
    ways in a manifest is one input."""
    from stfpm.scoring.sink import write_table_file

    paths = write_textures(tmp_path / "data" / "d", 2)
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{tmp_path}/data/d/../d/0.png\n{paths[0]}\ndata/./d/1.png\n")
    out = str(tmp_path / "out")
    plan = plan_run(str(model), str(manifest), out)
    assert plan.pending["image_uri"].to_pylist() == [str(p) for p in paths]
    write_table_file(pipeline_rows(plan, ["ok", "ok"], [None, None]), f"{out}/scores", plan.run_id, plan.schema)
    assert len(plan_run(str(model), str(manifest), out).pending) == 0
    time.sleep(0.01)
    write_textures(tmp_path / "replacement", 1, seed=5)[0].replace(paths[1])  # new content under the old name
    for source in (str(manifest), str(tmp_path / "data")):
        assert plan_run(str(model), source, out).pending["image_uri"].to_pylist() == [str(paths[1])]
    # rows from before input_version existed settle any content: an upgrade rescores nothing
    legacy = tmp_path / "legacy"
    plan = plan_run(str(model), str(manifest), str(legacy))
    old_rows = pipeline_rows(plan, ["ok", "ok"], [None, None])
    old_rows = old_rows.set_column(old_rows.column_names.index("input_version"), "input_version",
                                   pa.nulls(2, pa.string()))
    write_table_file(old_rows, f"{legacy}/scores", plan.run_id, plan.schema)
    assert len(plan_run(str(model), str(manifest), str(legacy)).pending) == 0


def test_table_files_are_flushed_by_time_as_well_as_rows(model, tmp_path):
    """Item 3: a killed run kept only whole files of 4,096 rows; now a file is written when
    rows have waited flush_s, so a kill loses at most about that much work."""
    from stfpm.scoring.sink import TableWriter

    write_textures(tmp_path / "data", 3)
    plan = plan_run(str(model), str(tmp_path / "data"), str(tmp_path / "out"))
    rows = pipeline_rows(plan, ["ok"] * 3, [None] * 3)
    writer = TableWriter(str(tmp_path / "out" / "scores"), plan.run_id, plan.schema, rows_per_file=4096, flush_s=0.5)
    files = lambda: sorted((tmp_path / "out" / "scores").rglob("part-*.parquet"))  # noqa: E731
    rows_in = lambda: sum(pq.read_table(f).num_rows for f in files())  # noqa: E731
    writer.add(rows.slice(0, 1))
    assert not files()
    time.sleep(0.6)
    writer.add(rows.slice(1, 1))  # the first row has waited long enough: both are written
    assert rows_in() == 2 and len(files()) <= 2  # one file per bucket they fall in
    writer.add(rows.slice(2, 1))
    writer.flush()
    assert rows_in() == 3 and writer.totals["rows"] == 3


def test_odd_files_become_error_rows_without_being_opened_or_quoted(tmp_path):
    """Items 7, 8, 9: a FIFO hung the job; dangling symlinks, loops and FIFOs in a folder got
    no row; an error quoted the file's first bytes; http:// entries got a confusing error."""
    from stfpm.scoring.sources import list_inputs
    from stfpm.scoring.stages import load_images

    data = tmp_path / "data"
    good = write_textures(data, 1)[0]
    os.mkfifo(data / "fifo.png")
    (data / "dangling.png").symlink_to(data / "nowhere.png")
    (data / "loop.png").symlink_to(data / "loop.png")
    (data / "secret.png").write_bytes(b"root:*:20000:0:99999:7:::\n")
    listed = list_inputs(str(data), [])["image_uri"].to_pylist()
    assert sorted(Path(u).name for u in listed) == ["0.png", "dangling.png", "fifo.png", "loop.png", "secret.png"]
    uris = listed + ["http://example.com/a.png"]
    none = pa.array([None] * len(uris), pa.string())
    batch = pa.table({"image_uri": uris, "status": none, "error": none, "error_kind": none,
                      "_size": pa.array([64] * len(uris), pa.int32())})
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=load_images(batch, 10**8, 1 << 20)), daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "reading a FIFO blocked"
    rows = {Path(u).name: r for u, r in zip(uris, result["out"].select(["status", "error", "error_kind"]).to_pylist())}
    assert rows[good.name]["status"] == "ok"
    assert "FIFO" in rows["fifo.png"]["error"] and "dangling symlink" in rows["dangling.png"]["error"]
    assert "symlink loop" in rows["loop.png"]["error"]
    assert "not http(s)://" in rows["a.png"]["error"]
    assert rows["secret.png"]["error"].startswith("decode: ") and "root" not in rows["secret.png"]["error"]
    assert all(r["error_kind"] == "input" for n, r in rows.items() if n != good.name)


def test_allow_roots_restricts_which_local_files_a_manifest_may_name(tmp_path):
    """Item 8: a manifest could make the workers read any file they can."""
    from stfpm.scoring.sources import list_inputs

    allowed, elsewhere = write_textures(tmp_path / "images", 1)[0], write_textures(tmp_path / "private", 1)[0]
    (tmp_path / "images" / "link.png").symlink_to(elsewhere)  # a symlink out of the allowed folder
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{allowed}\n{elsewhere}\n{tmp_path}/images/link.png\n")
    table = list_inputs(str(manifest), [], allow_roots=[str(tmp_path / "images")])
    refused = dict(zip(table["image_uri"].to_pylist(), table["_input_error"].to_pylist()))
    assert refused[str(allowed)] is None
    assert "allow_roots" in refused[str(elsewhere)] and "allow_roots" in refused[f"{tmp_path}/images/link.png"]
    assert list_inputs(str(manifest), [])["_input_error"].null_count == 3


def test_output_files_follow_the_umask(tmp_path):
    """Item 12: mkstemp made every output file 0600 whatever the umask."""
    from stfpm.storage import write_bytes

    old = os.umask(0o022)
    try:
        write_bytes(str(tmp_path / "a" / "x.json"), b"{}")
        os.umask(0o077)
        write_bytes(str(tmp_path / "a" / "y.json"), b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "x.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "a" / "y.json").stat().st_mode) == 0o600


# ---------------------------------------------------------------------- on a local Ray

from test_scoring import _ray_teardown, pipeline_rows, ray_local, write_textures  # noqa: E402,F401 - the shared 2-CPU local Ray fixture


def test_reruns_retrains_and_switching_back(model, tmp_path, ray_local):  # noqa: F811
    """Item 1: the README's second `stfpm score` crashed (`inputs.take([])`); it must score
    nothing, exit 0 and write _SUCCESS, also after switching back to a model version already
    scored. Item 5: after a retrain the table keeps a row per model version, and
    read_scores gives the one row per input of the last run's model."""
    from test_scoring import make_model

    from stfpm.scoring import read_scores

    other = make_model(tmp_path / "other", seed=1)
    version = {m: json.loads((m / "model.json").read_text())["model_version"] for m in (model, other)}
    write_textures(tmp_path / "data" / "k", 2)
    out = tmp_path / "out"
    args = [str(tmp_path / "data"), str(out), "--partitions", "kind"]
    assert score(str(model), *args[:2], partitions=["kind"], verbose=False)["counts"]["scored"] == 2
    again = CliRunner().invoke(app, ["score", str(model), *args])
    assert again.exit_code == 0, again.output
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["counts"]["scored"] == 0 and success["counts"]["latest_rows"] == 2

    retrained = score(str(other), *args[:2], partitions=["kind"], verbose=False)
    assert retrained["counts"]["scored"] == 2 and retrained["counts"]["table_rows"] == 4
    assert retrained["counts"]["latest_rows"] == retrained["counts"]["latest_ok"] == 2
    assert len(read_scores(str(out), latest=False)) == 4
    latest = read_scores(str(out))
    assert len(latest) == 2 and set(latest.model_version) == {version[other]}

    back = CliRunner().invoke(app, ["score", str(model), *args])
    assert back.exit_code == 0, back.output
    assert json.loads((out / "_SUCCESS").read_text())["counts"]["scored"] == 0
    assert set(read_scores(str(out)).model_version) == {version[model]}


def test_transient_errors_are_retried_on_later_nights_and_fail_the_exit_code(model, tmp_path, ray_local):  # noqa: F811
    """Item 2: a night whose images all failed was "ok", exit 0, and its images were never
    scored again. Now a transient error (here: a category without a model) exits 4 and its
    input is scored by the next night; a bad file is reported but neither retried nor
    failing."""
    from datetime import datetime, timedelta, timezone

    src = tmp_path / "incoming"
    write_textures(src / "a", 1)
    write_textures(src / "c", 1)
    (src / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    registry = tmp_path / "registry.yaml"
    registry.write_text(f"models:\n  a: {model}\n")
    cfg = audit_run.AuditConfig(source=str(src), output=str(tmp_path / "audit"), models=str(registry),
                            partitions=["category"], settle_minutes=0, alert=audit_run.AlertConfig(anomaly_rate=1.0))
    now = datetime.now(timezone.utc) + timedelta(minutes=1)
    night1 = audit_run.run_audit(cfg, now=now, verbose=False)
    totals = night1.summary["totals"]
    assert night1.exit_code == audit_summary.EXIT_ERRORS and night1.summary["status"] == "errors"
    assert (totals["inputs"], totals["ok"], totals["error_input"], totals["error_transient"]) == (3, 1, 1, 1)

    registry.write_text(f"models:\n  a: {model}\n  c: {model}\n")  # the missing model is added
    night2 = audit_run.run_audit(cfg, now=now + timedelta(minutes=1), verbose=False)
    assert night2.exit_code == audit_summary.EXIT_OK, night2.summary
    assert night2.summary["totals"]["retried"] == 1 and night2.summary["totals"]["ok"] == 1
    assert night2.summary["categories"]["c"]["ok"] == 1 and "a" not in night2.summary["categories"]

    night3 = audit_run.run_audit(cfg, now=now + timedelta(minutes=2), verbose=False)
    assert night3.exit_code == audit_summary.EXIT_OK and night3.summary["totals"]["inputs"] == 0


def test_every_bad_audit_config_exits_2_naming_the_key_before_anything_is_written(tmp_path, capsys):
    """Item 10: 15 of 35 bad configs exited 1 with a traceback, 9 of them after writing
    _audit_state.json; `extensions: ".png"` was read letter by letter."""
    import importlib.util

    import yaml

    spec = importlib.util.spec_from_file_location("nightly_audit",
                                                  Path(__file__).parents[1] / "jobs" / "nightly_audit.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    (tmp_path / "in").mkdir()
    (tmp_path / "m.yaml").write_text("models: {}\n")
    base = {"source": str(tmp_path / "in"), "output": str(tmp_path / "out"), "models": str(tmp_path / "m.yaml")}
    for key, value, named in (
            ("output", 123, "output must be a non-empty string"), ("s3", "us-east-1", "s3 must be a mapping"),
            ("scoring", {"actors": "two"}, "scoring.actors must be N or"),
            ("scoring", {"actors": "4..2"}, "scoring.actors must be N or"),
            ("scoring", {"batch_size": 0}, "scoring.batch_size must be a whole number >= 1"),
            ("scoring", {"threshold": "abc"}, "scoring.threshold must be a number"),
            ("scoring", {"extensions": ".png"}, "scoring.extensions must be a list of file name endings"),
            ("scoring", {"cpus_per_actor": 0}, "scoring.cpus_per_actor must be a number > 0"),
            ("partitions", ["status"], "partitions ['status'] are columns of the score table"),
            ("partitions", ["bucket"], "partitions ['bucket'] are columns of the score table"),
            ("partitions", "category", "partitions must be a list of names"),
            ("models", str(tmp_path / "nowhere"), "models: " + str(tmp_path / "nowhere") + " does not exist"),
            ("source", str(tmp_path / "none"), "source: " + str(tmp_path / "none") + " does not exist"),
            ("report", {"link_expiry_hours": "x"}, "report.link_expiry_hours must be a number of hours"),
            ("report", {"overlays": "yes please"}, "report.overlays must be true or false"),
            ("alert", {"min_images": -1}, "alert.min_images must be a whole number >= 0"),
            ("alert", {"categories": {"a": "high"}}, "alert.categories must be a mapping"),
            ("alert", "loud", "alert must be a mapping"),
            ("settle_minutes", "soon", "settle_minutes must be a number >= 0"),
            ("first_run_since", "yesterday", "first_run_since must be an ISO time")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**base, key: value}))
        assert job.main(["--config", str(path)]) == audit_summary.EXIT_USAGE, (key, value)
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and named in err and str(path) in err, (key, value, err)
        assert not (tmp_path / "out").exists()
    for actors in ("2", 2, "1..8"):
        path.write_text(yaml.safe_dump({**base, "scoring": {"actors": actors}}))
        assert audit_run.load_config(str(path)).scoring.actors == actors
