"""Issue 25 items 4 and 8: the audit says why it decided (min_images, the settle window, the
levels crossed) in audit.json and report.html, and shows the trend of the last nights per
category, checked on a screenshot of the report in headless Chromium."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest

from stfpm.audit import run as audit_run, summary as audit_summary
from stfpm.audit.trend import collect_trend
from stfpm.scoring.table import table_schema


def _rows(category: str, n: int, n_anomalous: int, n_ood: int = 0, n_errors: int = 0, now=None) -> list[dict]:
    now = now or datetime.now(timezone.utc)
    rows = []
    for i in range(n + n_errors):
        row = {c: None for c in table_schema(["category"]).names}
        row.update(image_id=f"{category}{i}", image_uri=f"/in/{category}/{i}.png", category=category,
                   model_name=category, model_version="v1", run_id="r", scored_at=now)
        if i < n:
            row.update(status="ok", raw_score=0.2 if i < n_anomalous else 0.05, score=0.8 if i < n_anomalous else 0.3,
                       is_anomaly=i < n_anomalous, threshold=0.1, width=8, height=8, ood=i < n_ood,
                       map_uri=f"/out/maps/v1/{category}{i}.png",
                       ood_score=3.0 if i < n_ood else 0.4)
        else:
            row.update(status="error", error="decode: not an image", error_kind="input")
        rows.append(row)
    return rows


def _summary(rows: list[dict], cfg, run_id: str = "r", until=None, waiting=None) -> dict:
    table = pa.Table.from_pylist(rows, schema=table_schema(["category"]))
    return audit_summary.summarize(table, table.select(["image_uri"]), cfg, run_id=run_id, since=None,
                                   until=until or datetime.now(timezone.utc), attempts=1, scoring=None,
                                   waiting=waiting)


def test_a_category_above_its_level_but_below_min_images_says_why_it_did_not_alert(tmp_path):
    """The issue's case: 40% anomalous (level 5%) among 5 images with min_images 10 exits 0,
    and both audit.json and the report say that too few images kept it from alerting."""
    cfg = audit_run.AuditConfig(source=str(tmp_path), output=str(tmp_path / "out"), models="m", partitions=["category"],
                                alert=audit_run.AlertConfig(min_images=10))
    summary = _summary(_rows("few", 5, 2) + _rows("many", 20, 0), cfg)
    assert summary["exit_code"] == audit_summary.EXIT_OK and summary["alerts"] == []
    few, many = summary["categories"]["few"], summary["categories"]["many"]
    assert [w["check"] for w in few["why"]] == ["min_images"]
    assert few["why"][0]["outcome"] == "not checked"
    assert "only 5 image(s) scored ok, fewer than alert.min_images (10)" in few["why"][0]["text"]
    assert "although the anomaly rate 40.00% is above its level 5.00%" in few["why"][0]["text"]
    assert [(w["check"], w["outcome"]) for w in many["why"]] == [("anomaly_rate", "ok"), ("ood_rate", "ok")]
    assert "anomaly rate 0.00% (0 of 20) is at or under alert.anomaly_rate 5.00%" in many["why"][0]["text"]
    assert summary["why"][0].startswith("exit 0 (ok)")
    assert any("too few images" in w and "few" in w for w in summary["why"])
    json.dumps(summary)  # audit.json holds it as it is
    text = audit_run.render_report(summary, str(tmp_path / "report.html"))
    assert "although the anomaly rate 40.00% is above its level 5.00%" in text and "too few images" in text


def test_an_alert_names_every_level_it_crossed(tmp_path):
    cfg = audit_run.AuditConfig(source=str(tmp_path), output=str(tmp_path / "out"), models="m", partitions=["category"])
    summary = _summary(_rows("bad", 20, 4, n_ood=2), cfg)
    assert summary["exit_code"] == audit_summary.EXIT_ALERT
    why = summary["categories"]["bad"]["why"]
    assert [(w["check"], w["outcome"]) for w in why] == [("anomaly_rate", "alert"), ("ood_rate", "alert")]
    assert "anomaly rate 20.00% (4 of 20) is above alert.anomaly_rate 5.00%" in why[0]["text"]
    assert "(2 of 20) is above alert.ood_rate 2.00%" in why[1]["text"]
    assert summary["why"][0].startswith("exit 3 (alert): 1 category above an alert level: bad: anomaly rate 20.00%")


def test_a_first_run_with_every_file_in_the_settle_window_says_what_waits(tmp_path):
    """The issue's case: 25 files just arrived; the run scores none of them (0 inputs, no
    model needed) and says that 25 wait in the settle window and from when they are taken."""
    source = tmp_path / "in" / "bottle"
    source.mkdir(parents=True)
    png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    for i in range(25):
        (source / f"{i:03d}.png").write_bytes(png)
    from test_scoring import make_model  # the audit checks its model before anything else

    cfg = audit_run.AuditConfig(source=str(tmp_path / "in"), output=str(tmp_path / "out"),
                                models=str(make_model(tmp_path / "model", seed=0)), settle_minutes=15)
    result = audit_run.run_audit(cfg, verbose=False)
    summary = json.loads((tmp_path / "out" / "runs" / result.run_id / "audit.json").read_text())
    assert summary["totals"]["inputs"] == 0 and result.exit_code == 0
    waiting = summary["window"]["waiting"]
    assert waiting["count"] == 25 and waiting["settle_minutes"] == 15
    latest = datetime.fromisoformat(waiting["latest_arrival"])
    assert datetime.fromisoformat(waiting["taken_after"]) == latest + timedelta(minutes=15)
    text = " ".join(summary["why"])
    assert "0 input(s) new since the last finished run" in text
    assert "25 file(s) arrived within the last 15 minutes" in text
    assert f"taken by a run started after {waiting['taken_after']}" in text
    assert "25 file(s) arrived within the last 15 minutes" in Path(result.report).read_text()


def _night(output: Path, cfg, run_id: str, until: datetime, rows: list[dict]) -> dict:
    """A finished night as the audit leaves it: runs/<run_id>/audit.json and its state entry."""
    summary = _summary(rows, cfg, run_id=run_id, until=until)
    (output / "runs" / run_id).mkdir(parents=True)
    (output / "runs" / run_id / "audit.json").write_text(json.dumps(summary))
    return {"run_id": run_id, "until": summary["window"]["until"]}


def test_the_trend_reads_the_last_nights_from_output_and_a_screenshot_shows_it(tmp_path):
    output = tmp_path / "out"
    cfg = audit_run.AuditConfig(source=str(tmp_path), output=str(output), models="m", partitions=["category"])
    start = datetime(2026, 11, 1, 2, 0, tzinfo=timezone.utc)
    runs = []
    for night in range(35):  # anomalies grow over the nights; "screw" is missing on night 33
        rows = _rows("bottle", 40 + night, night // 3, n_ood=1 if night % 7 == 0 else 0, n_errors=night % 2)
        if night != 33:
            rows += _rows("screw", 10, 1)
        runs.append(_night(output, cfg, f"night{night:02d}", start + timedelta(days=night), rows))
    (output / "runs" / "night10" / "audit.json").unlink()  # a pruned run is left out, not an error
    current = _summary(_rows("bottle", 80, 20) + _rows("screw", 10, 0), cfg, run_id="tonight",
                       until=start + timedelta(days=35))
    trend = collect_trend(str(output), runs, current)
    assert [n["run_id"] for n in trend["nights"]] == [f"night{i:02d}" for i in range(6, 35) if i != 10] + ["tonight"]
    bottle, screw = trend["categories"]["bottle"], trend["categories"]["screw"]
    assert [p["inputs"] for p in bottle] == [40 + i + i % 2 for i in range(6, 35) if i != 10] + [80]
    assert bottle[-1]["anomaly_rate"] == 0.25 and bottle[0]["anomaly_rate"] == 2 / 46
    assert bottle[1]["error_rate"] == 1 / 48 and bottle[1]["ood_rate"] == 1 / 47  # night 7
    night33 = [p for p in screw if p["run_id"] == "night33"][0]
    assert night33 == {"run_id": "night33", "until": runs[33]["until"], "inputs": 0, "anomaly_rate": None,
                       "ood_rate": None, "error_rate": None}
    current["trend"] = trend
    report = tmp_path / "report.html"
    report.write_text(audit_run.render_report(current, str(report)))
    text = report.read_text()
    assert "<script" not in text and text.count("<svg") == 2 * 4 + 2  # 4 trend charts + a histogram per category
    assert "Trend: the last 29 night(s)" in text
    shot = screenshot(report, tmp_path / "shot.png")
    # the trend's lines (#5c8fd6) and points (#1f4e99) are drawn: pixels of both colours in the page
    rgb = shot[:, :, ::-1].reshape(-1, 3).astype(int)
    for colour in ((0x5c, 0x8f, 0xd6), (0x1f, 0x4e, 0x99)):
        assert (np.abs(rgb - colour).sum(axis=1) < 30).sum() > 50, colour


def screenshot(page: Path, out: Path, size: str = "1200,1600") -> np.ndarray:
    """`page` as headless Chromium draws it (no JavaScript), as a BGR image; skipped without Chromium."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-javascript",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--hide-scrollbars", f"--window-size={size}",
             f"--screenshot={out}", page.as_uri()], capture_output=True, text=True, timeout=180,
            env={**os.environ, "HOME": profile})
    assert out.is_file(), f"no screenshot from Chromium:\n{done.stderr[-2000:]}"
    return cv2.imread(str(out))
