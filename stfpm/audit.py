"""The nightly audit: score the images that arrived since the last successful run, then
summarise them (JSON) and show them (a static HTML report).

Layout under OUTPUT (a local folder or s3://bucket/prefix):

    _audit_state.json              the audit's state (below); written only by the audit
    runs/<run_id>/inputs.parquet   the run's inputs: image_uri, size_bytes, arrived_at, partitions
    runs/<run_id>/scores/ maps/ overlays/ _SUCCESS
                                   the scoring output (stfpm.distributed.scoring, TABLE_DOC)
    runs/<run_id>/audit.json       the summary: counts, errors, anomaly rate per category, alerts
    runs/<run_id>/report.html      score histogram and the top-K most anomalous images per category

"Arrived" is an object's LastModified on S3 (listed with boto3) and, for local or NFS files,
the later of mtime and ctime (ctime catches files copied with their old mtime kept, as
`rsync -a` and `cp -p` do). A run takes the window (last successful cut-off, now - settle],
so windows never overlap and an input belongs to exactly one of them; `settle_minutes` leaves
uploads still in flight (S3 dates a multipart upload by its start) to the next night.

State, in _audit_state.json:
    last_success   run_id and cut-off ("until") of the last run that finished
    open_run       the run in progress or failed: its run_id, window start, attempts, last error
    runs           the finished runs, newest last (at most HISTORY of them)
A run first records itself as open_run, so a failed night leaves it there. The next night
reuses that run_id and folder and widens the window to its own "now": the scorer skips every
input the failed attempt already scored (same output folder, same model version), so nothing
is scored twice, and the state advances only after audit.json and report.html are written.

Manifest mode (`manifests:` instead of `source:`): a manifest file, or a folder/prefix of
them (.txt with one URI per line, or .parquet with an image_uri column, as `stfpm score`
reads them); the entries of every manifest that arrived in the window are scored.
Partitions come from a Parquet manifest's columns of the same name, else from the entries'
folder levels below `root`.

Exit codes (jobs/nightly_audit.py): 0 done, every category at or under its alert level;
3 done, some category's anomaly rate above its alert level; 1 failed (state not advanced,
the next run retries); 2 invalid arguments or configuration.
"""
from __future__ import annotations

import html
import json
import os
import posixpath
import sys
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from stfpm.data.images import IMAGE_EXTENSIONS
from stfpm.distributed.sources import CATEGORY, join_uri, path_level, read_manifest
from stfpm.storage import filesystem_for, is_s3, read_bytes, write_bytes

STATE = "_audit_state.json"
RUNS = "runs"
HISTORY = 100
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ALERT = 0, 1, 2, 3
MANIFEST_EXTENSIONS = (".txt", ".lst", ".parquet")
HISTOGRAM_BINS = 20
NO_CATEGORY = "(none)"


# ---------------------------------------------------------------------------- configuration

@dataclass
class AlertConfig:
    anomaly_rate: float = 0.05          # alert when anomalous / ok images is above this
    min_images: int = 1                 # categories with fewer ok images never alert
    categories: dict = field(default_factory=dict)   # per-category anomaly_rate overrides

    def level(self, category: str) -> float:
        return float(self.categories.get(category, self.anomaly_rate))


@dataclass
class ReportConfig:
    top_k: int = 12                     # most anomalous images shown per category
    overlays: bool = True               # let the scorer draw overlays of anomalous inputs
    link_expiry_hours: float = 168      # presigned URLs, when images or output are on S3


@dataclass
class ScoringConfig:
    """Passed to stfpm.distributed.score (see its docstring)."""
    batch_size: int = 32
    actors: str = "1"                   # N or MIN..MAX (autoscaling pool)
    gpus_per_actor: float = 0
    cpus_per_actor: float = 1
    threshold: float | None = None
    wait_for_actors_s: float = 600
    extensions: list | None = None      # listed from `source`; default: every type the decoder reads


@dataclass
class AuditConfig:
    output: str
    models: str                         # model directory or registry YAML (category -> model)
    source: str | None = None           # folder or s3:// prefix of images
    manifests: str | None = None        # or: a manifest, or a folder/prefix of manifests
    root: str | None = None             # manifests: the folder partitions are counted from
    partitions: list | None = None      # folder levels under source/root, e.g. [category, line]
    settle_minutes: float = 15
    first_run_since: str | None = None  # first run only: ignore inputs that arrived before
    ray_address: str | None = None      # default: the job's cluster, else a local Ray
    s3: dict = field(default_factory=dict)   # endpoint, region (credentials: the AWS chain)
    alert: AlertConfig = field(default_factory=AlertConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)

    def __post_init__(self):
        self.source = self.source.rstrip("/") if self.source else self.source
        self.manifests = self.manifests.rstrip("/") if self.manifests else self.manifests
        if (self.source is None) == (self.manifests is None):
            raise ValueError("the audit config needs exactly one of `source` (images) and `manifests`")
        if self.partitions is not None and not (isinstance(self.partitions, list)
                                                and all(isinstance(p, str) for p in self.partitions)):
            raise ValueError(f"partitions must be a list of names, got {self.partitions!r}")
        if self.settle_minutes < 0 or self.report.top_k < 0 or self.alert.min_images < 0:
            raise ValueError("settle_minutes, report.top_k and alert.min_images must be >= 0")
        for name, level in {"anomaly_rate": self.alert.anomaly_rate, **self.alert.categories}.items():
            if not 0 <= float(level) <= 1:
                raise ValueError(f"alert level {name}: {level} is not a rate between 0 and 1")
        if isinstance(self.first_run_since, datetime):  # YAML reads an unquoted time as one
            self.first_run_since = _iso(parse_time(self.first_run_since.isoformat()))
        if self.first_run_since:
            parse_time(str(self.first_run_since))
        self.output = self.output.rstrip("/")

    @property
    def input(self) -> str:
        return self.source if self.source is not None else self.manifests


def _build(cls, doc, where: str):
    if not isinstance(doc, dict):
        raise ValueError(f"{where} must be a mapping, got {doc!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    nested = {"alert": AlertConfig, "report": ReportConfig, "scoring": ScoringConfig}
    values = {k: _build(nested[k], v or {}, f"{where}.{k}") if k in nested else v for k, v in doc.items()}
    try:
        return cls(**values)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def load_config(uri: str) -> AuditConfig:
    """The audit config from a YAML file (local or s3://); unknown keys are errors."""
    try:
        doc = yaml.safe_load(read_bytes(uri))
    except yaml.YAMLError as e:
        raise ValueError(f"{uri}: not valid YAML ({e})") from None
    return _build(AuditConfig, doc, uri)


# -------------------------------------------------------------------------------- times

def parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _iso(t: datetime | None) -> str | None:
    return t.astimezone(timezone.utc).isoformat() if t else None


def _now() -> datetime:
    return datetime.now(timezone.utc)


# ------------------------------------------------------------------------------ listing

def list_files(uri: str, extensions, exclude: str | None = None) -> list[tuple[str, datetime, int | None]]:
    """(uri, arrived, size) of every file under a folder or s3:// prefix (or of one file)
    whose name ends with one of `extensions`; names starting with "." at any level and
    anything under `exclude` (the audit's own output) are skipped."""
    extensions = tuple(e.lower() for e in extensions)
    skip = exclude.rstrip("/") + "/" if exclude else None
    if skip and not is_s3(skip):
        skip = filesystem_for(skip)[1].rstrip("/") + "/"
    found = _list_s3(uri) if is_s3(uri) else _list_local(filesystem_for(uri)[1])
    out = []
    for path, rel, arrived, size in found:
        if (not path.lower().endswith(extensions) or any(p.startswith(".") for p in rel.split("/"))
                or (skip and path.startswith(skip))):
            continue
        out.append((path, arrived, size))
    return sorted(out)


def _list_local(root: str):
    if os.path.isfile(root):
        st = os.stat(root)
        yield root, os.path.basename(root), _local_arrival(st), st.st_size
        return
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such folder or file")
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:  # removed while listing
                continue
            yield path, os.path.relpath(path, root), _local_arrival(st), st.st_size


def _local_arrival(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(max(st.st_mtime_ns, st.st_ctime_ns) / 1e9, timezone.utc)


def s3_client():
    """A boto3 S3 client: endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), region and
    credentials from the standard AWS environment and chain; presigned URLs are SigV4 (so
    they need the buckets' region: s3.region in the config, or AWS_REGION)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(signature_version="s3v4"))


def _list_s3(uri: str):
    from botocore.exceptions import ClientError

    bucket, _, key = uri[len("s3://"):].partition("/")
    client = s3_client()
    prefix = key.rstrip("/")
    if prefix:  # one object?
        try:
            head = client.head_object(Bucket=bucket, Key=prefix)
            yield uri, posixpath.basename(prefix), head["LastModified"], head["ContentLength"]
            return
        except ClientError:
            pass
        prefix += "/"
    listed = False
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            listed = True
            if obj["Key"].endswith("/"):
                continue
            yield f"s3://{bucket}/{obj['Key']}", obj["Key"][len(prefix):], obj["LastModified"], obj["Size"]
    if not listed:
        raise FileNotFoundError(f"{uri}: no objects under this prefix")


def in_window(t: datetime, since: datetime | None, until: datetime) -> bool:
    return (since is None or t > since) and t <= until


def list_arrivals(cfg: AuditConfig, since: datetime | None, until: datetime) -> pa.Table:
    """The inputs that arrived in (since, until]: image_uri, size_bytes, arrived_at and one
    string column per partition, sorted by image_uri (one row per URI, the latest arrival)."""
    partitions = cfg.partitions or []
    extensions = cfg.scoring.extensions or IMAGE_EXTENSIONS
    rows: dict[str, dict] = {}
    if cfg.source is not None:
        root = cfg.source.rstrip("/") if is_s3(cfg.source) else filesystem_for(cfg.source)[1]
        for uri, arrived, size in list_files(cfg.source, extensions, exclude=cfg.output):
            if in_window(arrived, since, until):
                rows[uri] = {"image_uri": uri, "size_bytes": size, "arrived_at": arrived,
                             **{p: path_level(uri, root, i) for i, p in enumerate(partitions)}}
    else:
        root = cfg.root.rstrip("/") if cfg.root and is_s3(cfg.root) else (
            filesystem_for(cfg.root)[1] if cfg.root else None)
        manifests = list_files(cfg.manifests, MANIFEST_EXTENSIONS, exclude=cfg.output)
        for manifest, arrived, _ in sorted(manifests, key=lambda m: m[1]):
            if not in_window(arrived, since, until):
                continue
            uris, extra = read_manifest(manifest)
            for j, uri in enumerate(uris):
                values = {}
                for i, p in enumerate(partitions):
                    if p in extra:
                        values[p] = extra[p][j]
                    elif root is None:
                        raise ValueError(f"{manifest}: partition {p!r} is not a column of the manifest; "
                                         "set `root` in the audit config to take it from the folders")
                    else:
                        values[p] = path_level(uri, root, i)
                rows[uri] = {"image_uri": uri, "size_bytes": None, "arrived_at": arrived, **values}
    schema = inputs_schema(partitions)
    ordered = [rows[u] for u in sorted(rows)]
    return pa.Table.from_pylist(ordered, schema=schema) if ordered else schema.empty_table()


def inputs_schema(partitions: list[str]) -> pa.Schema:
    return pa.schema([("image_uri", pa.string()), ("size_bytes", pa.int64()),
                      ("arrived_at", pa.timestamp("us", tz="UTC"))] + [(p, pa.string()) for p in partitions])


# -------------------------------------------------------------------------------- state

def read_state(output: str) -> dict:
    try:
        state = json.loads(read_bytes(join_uri(output, STATE)))
    except FileNotFoundError:
        return {"schema": 1, "input": None, "last_success": None, "open_run": None, "runs": []}
    if state.get("schema") != 1:
        raise ValueError(f"{join_uri(output, STATE)}: unknown state schema {state.get('schema')!r}")
    return state


def write_state(output: str, state: dict) -> None:
    write_bytes(join_uri(output, STATE), json.dumps(state, indent=2).encode())


def new_run_id(now: datetime) -> str:
    return now.strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


# -------------------------------------------------------------------------------- the run

@dataclass
class AuditResult:
    exit_code: int
    run_id: str
    summary: dict
    report: str


def run_audit(cfg: AuditConfig, now: datetime | None = None, verbose: bool = True) -> AuditResult:
    """One audit run (module docstring). Raises on failure, leaving the state's open_run
    in place for the next run to retry."""
    from stfpm.distributed import score

    echo = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    _apply_s3(cfg.s3)
    now = now or _now()
    state = read_state(cfg.output)
    if state["input"] not in (None, cfg.input):
        raise ValueError(f"{cfg.output} holds the audit state of another input ({state['input']}); "
                         f"use another output for {cfg.input}")
    last = state["last_success"]
    since = parse_time(last["until"]) if last else (parse_time(cfg.first_run_since) if cfg.first_run_since else None)
    until = now - timedelta(minutes=cfg.settle_minutes)
    open_run = state["open_run"]
    if open_run:
        echo(f"retrying run {open_run['run_id']} (attempt {open_run['attempts'] + 1}; "
             f"last error: {open_run.get('last_error')})")
        open_run["attempts"] += 1
    else:
        open_run = {"run_id": new_run_id(now), "since": _iso(since), "attempts": 1}
    open_run.update(started_at=_iso(now), until=_iso(until), last_error=None)
    state.update(input=cfg.input, open_run=open_run)
    write_state(cfg.output, state)
    run_id, run_dir = open_run["run_id"], join_uri(cfg.output, RUNS, open_run["run_id"])
    try:
        inputs = list_arrivals(cfg, since, until)
        echo(f"run {run_id}: {len(inputs)} inputs arrived in ({_iso(since) or 'the beginning'}, {_iso(until)}]")
        manifest = join_uri(run_dir, "inputs.parquet")
        sink = pa.BufferOutputStream()
        pq.write_table(inputs, sink)
        write_bytes(manifest, sink.getvalue().to_pybytes())
        scoring = None
        if len(inputs):
            s = cfg.scoring  # (extensions were applied when listing: a manifest's entries are all scored)
            scoring = score(cfg.models, manifest, run_dir, partitions=cfg.partitions, batch_size=s.batch_size,
                            actors=s.actors, gpus_per_actor=s.gpus_per_actor, cpus_per_actor=s.cpus_per_actor,
                            threshold=s.threshold, overlays=cfg.report.overlays, run_id=run_id,
                            ray_address=cfg.ray_address, wait_for_actors_s=s.wait_for_actors_s, verbose=verbose)
        table = read_run_table(run_dir)
        summary = summarize(table, inputs, cfg, run_id=run_id, since=since, until=until,
                            attempts=open_run["attempts"], scoring=scoring)
        write_bytes(join_uri(run_dir, "audit.json"), json.dumps(summary, indent=2, default=str).encode())
        report = join_uri(run_dir, "report.html")
        write_bytes(report, render_report(summary, report, cfg.report.link_expiry_hours).encode())
    except BaseException as e:
        open_run["last_error"] = f"{type(e).__name__}: {e}"[:2000]
        try:
            write_state(cfg.output, state)
        except Exception:  # noqa: BLE001 - the original failure is the one to report
            pass
        raise
    finished = {"run_id": run_id, "since": _iso(since), "until": _iso(until), "finished_at": _iso(_now()),
                "attempts": open_run["attempts"], "exit_code": summary["exit_code"], **summary["totals"]}
    state.update(last_success=finished, open_run=None, runs=(state["runs"] + [finished])[-HISTORY:])
    write_state(cfg.output, state)
    echo(f"run {run_id}: {summary['status']} ({summary['totals']['inputs']} inputs, "
         f"{summary['totals']['anomalous']} anomalous, {summary['totals']['error']} errors); report: {report}")
    return AuditResult(summary["exit_code"], run_id, summary, report)


def _apply_s3(options: dict) -> None:
    """s3.endpoint / s3.region of the config into the environment stfpm.storage, boto3 and
    the scorer (which forwards them to a cluster it joins) read."""
    unknown = set(options) - {"endpoint", "region"}
    if unknown:
        raise ValueError(f"s3: unknown keys {sorted(unknown)}; known: endpoint, region")
    if options.get("endpoint"):
        os.environ["AWS_ENDPOINT_URL"] = options["endpoint"]
    if options.get("region"):
        os.environ["AWS_REGION"] = os.environ["AWS_DEFAULT_REGION"] = options["region"]


def read_run_table(run_dir: str) -> pa.Table:
    """The run's score table (empty when nothing was scored)."""
    fs, path = filesystem_for(join_uri(run_dir, "scores"))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return pa.table({})
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


# ------------------------------------------------------------------------------ summary

def summarize(table: pa.Table, inputs: pa.Table, cfg: AuditConfig, *, run_id: str, since: datetime | None,
              until: datetime, attempts: int, scoring: dict | None) -> dict:
    """audit.json: counts, errors and anomaly rate per category, alerts and the exit code.
    One row per input: its ok row if any (the latest), else its latest error row."""
    rows = _one_row_per_input(table)
    by_category: dict[str, list[dict]] = {}
    for row in rows:
        by_category.setdefault(row.get(CATEGORY) or row.get("model_name") or NO_CATEGORY, []).append(row)
    categories = {name: _category_summary(name, group, cfg) for name, group in sorted(by_category.items())}
    ok = sum(c["ok"] for c in categories.values())
    anomalous = sum(c["anomalous"] for c in categories.values())
    alerts = [name for name, c in categories.items() if c["alert"]]
    totals = {"inputs": len(inputs), "scored": len(rows), "ok": ok,
              "error": sum(c["error"] for c in categories.values()), "anomalous": anomalous,
              "anomaly_rate": anomalous / ok if ok else None}
    return {
        "run_id": run_id, "input": cfg.input, "output": cfg.output, "models": cfg.models,
        "window": {"since": _iso(since), "until": _iso(until)}, "attempts": attempts,
        "generated_at": _iso(_now()),
        "status": "alert" if alerts else "ok", "exit_code": EXIT_ALERT if alerts else EXIT_OK,
        "alerts": alerts, "alert_config": asdict(cfg.alert), "totals": totals, "categories": categories,
        "scoring": _scoring_digest(scoring),
    }


def _one_row_per_input(table: pa.Table) -> list[dict]:
    if not table.num_rows:
        return []
    best: dict[str, dict] = {}
    for row in table.to_pylist():
        have = best.get(row["image_uri"])
        rank = (row["status"] == "ok", row["scored_at"] or datetime.min.replace(tzinfo=timezone.utc))
        if have is None or rank > (have["status"] == "ok", have["scored_at"] or rank[1]):
            best[row["image_uri"]] = row
    return [best[u] for u in sorted(best)]


def _category_summary(name: str, rows: list[dict], cfg: AuditConfig) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    errors = [r for r in rows if r["status"] != "ok"]
    anomalous = sum(bool(r["is_anomaly"]) for r in ok)
    rate = anomalous / len(ok) if ok else None
    level = cfg.alert.level(name)
    counts, edges = np.histogram([r["score"] for r in ok], bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    top = sorted(ok, key=lambda r: (r["score"], r["raw_score"]), reverse=True)[:cfg.report.top_k]
    kinds: dict[str, int] = {}
    for r in errors:
        kind = (r["error"] or "unknown").split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    models = sorted({(r["model_name"], r["model_version"], r["threshold"]) for r in ok}, key=str)
    return {
        "inputs": len(rows), "ok": len(ok), "error": len(errors), "anomalous": anomalous, "anomaly_rate": rate,
        "alert_level": level, "alert": rate is not None and len(ok) >= cfg.alert.min_images and rate > level,
        "models": [{"name": n, "model_version": v, "threshold": t} for n, v, t in models],
        "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts],
                      "of": "normalised score, 0.5 = the model's threshold"},
        "top": [{k: r.get(k) for k in ("image_uri", "score", "raw_score", "is_anomaly", "width", "height",
                                       "map_uri", "overlay_uri")} for r in top],
        "errors": {"by_kind": kinds, "examples": [[r["image_uri"], r["error"]] for r in errors[:20]]},
    }


def _scoring_digest(scoring: dict | None) -> dict | None:
    if not scoring:
        return None
    return {k: scoring.get(k) for k in ("run_id", "counts", "images_per_s", "timings_s", "devices")}


# ------------------------------------------------------------------------------- report

class Links:
    """How the report refers to a file: a relative path when both are local, a presigned
    https URL (valid `expiry_s`) for an s3:// file, file:// for a local file seen from S3."""

    def __init__(self, report_uri: str, expiry_s: float):
        self.local_dir = None if is_s3(report_uri) else os.path.dirname(filesystem_for(report_uri)[1])
        self.expiry_s = int(expiry_s)
        self._client = None

    def __call__(self, uri: str | None) -> str | None:
        if not uri:
            return None
        if is_s3(uri):
            if self._client is None:
                self._client = s3_client()
            bucket, _, key = uri[len("s3://"):].partition("/")
            return self._client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                       ExpiresIn=self.expiry_s)
        path = filesystem_for(uri)[1]
        if self.local_dir is None:
            return "file://" + quote(path)
        return quote(os.path.relpath(path, self.local_dir).replace(os.sep, "/"))


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left}.meta{color:#666}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;color:#fff;font-weight:600}
.ok{background:#2e7d32}.alert{background:#c62828}
.grid{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;width:272px}
figure img{width:128px;height:128px;object-fit:contain;background:#f4f4f4;border:1px solid #ddd}
figcaption{font-size:12px;word-break:break-all}code{font-size:12px}
"""


def histogram_svg(counts: list[int], edges: list[float], width: int = 420, height: int = 140) -> str:
    """Bars over the normalised score 0..1, heights on a log scale (anomalies are rare),
    with the threshold (0.5) marked; each bar's exact count is in its tooltip."""
    pad_l, pad_b, pad_t = 30, 20, 6
    plot_w, plot_h = width - pad_l - 6, height - pad_b - pad_t
    top = np.log1p(max(counts, default=0)) or 1.0
    bar_w = plot_w / len(counts)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="score histogram">']
    for i, c in enumerate(counts):
        h = plot_h * np.log1p(c) / top
        x, y = pad_l + i * bar_w, pad_t + plot_h - h
        colour = "#c62828" if edges[i] >= 0.5 else "#5c8fd6"
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" fill="{colour}">'
                     f'<title>{edges[i]:.2f}-{edges[i + 1]:.2f}: {c}</title></rect>')
    x_thr = pad_l + 0.5 * plot_w
    parts.append(f'<line x1="{x_thr:.1f}" y1="{pad_t}" x2="{x_thr:.1f}" y2="{pad_t + plot_h}" '
                 'stroke="#000" stroke-dasharray="4 3"/>')
    base = pad_t + plot_h
    parts.append(f'<line x1="{pad_l}" y1="{base}" x2="{pad_l + plot_w}" y2="{base}" stroke="#888"/>')
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{pad_l + v * plot_w:.1f}" y="{height - 5}" font-size="10" '
                     f'text-anchor="middle">{v:g}</text>')
    parts.append(f'<text x="{pad_l - 4}" y="{pad_t + 9}" font-size="10" text-anchor="end">'
                 f'{max(counts, default=0)}</text></svg>')
    return "".join(parts)


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def render_report(summary: dict, report_uri: str, link_expiry_hours: float = 168) -> str:
    """The static HTML report for an audit summary; images are linked, not embedded."""
    link = Links(report_uri, link_expiry_hours * 3600)
    e = html.escape
    t = summary["totals"]
    status = summary["status"]
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
           f"<title>Audit {e(summary['run_id'])}</title><style>{CSS}</style></head><body>",
           f"<h1>Nightly audit {e(summary['run_id'])} <span class='badge {e(status)}'>{e(status.upper())}</span></h1>",
           f"<p class='meta'>Input <code>{e(summary['input'])}</code>, arrived in "
           f"({e(summary['window']['since'] or 'the beginning')}, {e(summary['window']['until'])}]; "
           f"models <code>{e(summary['models'])}</code>; attempt {summary['attempts']}; "
           f"generated {e(summary['generated_at'])}.</p>",
           "<table><tr><th>category</th><th>inputs</th><th>ok</th><th>errors</th><th>anomalous</th>"
           "<th>anomaly rate</th><th>alert level</th><th></th></tr>"]
    for name, c in summary["categories"].items():
        badge = "<span class='badge alert'>ALERT</span>" if c["alert"] else ""
        out.append(f"<tr><td><a href='#cat-{e(name)}'>{e(name)}</a></td><td>{c['inputs']}</td><td>{c['ok']}</td>"
                   f"<td>{c['error']}</td><td>{c['anomalous']}</td><td>{_fmt(c['anomaly_rate'], '.2%')}</td>"
                   f"<td>{c['alert_level']:.2%}</td><td>{badge}</td></tr>")
    out.append(f"<tr><th>all</th><th>{t['inputs']}</th><th>{t['ok']}</th><th>{t['error']}</th>"
               f"<th>{t['anomalous']}</th><th>{_fmt(t['anomaly_rate'], '.2%')}</th><th></th><th></th></tr></table>")
    if not summary["categories"]:
        out.append("<p>No images arrived in this window.</p>")
    for name, c in summary["categories"].items():
        models = ", ".join(f"{m['name']} ({m['model_version'][:12]}, threshold {m['threshold']:.4g})"
                           for m in c["models"])
        out.append(f"<h2 id='cat-{e(name)}'>{e(name)}</h2><p class='meta'>{c['ok']} scored, "
                   f"{c['anomalous']} anomalous ({_fmt(c['anomaly_rate'], '.2%')}; alert above "
                   f"{c['alert_level']:.2%}), {c['error']} errors. Model: {e(models) or '-'}.</p>")
        out.append(histogram_svg(c["histogram"]["counts"], c["histogram"]["edges"]))
        out.append("<p class='meta'>Normalised score (0.5 = threshold, dashed); bar heights on a log scale.</p>")
        if c["top"]:
            out.append(f"<h3>Top {len(c['top'])} by score</h3><div class='grid'>")
            for r in c["top"]:
                picture = link(r["overlay_uri"] or r["image_uri"])
                source, heat = link(r["image_uri"]), link(r["map_uri"])
                caption = "overlay" if r["overlay_uri"] else "image"
                out.append(
                    f"<figure><a href='{e(source)}'><img src='{e(picture)}' alt='{caption} of "
                    f"{e(r['image_uri'])}'></a> <a href='{e(heat)}'><img src='{e(heat)}' alt='anomaly map of "
                    f"{e(r['image_uri'])}'></a><figcaption>score {r['score']:.3f} (raw {r['raw_score']:.4g})"
                    f"{' <b>anomalous</b>' if r['is_anomaly'] else ''}<br><code>{e(r['image_uri'])}</code>"
                    f"</figcaption></figure>")
            out.append("</div>")
        if c["error"]:
            kinds = ", ".join(f"{k}: {n}" for k, n in sorted(c["errors"]["by_kind"].items()))
            out.append(f"<h3>Errors ({e(kinds)})</h3><table><tr><th>input</th><th>error</th></tr>")
            out += [f"<tr><td><code>{e(u)}</code></td><td style='text-align:left'>{e(str(m))}</td></tr>"
                    for u, m in c["errors"]["examples"]]
            out.append("</table>")
    scoring = summary.get("scoring")
    if scoring:
        out.append(f"<h2>Scoring</h2><p class='meta'>{scoring['counts']['scored']} scored this attempt, "
                   f"{scoring['counts']['skipped_already_scored']} already scored by an earlier attempt; "
                   f"{_fmt(scoring['images_per_s'], '.1f')} images/s; devices {e(', '.join(scoring['devices']))}."
                   "</p>")
    out.append("</body></html>")
    return "\n".join(out)


def rerender_report(cfg: AuditConfig, run_id: str) -> str:
    """Write runs/<run_id>/report.html again from its audit.json (fresh presigned links)."""
    _apply_s3(cfg.s3)
    run_dir = join_uri(cfg.output, RUNS, run_id)
    summary = json.loads(read_bytes(join_uri(run_dir, "audit.json")))
    report = join_uri(run_dir, "report.html")
    write_bytes(report, render_report(summary, report, cfg.report.link_expiry_hours).encode())
    return report
