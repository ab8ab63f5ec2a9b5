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
        with pytest.raises(ValueError, match="scoring.threshold must be a finite number >= 0"):
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
