"""Issue 24, "nothing skipped forever, nothing poisons a night": the second fault-and-bad-input
review, each finding turned into a test (real files, a real local Ray, real moto S3)."""
from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stfpm.audit import run as audit, summary as audit_summary
from stfpm.cli import app
from stfpm.scoring import read_scores, score
from test_scoring import _ray_teardown, ray_local  # noqa: F401 - the shared 2-CPU local Ray fixture

BAD_NAME = os.fsdecode(b"x\xff.png")  # a file name that is not UTF-8


def _images(folder: Path, n: int, seed: int = 0, names: list[str] | None = None) -> list[Path]:
    from test_scoring import encode, texture

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in (names or [f"{i}.png" for i in range(n)])]
    for p in paths:
        p.write_bytes(encode(texture(rng)))
    return paths


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from test_scoring import make_model

    return make_model(tmp_path_factory.mktemp("review2") / "model", seed=0)


# ------------------------------------------------------------ item 1: names that are not UTF-8

def test_a_file_name_that_is_not_utf8_is_scored_not_fatal(model, tmp_path, ray_local):  # noqa: F811
    """Item 1: one such name exited 2 with no row (pyarrow cannot hold it); now it is listed
    with its odd bytes written \\xNN, read back from the real name and scored."""
    data = tmp_path / "s"
    _images(data, 2, names=["a.png", BAD_NAME])
    summary = score(str(model), str(data), str(tmp_path / "o"), verbose=False)
    assert summary["counts"]["scored"] == 2 and summary["counts"]["ok"] == 2, summary["counts"]
    uris = sorted(read_scores(str(tmp_path / "o"))["image_uri"])
    assert uris == [str(data / "a.png"), str(data) + "/x\\xff.png"]
    again = score(str(model), str(data), str(tmp_path / "o"), verbose=False)
    assert again["counts"]["scored"] == 0  # settled like any other input


def test_predict_writes_results_for_a_name_that_is_not_utf8(model, tmp_path):
    """Item 1: `stfpm predict` died of a segmentation fault in cv2.imwrite on such a name."""
    data = tmp_path / "s"
    _images(data, 1, names=[BAD_NAME])
    out = tmp_path / "p"
    result = CliRunner().invoke(app, ["predict", str(model), str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "x\\xff.png" in result.output
    written = sorted(os.listdir(os.fsencode(out)))
    assert written == [b"s_x\xff.json", b"s_x\xff.png"]


def test_an_audit_night_with_a_name_that_is_not_utf8_finishes(model, tmp_path, ray_local):  # noqa: F811
    """Item 1: the audit failed every night on such a name (its inputs.parquet could not hold it)."""
    src = tmp_path / "in"
    _images(src, 2, names=["a.png", BAD_NAME])
    cfg = audit.AuditConfig(source=str(src), output=str(tmp_path / "audit"), models=str(model), settle_minutes=0,
                            alert=audit.AlertConfig(anomaly_rate=1.0))
    night = audit.run_audit(cfg, now=datetime.now(timezone.utc) + timedelta(minutes=1), verbose=False)
    assert night.exit_code == audit_summary.EXIT_OK and night.summary["totals"]["ok"] == 2, night.summary["totals"]


# ------------------------------------------------------------ item 2: unsupported URLs

def test_an_unsupported_url_in_a_manifest_is_one_error_row(model, tmp_path, ray_local):  # noqa: F811
    """Item 2: an ftp:// line gave a Ray traceback, exit 1 and no row."""
    good = _images(tmp_path / "img", 1)[0]
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{good}\nftp://example.com/a.png\ngopher://x/y.png\n")
    result = CliRunner().invoke(app, ["score", str(model), str(manifest), str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    rows = read_scores(str(tmp_path / "o")).set_index("image_uri")
    assert rows.loc[str(good), "status"] == "ok"
    for uri, scheme in (("ftp://example.com/a.png", "ftp"), ("gopher://x/y.png", "gopher")):
        assert rows.loc[uri, "status"] == "error" and rows.loc[uri, "error_kind"] == "input"
        assert f"unsupported URL scheme '{scheme}'" in rows.loc[uri, "error"]
    with_roots = CliRunner().invoke(app, ["score", str(model), str(manifest), str(tmp_path / "o2"),
                                          "--allow-root", str(tmp_path / "img")])
    assert with_roots.exit_code == 0, with_roots.output


# ------------------------------------------------------------ item 10: predict goes on

def test_predict_reports_a_corrupt_or_unreadable_file_and_goes_on(model, tmp_path):
    """Item 10: one corrupt file ended `predict` with nothing written; an unreadable one gave
    an OSError traceback. Now each is one line at the end (exit 2), the others are written."""
    data = tmp_path / "s"
    _images(data, 2, names=["a.png", "c.png"])
    (data / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    locked = data / "d.png"
    _images(data, 1, names=["d.png"])
    locked.chmod(0)
    out = tmp_path / "p"
    try:
        result = CliRunner().invoke(app, ["predict", str(model), str(data), "--out", str(out), "--batch-size", "2"])
    finally:
        locked.chmod(0o644)
    assert result.exit_code == 2, result.output
    assert sorted(os.listdir(out)) == ["s_a.json", "s_a.png", "s_c.json", "s_c.png"] + (
        ["s_d.json", "s_d.png"] if os.geteuid() == 0 else [])  # root reads a 0000 file
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert any(str(data / "b.png") in line for line in errors), result.output
    if os.geteuid() != 0:
        assert any(str(locked) in line and "Permission denied" in line for line in errors), result.output
    assert "Traceback" not in result.output

    deep = tmp_path / ("f" * 200)  # the output name <folder>_<stem> would be over 255 bytes
    _images(deep, 1, names=["g" * 200 + ".png"])
    long_name = CliRunner().invoke(app, ["predict", str(model), str(deep), "--out", str(tmp_path / "q")])
    assert long_name.exit_code == 2 and "Traceback" not in long_name.output, long_name.output
    assert "could not be written" in long_name.output and "File name too long" in long_name.output


# ------------------------------------------------------------ item 3: nothing skipped forever

def test_the_audit_skips_nothing_through_unmounts_clock_skew_and_future_mtimes(model, tmp_path, ray_local):  # noqa: F811
    """Item 3: an empty source (an unmounted share) advanced the cut-off, so what reappeared was
    never scored; a clock a day fast moved the cut-off a day ahead, hiding what arrived in
    between; a file dated 2099 was hidden until 2099. Now every night counts what it listed
    (listed = seen + settling + new), and every listed file is scored exactly once."""
    import pyarrow.parquet as pq

    share, unmounted = tmp_path / "share", tmp_path / "share.unmounted"
    _images(share, 2, names=["a.png", "b.png"])
    cfg = audit.AuditConfig(source=str(share), output=str(tmp_path / "audit"), models=str(model),
                            settle_minutes=10, alert=audit.AlertConfig(anomaly_rate=1.0))
    real = datetime.now(timezone.utc)

    def night(now):
        result = audit.run_audit(cfg, now=now, verbose=False)
        state = json.loads((tmp_path / "audit" / "_audit_state.json").read_text())
        listing = state["last_success"]["listing"]
        assert listing == result.summary["listing"]
        assert listing["listed"] == (listing["seen"] + listing["settling"] + listing["before_first_run_since"]
                                     + listing["new"])
        return result, listing

    # night 1 with the clock a day fast: both files scored
    first, listing = night(real + timedelta(days=1))
    assert listing["new"] == 2 and first.summary["totals"]["ok"] == 2
    # a file arrives; the share is unmounted for a night run with the right clock
    _images(share, 1, seed=1, names=["c.png"])
    share.rename(unmounted)
    share.mkdir()
    second, listing = night(real + timedelta(minutes=30))
    assert listing["listed"] == 0 and second.summary["totals"]["inputs"] == 0
    assert any("lists nothing tonight" in w for w in second.summary["warnings"])
    assert any("clock" in w for w in second.summary["warnings"])
    # mounted again, plus a file dated 2099 and one that is still arriving
    share.rmdir()
    unmounted.rename(share)
    planted = _images(share, 1, seed=2, names=["d.png"])[0]
    os.utime(planted, (4070908800, 4070908800))  # 2099-01-01
    third_now = datetime.now(timezone.utc) + timedelta(minutes=5)
    _images(share, 1, seed=3, names=["e.png"])
    third, listing = night(third_now)
    assert listing == {"listed": 5, "seen": 2, "settling": 2, "before_first_run_since": 0, "new": 1,
                       "future_dated": 1}  # c.png and e.png arrived within settle_minutes of this night
    fourth, listing = night(third_now + timedelta(minutes=30))
    assert listing["new"] == 2 and listing["seen"] == 3

    runs = [r.run_id for r in (first, second, third, fourth)]
    scored = [u for r in runs if (tmp_path / "audit" / "runs" / r / "scores").exists()
              for u in pq.read_table(tmp_path / "audit" / "runs" / r / "scores", columns=["image_uri"])
              ["image_uri"].to_pylist()]
    assert sorted(Path(u).name for u in scored) == ["a.png", "b.png", "c.png", "d.png", "e.png"]


# ------------------------------------------------------------ items 5, 6, 7: models and thresholds

def _edit_model(model: Path, dest: Path, card=None, files: dict[str, bytes] | None = None) -> Path:
    """A copy of `model` with some weight files replaced (their sha256 and model_version
    updated, so the hashes match) and model.json edited by `card(doc)`."""
    import hashlib
    import shutil

    from stfpm.model.card import weights_version

    shutil.copytree(model, dest)
    doc = json.loads((dest / "model.json").read_text())
    for name, data in (files or {}).items():
        (dest / name).write_bytes(data)
        doc["weights"][name] = hashlib.sha256(data).hexdigest()
    doc["model_version"] = weights_version(doc["weights"])
    if card:
        card(doc)
    (dest / "model.json").write_text(json.dumps(doc))
    return dest


def _score_cli(model: Path, tmp_path: Path, *extra: str):
    data = tmp_path / "data"
    if not data.exists():
        _images(data, 1)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["score", str(model), str(data), str(out), *extra])
    return result, out


def test_a_model_that_cannot_load_exits_2_before_any_row(model, tmp_path):
    """Item 5: weights whose hashes match but that are a pickle, the wrong tensors, or a card
    naming an unknown backbone scored with exit 0 and "transient" error rows."""
    import pickle

    from safetensors.numpy import save as save_safetensors

    weights = sorted(json.loads((model / "model.json").read_text())["weights"])
    student = next(w for w in weights if "student" in w)
    broken = {
        "pickle": _edit_model(model, tmp_path / "pickle", files={student: pickle.dumps({"w": [1, 2, 3]})}),
        "tensors": _edit_model(model, tmp_path / "tensors",
                               files={student: save_safetensors({"conv.weight": np.zeros((2, 2), np.float32)})}),
        "backbone": _edit_model(model, tmp_path / "backbone", card=lambda d: d.update(backbone="resnet999")),
    }
    for kind, bad in broken.items():
        result, out = _score_cli(bad, tmp_path / kind)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2, (kind, result.output)
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0], (kind, result.output)
        assert not (out / "scores").exists(), kind


def test_hostile_model_json_is_refused_by_name(model, tmp_path):
    """Items 5 and 6: input.size 100000 made every row an input error (skipped forever after the
    fix); tile 16 with overlap 15 cut 12,769 tiles of a 128-px image; weight entries
    /proc/self/pagemap (hung), /proc/self/mem (traceback) and ../../etc/passwd (accepted with
    its real hash) read files outside the model directory."""
    import hashlib

    passwd = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()

    def weight(name, digest):
        def edit(doc):
            first = sorted(doc["weights"])[0]
            doc["weights"][name] = doc["weights"].pop(first) if digest is None else digest
            doc["weights"].pop(first, None)
        return edit

    cases = {
        "size": (lambda d: d["input"].update(size=100000), "input.size"),
        "tiles": (lambda d: d["input"].update(tile_size=16, tile_overlap=15), "input.tile_overlap"),
        "pagemap": (weight("/proc/self/pagemap", "0" * 64), "'weights'"),
        "mem": (weight("/proc/self/mem", "0" * 64), "'weights'"),
        "passwd": (weight("../../etc/passwd", passwd), "'weights'"),
    }
    for kind, (edit, key) in cases.items():
        bad = _edit_model(model, tmp_path / kind, card=edit)
        result, out = _score_cli(bad, tmp_path / f"run-{kind}")
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and key in lines[0], (kind, result.output)
        assert not out.exists(), kind


def test_thresholds_are_validated(model, tmp_path, capsys):
    """Item 7: --threshold nan called nothing anomalous and wrote NaN; the audit config took
    threshold .nan and -5; an ood limit of NaN or 0 turned the wrong-model check off; a
    negative threshold in model.json was accepted."""
    import yaml

    from stfpm.audit.config import load_config
    from stfpm.model.card import ModelDirError, read_card

    for value in ("nan", "inf", "-5"):
        result, out = _score_cli(model, tmp_path / f"cli-{value}", "--threshold", value)
        assert result.exit_code == 2 and "threshold must be a finite number >= 0" in result.output, result.output
        assert not out.exists()
    predicted = CliRunner().invoke(app, ["predict", str(model), str(_images(tmp_path / "p", 1)[0]),
                                         "--out", str(tmp_path / "po"), "--threshold", "nan"])
    assert predicted.exit_code == 2 and "threshold must be" in predicted.output, predicted.output

    (tmp_path / "in").mkdir()
    for value in (float("nan"), -5, float("inf")):
        path = tmp_path / "audit.yaml"
        path.write_text(yaml.safe_dump({"source": str(tmp_path / "in"), "output": str(tmp_path / "o"),
                                        "models": str(model), "scoring": {"threshold": value}}))
        with pytest.raises(ValueError, match="scoring.threshold must be a number, finite and >= 0"):
            load_config(str(path))

    def with_ood_limit(limit):
        def edit(doc):
            doc["threshold"]["ood"] = {"mean": [0.0], "std": [1.0], "limit": limit}
        return edit

    for kind, edit, key in (("nan-limit", with_ood_limit(float("nan")), "ood.limit"),
                            ("zero-limit", with_ood_limit(0), "ood.limit"),
                            ("negative", lambda d: d["threshold"].update(value=-1.0), "threshold.value")):
        bad = _edit_model(model, tmp_path / kind, card=edit)
        with pytest.raises(ModelDirError, match=key.replace(".", r"\.")):
            read_card(bad)


# ------------------------------------------------------------ items 11, 12: exit codes, file modes

def test_the_cli_does_not_catch_its_own_exit(model, tmp_path):
    """Item 11: typer.Exit is a RuntimeError, so `predict` with a missing input printed
    "error: 2" and `train-all` with a failed category exited 2 ("error: 1"), not the documented 1."""
    image = _images(tmp_path / "img", 1)[0]
    result = CliRunner().invoke(app, ["predict", str(model), str(image), str(tmp_path / "nowhere.png"),
                                      "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "error: 2" not in result.output, result.output
    assert "nowhere.png" in result.output

    broken = tmp_path / "cats" / "broken" / "train" / "good"
    broken.mkdir(parents=True)
    (broken / "a.png").write_bytes(b"not an image")
    result = CliRunner().invoke(app, ["train-all", str(tmp_path / "cats"), "--out", str(tmp_path / "models"),
                                      "--epochs", "1"])
    assert result.exit_code == 1 and "failed: broken" in result.output, result.output
    assert "error: 1" not in result.output


def test_weight_files_follow_the_umask(tmp_path):
    """Item 12: safetensors wrote the weights 0600 whatever the umask, so another user or a
    serving process could not read a trained model."""
    import stat

    from test_scoring import make_model

    old = os.umask(0o022)
    try:
        model = make_model(tmp_path / "m", seed=0)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in model.iterdir()}
    assert modes and all(mode == 0o644 for mode in modes.values()), modes


# ------------------------------------------------------------ item 8: credentials in URLs

def test_credentials_in_an_s3_url_are_never_printed_or_stored(model, tmp_path, s3_env, ray_local):  # noqa: F811
    """Item 8: s3://KEY:SECRET@bucket/... put the secret on stderr and, in the audit, into
    _audit_state.json (input, last_error)."""
    import yaml

    from stfpm.audit.config import load_config

    secret = "Sup3rS3cretValue"
    leaky = f"s3://AKIAEXAMPLE:{secret}@{s3_env}"
    data = tmp_path / "data"
    good = _images(data, 1)[0]
    for args in ([f"{leaky}/model", str(data), str(tmp_path / "o1")],
                 [str(model), f"{leaky}/images/", str(tmp_path / "o2")],
                 [str(model), str(data), f"{leaky}/out"]):
        result = CliRunner().invoke(app, ["score", *args])
        assert result.exit_code == 2 and secret not in result.output, result.output
        assert "credentials in a URL are not accepted" in result.output and "s3://***@" in result.output
        assert len(result.output.strip().splitlines()) == 1

    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{good}\n{leaky}/images/a.png\n")
    result = CliRunner().invoke(app, ["score", str(model), str(manifest), str(tmp_path / "o3")])
    assert result.exit_code == 0 and secret not in result.output, result.output
    rows = read_scores(str(tmp_path / "o3"))
    assert len(rows) == 2 and secret not in rows.to_csv()
    refused = rows[rows.status == "error"].iloc[0]
    assert refused.image_uri == f"s3://***@{s3_env}/images/a.png" and "credentials" in refused.error

    config = tmp_path / "audit.yaml"
    config.write_text(yaml.safe_dump({"source": f"{leaky}/in", "output": str(tmp_path / "audit"),
                                      "models": str(model)}))
    with pytest.raises(ValueError) as refused_config:
        load_config(str(config))
    assert secret not in str(refused_config.value) and "source" in str(refused_config.value)
    assert not (tmp_path / "audit").exists()


# ------------------------------------------------------------ items 9, 13: the audit's lock and config

def _nightly_job():
    import importlib.util

    spec = importlib.util.spec_from_file_location("nightly_audit", Path(__file__).parents[1] / "jobs" / "nightly_audit.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_a_second_audit_of_the_same_output_touches_nothing(model, tmp_path, capsys):
    """Item 9: two audits started a second apart both scored the same inputs (the second took
    the first for "attempt 2") and both exited 3. Now the second exits 5 in one line and
    touches nothing; a lock whose process is gone is taken over."""
    import socket
    import subprocess
    import sys

    import yaml

    _images(tmp_path / "in", 1)
    out = tmp_path / "audit"
    config = tmp_path / "audit.yaml"
    config.write_text(yaml.safe_dump({"source": str(tmp_path / "in"), "output": str(out), "models": str(model)}))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # the first audit, running
    try:
        out.mkdir()
        lock = {"token": "x", "host": socket.gethostname(), "pid": holder.pid,
                "started_at": datetime.now(timezone.utc).isoformat()}
        (out / "_audit.lock").write_text(json.dumps(lock))
        assert _nightly_job().main(["--config", str(config)]) == 5
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "another audit" in err and str(holder.pid) in err, err
        assert sorted(os.listdir(out)) == ["_audit.lock"]  # no state, no run folder
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over (the run itself is not started here:
    # the lock is checked first, and acquiring it again shows it was released)
    from stfpm.audit.run import acquire_lock, release_lock

    token = acquire_lock(str(out))
    assert json.loads((out / "_audit.lock").read_text())["token"] == token
    with pytest.raises(audit.AuditLocked):
        acquire_lock(str(out))
    release_lock(str(out), token)
    assert not (out / "_audit.lock").exists()

    # two takers at the same moment: exactly one gets the lock
    import threading

    outcomes, start = [], threading.Barrier(2)

    def take():
        start.wait()
        try:
            outcomes.append(acquire_lock(str(out)))
        except audit.AuditLocked:
            outcomes.append(None)

    takers = [threading.Thread(target=take) for _ in range(2)]
    for t in takers:
        t.start()
    for t in takers:
        t.join()
    assert sorted(outcomes, key=bool)[0] is None and sum(bool(o) for o in outcomes) == 1, outcomes


def test_audit_config_gaps_exit_2_in_one_line_before_anything_is_written(model, tmp_path, capsys):
    """Item 13: a broken registry YAML, an output that is a file, settle_minutes .inf or 1e12,
    a partition named twice and a config path that is a folder gave tracebacks with exit 1;
    broken models exited 2 only after _audit_state.json was written."""
    import yaml

    job = _nightly_job()
    (tmp_path / "in").mkdir()
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "broken.yaml").write_text("models: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    broken_model = _edit_model(model, tmp_path / "broken-model", card=lambda d: d.update(backbone="resnet999"))
    (tmp_path / "bad-registry.yaml").write_text(f"models:\n  a: {broken_model}\n")
    base = {"source": str(tmp_path / "in"), "output": str(tmp_path / "out"), "models": str(model)}
    for key, value, named in (
            ("models", str(tmp_path / "broken.yaml"), "not valid YAML"),
            ("models", str(tmp_path / "list.yaml"), "a registry maps category names"),
            ("models", str(broken_model), "cannot be loaded"),
            ("models", str(tmp_path / "bad-registry.yaml"), "cannot be loaded"),
            ("output", str(tmp_path / "a-file"), "is a file"),
            ("settle_minutes", float("inf"), "settle_minutes must be"),
            ("settle_minutes", 1e12, "settle_minutes must be"),
            ("partitions", ["category", "category"], "name a level twice")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**base, key: value}))
        code = job.main(["--config", str(path)])
        err = capsys.readouterr().err.strip()
        assert code == audit_summary.EXIT_USAGE, (key, value, err)
        assert err.count("\n") == 0 and named in err, (key, value, err)
        assert not (tmp_path / "out").exists(), (key, value)
    assert job.main(["--config", str(tmp_path / "in")]) == audit_summary.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path / "in") in err, err


# ------------------------------------------------------------ item 14: symlinks out of the source

def test_folder_sources_do_not_follow_symlinks_out_of_the_source(tmp_path):
    """Item 14: `ln -s / SRC/x` listed every file of the machine. Folder links out of the
    source are now not followed and file links out of it are error rows, unless allowed."""
    from stfpm.scoring.sources import list_inputs

    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    _images(src / "a", 1)
    _images(elsewhere, 2)
    (src / "root").symlink_to("/")
    (src / "out").symlink_to(elsewhere)
    (src / "a" / "link.png").symlink_to(elsewhere / "0.png")
    (src / "inside").symlink_to(src / "a")  # a link within the source is followed (each real folder once)
    table = list_inputs(str(src), [])
    rows = dict(zip(table["image_uri"].to_pylist(), table["_input_error"].to_pylist()))
    assert sorted(rows) == [str(src / "a" / "0.png"), str(src / "a" / "link.png")], sorted(rows)[:5]
    assert rows[str(src / "a" / "0.png")] is None and "allow_roots" in rows[str(src / "a" / "link.png")]
    allowed = list_inputs(str(src), [], allow_roots=[str(src), str(elsewhere)])
    names = allowed["image_uri"].to_pylist()
    assert str(src / "out" / "1.png") in names and not any(n.startswith(str(src / "root")) for n in names)
    assert allowed["_input_error"].null_count == len(allowed)


# ------------------------------------------------------------ item 17: S3 faults

def test_wrong_s3_credentials_and_a_missing_output_bucket_are_one_line_before_scoring(model, tmp_path, s3_env,
                                                                                       monkeypatch):
    """Item 17: wrong credentials gave a traceback (exit 1); a missing output bucket failed only
    after every image was scored. Both are now one line, exit 2, before any work."""
    import boto3
    from moto.core import set_initial_no_auth_action_count

    data = tmp_path / "data"
    _images(data, 2)
    for i in range(2):
        boto3.client("s3").put_object(Bucket=s3_env, Key=f"in/{i}.png", Body=(data / f"{i}.png").read_bytes())
    missing = CliRunner().invoke(app, ["score", str(model), str(data), "s3://no-such-bucket-here/out"])
    assert missing.exit_code == 2, missing.output
    assert missing.output.strip().splitlines() == [
        "error: s3://no-such-bucket-here/out: the bucket 'no-such-bucket-here' does not exist; create it or "
        "name another output"]

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG")

    @set_initial_no_auth_action_count(0)  # moto checks credentials in here
    def score_with_wrong_credentials(*args):
        return CliRunner().invoke(app, ["score", *args])

    for args in ([str(model), f"s3://{s3_env}/in", str(tmp_path / "o")],
                 [str(model), str(data), f"s3://{s3_env}/out"]):
        result = score_with_wrong_credentials(*args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert "check the credentials" in lines[0] and f"s3://{s3_env}" in lines[0]
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------ item 16: multi-frame images

def test_a_multi_frame_image_is_scored_with_a_note(tmp_path):
    """Item 16: multi-page TIFFs and animated PNGs scored their first frame with no note."""
    import cv2
    import pyarrow as pa

    from stfpm.scoring.stages import load_images

    frames = [np.full((48, 48, 3), 40 * i, np.uint8) for i in range(3)]
    assert cv2.imwritemulti(str(tmp_path / "pages.tiff"), frames)
    cv2.imwrite(str(tmp_path / "one.tiff"), frames[0])
    uris = [str(tmp_path / "pages.tiff"), str(tmp_path / "one.tiff")]
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is not None:
        pictures = [Image.fromarray(f) for f in frames]
        pictures[0].save(tmp_path / "moving.png", save_all=True, append_images=pictures[1:])
        uris.append(str(tmp_path / "moving.png"))
    none = pa.array([None] * len(uris), pa.string())
    batch = pa.table({"image_uri": uris, "status": none, "error": none, "error_kind": none,
                      "_size": pa.array([32] * len(uris), pa.int32())})
    rows = load_images(batch, 10**8, 1 << 20).select(["status", "error"]).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * len(uris)
    assert rows[0]["error"] == "frames: a multi-page TIFF; only the first page was scored"
    assert rows[1]["error"] is None
    if Image is not None:
        assert rows[2]["error"] == "frames: an animated PNG of 3 frames; only the first was scored"


# ------------------------------------------------------------ item 15: memory under large images

def test_overlays_of_large_images_carry_a_bounded_picture(model, tmp_path):
    """Item 15: with overlays on, every row carried its full decoded image to the maps stage
    (three 100-MP images took ~3 GiB per worker). Now at most OVERLAY_MAX_PIXELS travel, and
    the overlay is drawn at that size; the map stays at the input's size."""
    import cv2

    from stfpm.scoring.plan import plan_run
    from stfpm.scoring.stages import OVERLAY_MAX_PIXELS, ScoreActor, load_images, write_maps
    from test_scoring import encode, texture

    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.png").write_bytes(encode(texture(rng, 1800, 3000)))  # 5.4 MP
    (tmp_path / "in" / "small.png").write_bytes(encode(texture(rng, 64, 96)))
    plan = plan_run(str(model), str(tmp_path / "in"), str(tmp_path / "out"))
    decoded = load_images(plan.pending, 10**8, 1 << 28, keep_images=True)
    sizes = dict(zip([Path(u).name for u in decoded["image_uri"].to_pylist()],
                     [len(b) for b in decoded["_decoded"].to_pylist()]))
    assert sizes["big.png"] <= 8 + 3 * OVERLAY_MAX_PIXELS < 8 + 3 * 1800 * 3000
    assert sizes["small.png"] == 8 + 3 * 64 * 96
    rows = write_maps(ScoreActor({"": str(model)}, None, str(tmp_path / "cache"))(decoded), str(tmp_path / "out"))
    for row in rows.to_pylist():
        assert row["status"] == "ok" and row["is_anomaly"] and row["overlay_uri"], row
        drawn = cv2.imread(row["overlay_uri"])
        heat = cv2.imread(row["map_uri"], cv2.IMREAD_GRAYSCALE)
        assert heat.shape == (row["height"], row["width"])
        # the overlay is the picture under a caption strip (issue 25): the picture is what is bounded
        picture_height = round(drawn.shape[1] * row["height"] / row["width"])
        assert drawn.shape[1] * picture_height <= OVERLAY_MAX_PIXELS * 1.01
        assert 0 <= drawn.shape[0] - picture_height < 200
        if row["width"] == 96:
            assert drawn.shape[1] == 96  # a small image is drawn at its own size
        else:
            assert drawn.shape[1] < 3000
