"""The operator's path: jobs/train.py and jobs/nightly_audit.py submitted with
JobSubmissionClient to a real `ray start --head` on 127.0.0.1 with token authentication on
(as Ray 2.60 sets up local clusters), night after night: new images only, an alert, a
failed night and its retry. Then the audit's listing, state and report without Ray (local
folders and S3 on a moto server, presigned links), and every image of the HTML reports
loaded in headless Chromium.

The head is this test's own (its own temp dir, ports, token) and is stopped by killing its
own processes, never with `ray stop`, which would stop every Ray on the machine."""
from __future__ import annotations

import html
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import stfpm
from stfpm.audit import run as audit_run, summary as audit_summary
from stfpm.data.synth import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


# ------------------------------------------------------------------------------ the head

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    table = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = (proc / "status").read_text()
        except OSError:
            continue
        ppid = int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))
        table[int(proc.name)] = (ppid, cmdline)
    return table


def _kill_tree(is_root) -> None:
    """SIGTERM the processes `is_root(cmdline)` selects and all their descendants, then
    SIGKILL what is left after 5 s."""
    table = _processes()
    pids = {pid for pid, (_, cmd) in table.items() if is_root(cmd)}
    while kids := {pid for pid, (ppid, _) in table.items() if ppid in pids} - pids:
        pids |= kids
    pids.discard(os.getpid())
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() and _running(p) for p in pids):
            time.sleep(0.2)


def _running(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


class Head:
    """A `ray start --head` of our own with token auth: its own temp dir, ports and token."""

    def __init__(self, working_dir: Path):
        from ray.job_submission import JobSubmissionClient

        self.temp_dir = tempfile.mkdtemp(prefix="stfpm-rayhead-", dir="/tmp")  # short: socket paths
        self.token = uuid.uuid4().hex
        self.ports = {name: _free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                                      "dashboard-agent-listen-port")}
        # A clean environment: no RAY_ADDRESS or auth settings of whoever runs the tests
        # (~/.ray/auth_token may or may not exist), token auth on with our own token.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0")
        ray_cli = Path(sys.executable).with_name("ray")
        command = [str(ray_cli) if ray_cli.exists() else shutil.which("ray"), "start", "--head",
                   "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
                   "--include-dashboard=true", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
                   *(f"--{name}={port}" for name, port in self.ports.items())]
        started = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=180)
        if started.returncode:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}")
        self.address = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.client = JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})
        self.working_dir = str(working_dir)

    def submit(self, *args: str) -> str:
        """`ray job submit --working-dir ... -- python ARGS`, with this environment's python
        (job entrypoints run with the head's PATH)."""
        return self.client.submit_job(entrypoint=shlex.join([sys.executable, *args]),
                                      runtime_env={"working_dir": self.working_dir})

    def wait(self, job_id: str, timeout: float = 300):
        deadline = time.time() + timeout
        while str(self.client.get_job_status(job_id)) not in TERMINAL:
            if time.time() > deadline:
                self.client.stop_job(job_id)
                raise TimeoutError(f"job {job_id} still running after {timeout} s:\n"
                                   f"{self.client.get_job_logs(job_id)[-5000:]}")
            time.sleep(1)
        return self.client.get_job_info(job_id)

    def run(self, *args: str, timeout: float = 300):
        job_id = self.submit(*args)
        return self.wait(job_id, timeout), self.client.get_job_logs(job_id)

    def stop(self) -> None:
        client_port = f"--port={self.ports['ray-client-server-port']}"
        _kill_tree(lambda cmd: self.temp_dir in cmd or ("ray.util.client.server" in cmd and client_port in cmd))
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Two synthetic categories to train on, the job's working dir (jobs/ and the stfpm
    package being tested, as `--working-dir .` uploads them) and a folder of incoming images."""
    root = tmp_path_factory.mktemp("jobs")
    make_synthetic_dataset(root / "data" / "a", n_train=10, n_test=8, size=64, seed=1)
    make_synthetic_dataset(root / "more" / "b", n_train=2, n_test=8, size=64, seed=2)  # images only
    wd = root / "wd"
    shutil.copytree(REPO / "jobs", wd / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(Path(stfpm.__file__).parent, wd / "stfpm", ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.fixture(scope="module")
def head(site):
    h = Head(site / "wd")
    yield h
    h.stop()


def test_head_requires_the_token(head):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{head.address}/api/jobs/", timeout=10)
    assert e.value.code == 401
    assert head.client.list_jobs() is not None


# --------------------------------------------------------------------------- the jobs

def _incoming(site: Path, n_per_category: int, tag: str, start: int = 0) -> list[str]:
    """Copy test images of both categories into incoming/<category>/<line>/; returns their paths."""
    made = []
    for category, data in (("a", "data"), ("b", "more")):
        sources = sorted((site / data / category / "test").rglob("*.png"))
        for i in range(start, start + n_per_category):
            dest = site / "incoming" / category / f"l{i % 2}" / f"{tag}_{i}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(sources[i % len(sources)], dest)
            made.append(str(dest))
    return made


def _config(site: Path, name: str, **overrides) -> Path:
    doc = {"source": str(site / "incoming"), "partitions": ["category", "line"],
           "models": str(site / "models" / "audit-registry.yaml"), "output": str(site / "audit"),
           "settle_minutes": 0, "alert": {"anomaly_rate": 1.0, "ood_rate": 1.0}, "report": {"top_k": 4},
           "scoring": {"batch_size": 8}}
    for key, value in overrides.items():
        doc[key] = {**doc[key], **value} if isinstance(value, dict) else value
    path = site / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _state(site: Path) -> dict:
    return json.loads((site / "audit" / audit_run.STATE).read_text())


def _run_dir(site: Path, run_id: str) -> Path:
    return site / "audit" / "runs" / run_id


def test_train_job_writes_a_model_per_category_and_the_registry(head, site):
    """DATA is a folder of categories (one here, to keep the test short): a model per
    category trained on Ray Train workers, and the registry."""
    info, logs = head.run("jobs/train.py", "--data", str(site / "data"), "--out", str(site / "models"),
                          "--workers", "1", "--backbone", "efficientnet_lite0",
                          "--epochs", "1", "--image-size", "64", "--batch-size", "4")
    assert str(info.status) == "SUCCEEDED", logs[-5000:]
    assert yaml.safe_load((site / "models" / "registry.yaml").read_text()) == {"models": {"a": "a"}}
    meta = json.loads((site / "models" / "a" / "model.json").read_text())
    assert meta["input"]["size"] == 64 and meta["model_version"]
    assert (site / "models" / "_checkpoints").is_dir()  # Ray Train checkpoints, for a resubmission to resume
    # the audit's registry: category b is scored by a's model too
    (site / "models" / "audit-registry.yaml").write_text(yaml.safe_dump({"models": {"a": "a", "b": "a"}}))


def test_nightly_audit_nights_alert_failure_and_retry(head, site):
    # night 1, submitted by the cron script: every image so far, one of them corrupt;
    # alert levels 100% -> exit 0 (b's images, scored by a's model, are counted as unlike its
    # training images, but not alerted on). Started twice the same night, it submits one job.
    night1 = _incoming(site, 4, "n1")
    broken = site / "incoming" / "b" / "l0" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    night1.append(str(broken))
    cron = [shutil.which("bash"), str(REPO / "cluster" / "nightly_audit_cron.sh"), str(_config(site, "normal"))]
    env = {**head.env, "RAY_ADDRESS": head.address, "WORKING_DIR": head.working_dir, "NIGHT": "test-night-1",
           "JOB_PYTHON": sys.executable, "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    first = subprocess.run(cron, env=env, capture_output=True, text=True, timeout=400)
    assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-3000:]
    again = subprocess.run(cron, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already submitted" in again.stdout, again.stdout[-3000:]
    assert [j.submission_id for j in head.client.list_jobs()].count("stfpm-audit-test-night-1") == 1
    state = _state(site)
    run1 = state["last_success"]["run_id"]
    summary = json.loads((_run_dir(site, run1) / "audit.json").read_text())
    assert summary["totals"]["inputs"] == len(night1) == 9
    assert summary["totals"]["error"] == 1 and summary["totals"]["ok"] == 8
    assert set(summary["categories"]) == {"a", "b"}
    assert summary["categories"]["b"]["errors"]["examples"][0][0] == str(broken)
    assert (summary["categories"]["a"]["ood"], summary["categories"]["b"]["ood"]) == (0, 4)  # the misrouted ones
    assert summary["status"] == "ok" and summary["exit_code"] == 0
    assert_every_image_loads(_run_dir(site, run1) / "report.html", at_least=8)
    # a Ray job scores on its cluster's layout (separate decode tasks), not one machine's
    assert json.loads((_run_dir(site, run1) / "_SUCCESS").read_text())["layout"]["fused"] is False

    # night 2: only the new images; threshold 0 makes every one anomalous, so the alert
    # level 0% is exceeded -> exit 3 (Ray reports the job FAILED, with driver exit code 3)
    night2 = _incoming(site, 2, "n2", start=4)
    alerting = _config(site, "alerting", alert={"anomaly_rate": 0.0}, scoring={"threshold": 0.0})
    info, logs = head.run("jobs/nightly_audit.py", "--config", str(alerting))
    assert info.driver_exit_code == 3, logs[-5000:]
    state = _state(site)
    run2 = state["last_success"]["run_id"]
    summary = json.loads((_run_dir(site, run2) / "audit.json").read_text())
    assert run2 != run1 and summary["totals"]["inputs"] == len(night2) == 4
    assert summary["status"] == "alert" and summary["alerts"] == ["a", "b"]
    assert all(t["overlay_uri"] for c in summary["categories"].values() for t in c["top"])
    assert_every_image_loads(_run_dir(site, run2) / "report.html", at_least=8)

    # night 3: the report cannot be written (a folder is in its way) -> exit 1, the state
    # keeps the run open and the cut-off where it was
    night3 = _incoming(site, 1, "n3", start=6)
    job_id = head.submit("jobs/nightly_audit.py", "--config", str(_config(site, "normal")))
    deadline = time.time() + 120
    while not (_state(site).get("open_run") or {}).get("run_id"):
        assert time.time() < deadline, head.client.get_job_logs(job_id)[-5000:]
        time.sleep(0.2)
    run3 = _state(site)["open_run"]["run_id"]
    blocker = _run_dir(site, run3) / "report.html"
    blocker.mkdir(parents=True)
    info = head.wait(job_id)
    assert info.driver_exit_code == 1, head.client.get_job_logs(job_id)[-5000:]
    state = _state(site)
    assert state["last_success"]["run_id"] == run2
    assert state["open_run"]["run_id"] == run3 and state["open_run"]["attempts"] == 1
    assert "report.html" in state["open_run"]["last_error"]
    scored_before = pq.read_table(_run_dir(site, run3) / "scores")
    assert scored_before.num_rows == len(night3) == 2

    # the next night retries run 3: same run folder, its scored images skipped, the images
    # that arrived since then scored, the state advanced
    blocker.rmdir()
    night4 = _incoming(site, 1, "n4", start=7)
    info, logs = head.run("jobs/nightly_audit.py", "--config", str(_config(site, "normal")))
    assert info.driver_exit_code == 0, logs[-5000:]
    state = _state(site)
    assert state["open_run"] is None and state["last_success"]["run_id"] == run3
    assert state["last_success"]["attempts"] == 2 and [r["run_id"] for r in state["runs"]] == [run1, run2, run3]
    summary = json.loads((_run_dir(site, run3) / "audit.json").read_text())
    assert summary["totals"]["inputs"] == len(night3) + len(night4)
    assert summary["scoring"]["counts"]["skipped_already_scored"] == len(night3)
    assert summary["scoring"]["counts"]["scored"] == len(night4)

    # every image that ever arrived was scored exactly once, in exactly one run
    rows = pa.concat_tables([pq.read_table(_run_dir(site, r) / "scores", columns=["image_uri"])
                             for r in (run1, run2, run3)])["image_uri"].to_pylist()
    arrived = sorted(str(p) for p in (site / "incoming").rglob("*.png"))
    assert sorted(rows) == arrived and len(set(rows)) == len(rows) == 9 + 4 + 4
    assert set(night4) <= set(rows)


# ------------------------------------------------------------ audit pieces without Ray

def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_local_listing_takes_the_window_and_skips_hidden_other_types_and_the_output(tmp_path):
    src = tmp_path / "in"
    old = _touch(src / "a" / "l1" / "old.png")
    time.sleep(0.05)
    cut = datetime.now(timezone.utc)
    time.sleep(0.05)
    new = _touch(src / "a" / "l2" / "new.JPG")
    _touch(src / "b" / "new.png")
    _touch(src / "a" / ".cache" / "x.png")
    _touch(src / "a" / ".x.png")
    _touch(src / "notes.txt")
    _touch(src / "out" / "maps" / "m.png")
    cfg = audit_run.AuditConfig(source=str(src), output=str(src / "out"), models="m", partitions=["category", "line"])
    later = datetime.now(timezone.utc) + timedelta(seconds=1)
    everything = audit_run.list_arrivals(cfg, None, later).to_pylist()
    assert [r["image_uri"] for r in everything] == [str(old), str(new), str(src / "b" / "new.png")]
    assert [(r["category"], r["line"]) for r in everything] == [("a", "l1"), ("a", "l2"), ("b", None)]
    assert [r["image_uri"] for r in audit_run.list_arrivals(cfg, cut, later).to_pylist()] == [str(new),
                                                                                         str(src / "b" / "new.png")]
    assert audit_run.list_arrivals(cfg, None, cut).column("image_uri").to_pylist() == [str(old)]
    # a file copied with its old mtime kept (rsync -a, cp -p) still arrives now, by its ctime
    kept = _touch(src / "a" / "l1" / "copied.png")
    os.utime(kept, (0, 0))
    assert str(kept) in audit_run.list_arrivals(cfg, cut, later + timedelta(seconds=5)).column("image_uri").to_pylist()


def test_s3_listing_by_last_modified_and_manifest_mode(s3_env, tmp_path):
    import boto3

    s3 = boto3.client("s3")
    for key in ("in/a/l1/x.png", "in/b/l2/y.jpg", "in/a/.hidden/z.png", "in/readme.md", "in/out/maps/m.png"):
        s3.put_object(Bucket=s3_env, Key=key, Body=b"x")
    cfg = audit_run.AuditConfig(source=f"s3://{s3_env}/in", output=f"s3://{s3_env}/in/out", models="m",
                            partitions=["category"])
    now = datetime.now(timezone.utc) + timedelta(seconds=2)
    rows = audit_run.list_arrivals(cfg, None, now).to_pylist()
    assert [(r["image_uri"], r["category"], r["size_bytes"]) for r in rows] == [
        (f"s3://{s3_env}/in/a/l1/x.png", "a", 1), (f"s3://{s3_env}/in/b/l2/y.jpg", "b", 1)]
    assert audit_run.list_arrivals(cfg, now, now + timedelta(hours=1)).num_rows == 0
    assert audit_run.list_arrivals(cfg, None, now - timedelta(hours=1)).num_rows == 0

    # manifests: each one that arrived in the window contributes its entries
    s3.put_object(Bucket=s3_env, Key="manifests/night1.txt",
                  Body=f"s3://{s3_env}/in/a/l1/x.png\n# comment\ns3://{s3_env}/in/b/l2/y.jpg\n".encode())
    table = pa.table({"image_uri": [f"s3://{s3_env}/elsewhere/q.png"], "category": ["c"]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    s3.put_object(Bucket=s3_env, Key="manifests/night1.parquet", Body=sink.getvalue().to_pybytes())
    cfg = audit_run.AuditConfig(manifests=f"s3://{s3_env}/manifests/", root=f"s3://{s3_env}/in",
                            output=f"s3://{s3_env}/audit", models="m", partitions=["category"])
    rows = audit_run.list_arrivals(cfg, None, now).to_pylist()
    assert [(r["image_uri"].rsplit("/", 1)[1], r["category"]) for r in rows] == [
        ("q.png", "c"), ("x.png", "a"), ("y.jpg", "b")]
    cfg.root = None
    with pytest.raises(ValueError, match="set `root`"):
        audit_run.list_arrivals(cfg, None, now)


def test_config_is_checked_and_a_bad_one_exits_2(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "m.yaml").write_text("models: {}\n")
    base = {"source": str(tmp_path / "in"), "output": str(tmp_path / "out"), "models": str(tmp_path / "m.yaml")}
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({**base, "alert": {"anomaly_rate": 0.1, "categories": {"a": 0.2}},
                                    "scoring": {"actors": "1..4", "gpus_per_actor": 1}}))
    cfg = audit_run.load_config(str(good))
    assert cfg.alert.level("a") == 0.2 and cfg.alert.level("b") == 0.1 and cfg.scoring.actors == "1..4"
    for bad, message in (({**base, "aler": {}}, "unknown keys"), ({**base, "manifests": "m/"}, "exactly one"),
                         ({**base, "alert": {"anomaly_rate": 5}}, "between 0 and 1"),
                         ({**base, "scoring": {"gpus": 1}}, "unknown keys")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match=message):
            audit_run.load_config(str(path))
    spec = importlib.util.spec_from_file_location("nightly_audit", REPO / "jobs" / "nightly_audit.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["--config", str(path)]) == audit_summary.EXIT_USAGE
    assert "unknown keys" in capsys.readouterr().err


def test_a_night_without_arrivals_commits_an_empty_report(tmp_path):
    from test_scoring import make_model  # the audit checks its model before anything else

    (tmp_path / "in").mkdir()
    model = str(make_model(tmp_path / "model", seed=0))
    cfg = audit_run.AuditConfig(source=str(tmp_path / "in"), output=str(tmp_path / "out"), models=model)
    result = audit_run.run_audit(cfg, verbose=False)
    assert result.exit_code == 0 and result.summary["totals"]["inputs"] == 0
    assert "No images arrived" in Path(result.report).read_text()
    state = json.loads((tmp_path / "out" / audit_run.STATE).read_text())
    assert state["open_run"] is None and state["last_success"]["run_id"] == result.run_id
    other = audit_run.AuditConfig(source=str(tmp_path), output=str(tmp_path / "out"), models=model)
    with pytest.raises(ValueError, match="another input"):
        audit_run.run_audit(other, verbose=False)


def _png(seed: int, size: int = 32, gray: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size) if gray else (size, size, 3), dtype=np.uint8)
    return cv2.imencode(".png", image)[1].tobytes()


def test_report_on_s3_links_presigned_urls_that_load_and_escapes_names(s3_env, tmp_path):
    """Score rows as the scorer writes them (inputs, maps and overlays in a private bucket);
    the report's presigned links load in Chromium, and odd file names stay text."""
    import boto3

    from stfpm.scoring.table import table_schema

    s3 = boto3.client("s3")
    rows, now = [], datetime.now(timezone.utc)
    names = ["a/ok.png", "a/<b>odd & 'name'.png", "b/x.png", "b/broken.png"]
    for i, name in enumerate(names):
        ok, uri = name != "b/broken.png", f"s3://{s3_env}/in/{name}"
        s3.put_object(Bucket=s3_env, Key=f"in/{name}", Body=_png(i) if ok else b"junk")
        row = {c: None for c in table_schema(["category"]).names}
        row.update(image_id=f"id{i}", image_uri=uri, category=name.split("/")[0], model_name=name[0],
                   model_version="v1", status="ok" if ok else "error", run_id="r", scored_at=now)
        if ok:
            s3.put_object(Bucket=s3_env, Key=f"out/maps/v1/id{i}.png", Body=_png(10 + i, gray=True))
            row.update(raw_score=0.1 * i, score=0.3 * i, is_anomaly=i >= 1, threshold=0.1, width=32, height=32,
                       map_uri=f"s3://{s3_env}/out/maps/v1/id{i}.png")
            if i >= 1:
                s3.put_object(Bucket=s3_env, Key=f"out/overlays/v1/id{i}.png", Body=_png(20 + i))
                row["overlay_uri"] = f"s3://{s3_env}/out/overlays/v1/id{i}.png"
        else:
            row["error"] = "decode: not a PNG, JPEG ..."
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=table_schema(["category"]))
    cfg = audit_run.AuditConfig(source=f"s3://{s3_env}/in", output=f"s3://{s3_env}/out", models="m",
                            partitions=["category"], alert=audit_run.AlertConfig(anomaly_rate=0.4, min_images=2))
    summary = audit_summary.summarize(table, table.select(["image_uri"]), cfg, run_id="r", since=None, until=now,
                                      attempts=1, scoring=None)
    assert summary["alerts"] == ["a"] and summary["exit_code"] == audit_summary.EXIT_ALERT
    assert summary["categories"]["a"]["anomaly_rate"] == 0.5
    b = summary["categories"]["b"]
    assert (b["ok"], b["error"], b["anomaly_rate"]) == (1, 1, 1.0)
    assert b["alert"] is False  # above its level, but fewer ok images than alert.min_images
    assert b["errors"] == {"by_kind": {"decode": 1}, "examples": [[f"s3://{s3_env}/in/b/broken.png",
                                                                  "decode: not a PNG, JPEG ..."]]}
    report = tmp_path / "report.html"
    report.write_text(audit_run.render_report(summary, str(report), link_expiry_hours=1))
    text = report.read_text()
    assert "<b>odd" not in text and "&lt;b&gt;odd &amp; &#x27;name&#x27;.png" in text
    assert "X-Amz-Signature" in text and "s3://" not in re.sub(r"<code>.*?</code>|alt='[^']*'", "", text)
    assert_every_image_loads(report, at_least=6)


def test_inputs_unlike_the_training_images_are_counted_and_alerted(tmp_path):
    """Issue 13: a category whose images the model calls ood (a misrouted category, a changed
    camera) alerts though none is anomalous; a single ood input among many is listed, not alerted."""
    from stfpm.scoring.table import table_schema

    now, rows = datetime.now(timezone.utc), []
    for category, n, n_ood in (("misrouted", 5, 5), ("fine", 100, 1)):
        for i in range(n):
            row = {c: None for c in table_schema(["category"]).names}
            row.update(image_id=f"{category}{i}", image_uri=f"/in/{category}/{i}.png", category=category,
                       model_name=category, model_version="v1", status="ok", run_id="r", scored_at=now,
                       raw_score=0.05, score=0.3, is_anomaly=False, threshold=0.1, width=8, height=8,
                       map_uri=f"/out/maps/v1/{category}{i}.png",
                       ood=i < n_ood, ood_score=40.0 - i if i < n_ood else 0.4)
            rows.append(row)
    table = pa.Table.from_pylist(rows, schema=table_schema(["category"]))
    cfg = audit_run.AuditConfig(source=str(tmp_path), output=str(tmp_path / "out"), models="m", partitions=["category"])
    summary = audit_summary.summarize(table, table.select(["image_uri"]), cfg, run_id="r", since=None, until=now,
                                      attempts=1, scoring=None)
    assert summary["alerts"] == ["misrouted"] and summary["exit_code"] == audit_summary.EXIT_ALERT
    assert summary["totals"]["ood"] == 6 and summary["totals"]["anomalous"] == 0
    bad, fine = summary["categories"]["misrouted"], summary["categories"]["fine"]
    assert (bad["ood"], bad["ood_rate"], fine["ood"], fine["alert"]) == (5, 1.0, 1, False)
    assert "unlike the model's training images" in bad["alert_reasons"][0]
    assert bad["ood_examples"][0] == ["/in/misrouted/0.png", 40.0]
    text = audit_run.render_report(summary, str(tmp_path / "report.html"))
    assert "5 unlike the training images (ood)" in text and "1 unlike the training images (ood)" in text
    assert "<b>Alert:</b> 100.00% of inputs unlike" in text


# ------------------------------------------------------------------------ Chromium check

PROBE = """<script>
window.addEventListener("load", () => {
  const result = [...document.images].map(i => ({src: i.getAttribute("src"), ok: i.complete && i.naturalWidth > 0}));
  const pre = document.createElement("pre");
  pre.id = "image-check";
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>"""


def assert_every_image_loads(report: Path, at_least: int) -> None:
    """Open a copy of the report (same folder, so relative links resolve) with a probe that
    records each image's load state, in headless Chromium; skipped without Chromium."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    probe = report.with_name(f".probe-{uuid.uuid4().hex[:8]}.html")
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    try:
        with tempfile.TemporaryDirectory() as profile:
            done = subprocess.run(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--allow-file-access-from-files", "--virtual-time-budget=20000",
                 "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180)
    finally:
        probe.unlink()
    found = re.search(r'<pre id="image-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"no probe result from Chromium:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    images = json.loads(html.unescape(found.group(1)))
    assert len(images) >= at_least, images
    assert [i["src"] for i in images if not i["ok"]] == []
