"""The nightly audit: score the images that arrived since the last successful run, then
summarise them (JSON) and show them (a static HTML report).

Layout under OUTPUT (a local folder or s3://bucket/prefix):

    _audit_state.json              the audit's state (below); written only by the audit
    runs/<run_id>/inputs.parquet   the run's inputs: image_uri, size_bytes, arrived_at, partitions
    runs/<run_id>/scores/ maps/ overlays/ _SUCCESS
                                   the scoring output (stfpm.scoring.run, TABLE_DOC)
    runs/<run_id>/audit.json       the summary: counts, errors, anomaly rate per category, alerts
    runs/<run_id>/report.html      score histogram and the top-K most anomalous images per category

"Arrived" is an object's LastModified on S3 and, for local or NFS files, the later of mtime
and ctime (ctime catches files copied with their old mtime kept, as `rsync -a` and `cp -p`
do; stfpm.scoring.sources.list_files). A run takes the window (last successful cut-off, now - settle],
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

The configuration is config.py, the summary (audit.json: alerts, exit codes)
summary.py, the HTML report report.py.

Retries: a run's inputs whose row is a transient error (a model that failed in an actor, a
storage or IO failure, a category without a model) are written to runs/<run_id>/retry.parquet
and scored again by the next run, night after night until they score or fail as bad files;
bad files (error_kind "input") are reported once and not retried until they change.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from stfpm.audit.config import (AlertConfig, AuditConfig, ReportConfig, ScoringConfig, iso, load_config, parse_time,
                                utc_now)
from stfpm.audit.report import render_report
from stfpm.audit.summary import one_row_per_input, summarize
from stfpm.audit.trend import collect_trend
from stfpm.data.images import IMAGE_EXTENSIONS
from stfpm.scoring.plan import new_run_id
from stfpm.scoring.sources import list_files, path_level, read_manifest
from stfpm.scoring.table import TRANSIENT_ERROR
from stfpm.storage import filesystem_for, is_s3, join_uri, read_bytes, set_s3_environment, write_bytes

__all__ = ["AlertConfig", "AuditConfig", "AuditResult", "ReportConfig", "ScoringConfig", "load_config",
           "rerender_report", "run_audit"]

logger = logging.getLogger(__name__)

STATE = "_audit_state.json"
RUNS = "runs"
HISTORY = 100
RETRY = "retry.parquet"   # runs/<run_id>/: the run's inputs whose row is a transient error
MANIFEST_EXTENSIONS = (".txt", ".lst", ".parquet")


# ------------------------------------------------------------------------------ arrivals

def in_window(t: datetime, since: datetime | None, until: datetime) -> bool:
    return (since is None or t > since) and t <= until


def list_arrivals(cfg: AuditConfig, since: datetime | None, until: datetime) -> pa.Table:
    """The inputs that arrived in (since, until]: image_uri, input_version (null for manifest
    entries: the scorer looks them up), size_bytes, arrived_at and one string column per
    partition, sorted by image_uri (one row per URI, the latest arrival)."""
    partitions = cfg.partitions or []
    extensions = cfg.scoring.extensions or IMAGE_EXTENSIONS
    rows: dict[str, dict] = {}
    if cfg.source is not None:
        root = cfg.source.rstrip("/") if is_s3(cfg.source) else filesystem_for(cfg.source)[1]
        for f in list_files(cfg.source, extensions, exclude=cfg.output):
            if in_window(f.arrived, since, until):
                rows[f.uri] = {"image_uri": f.uri, "input_version": f.version, "size_bytes": f.size,
                               "arrived_at": f.arrived,
                               **{p: path_level(f.uri, root, i) for i, p in enumerate(partitions)}}
    else:
        root = cfg.root.rstrip("/") if cfg.root and is_s3(cfg.root) else (
            filesystem_for(cfg.root)[1] if cfg.root else None)
        manifests = list_files(cfg.manifests, MANIFEST_EXTENSIONS, exclude=cfg.output)
        for manifest in sorted(manifests, key=lambda m: m.arrived):
            if not in_window(manifest.arrived, since, until):
                continue
            uris, extra = read_manifest(manifest.uri)
            for j, uri in enumerate(uris):
                values = {}
                for i, p in enumerate(partitions):
                    if p in extra:
                        values[p] = extra[p][j]
                    elif root is None:
                        raise ValueError(f"{manifest.uri}: partition {p!r} is not a column of the manifest; "
                                         "set `root` in the audit config to take it from the folders")
                    else:
                        values[p] = path_level(uri, root, i)
                rows[uri] = {"image_uri": uri, "input_version": None, "size_bytes": None,
                             "arrived_at": manifest.arrived, **values}
    schema = inputs_schema(partitions)
    ordered = [rows[u] for u in sorted(rows)]
    return pa.Table.from_pylist(ordered, schema=schema) if ordered else schema.empty_table()


def settling_inputs(cfg: AuditConfig, until: datetime, now: datetime) -> dict:
    """The inputs inside the settle window (until, now]: left to a later run, reported so a
    night that scored nothing says what waits. A run started after `taken_after` (the latest
    arrival + settle_minutes) takes every one of them."""
    waiting = list_arrivals(cfg, until, now)
    arrived = waiting["arrived_at"].to_pylist()
    return {"count": len(waiting), "settle_minutes": cfg.settle_minutes,
            "earliest_arrival": iso(min(arrived)) if arrived else None,
            "latest_arrival": iso(max(arrived)) if arrived else None,
            "taken_after": iso(max(arrived) + timedelta(minutes=cfg.settle_minutes)) if arrived else None}


def inputs_schema(partitions: list[str]) -> pa.Schema:
    return pa.schema([("image_uri", pa.string()), ("input_version", pa.string()), ("size_bytes", pa.int64()),
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
    from stfpm.scoring import score

    echo = logger.info if verbose else logger.debug
    _apply_s3(cfg.s3)
    now = now or utc_now()
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
        open_run = {"run_id": new_run_id(now), "since": iso(since), "attempts": 1}
    open_run.update(started_at=iso(now), until=iso(until), last_error=None)
    state.update(input=cfg.input, open_run=open_run)
    write_state(cfg.output, state)
    run_id, run_dir = open_run["run_id"], join_uri(cfg.output, RUNS, open_run["run_id"])
    try:
        arrived = list_arrivals(cfg, since, until)
        retried = read_retries(cfg.output, last, arrived)
        inputs = pa.concat_tables([arrived, retried]).sort_by("image_uri")
        echo(f"run {run_id}: {len(arrived)} inputs arrived in ({iso(since) or 'the beginning'}, {iso(until)}], "
             f"{len(retried)} retried after a transient error in run {last['run_id'] if last else None}")
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
                            ray_address=cfg.ray_address, wait_for_actors_s=s.wait_for_actors_s,
                            allow_roots=s.allow_roots, verbose=verbose)
        table = read_run_table(run_dir)
        summary = summarize(table, inputs, cfg, run_id=run_id, since=since, until=until,
                            attempts=open_run["attempts"], scoring=scoring, retried=len(retried),
                            waiting=settling_inputs(cfg, until, now))
        summary["trend"] = collect_trend(cfg.output, state["runs"], summary)
        write_retries(run_dir, inputs, table)
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
    finished = {"run_id": run_id, "since": iso(since), "until": iso(until), "finished_at": iso(utc_now()),
                "attempts": open_run["attempts"], "exit_code": summary["exit_code"], **summary["totals"]}
    state.update(last_success=finished, open_run=None, runs=(state["runs"] + [finished])[-HISTORY:])
    write_state(cfg.output, state)
    echo(f"run {run_id}: {summary['status']} ({summary['totals']['inputs']} inputs, "
         f"{summary['totals']['anomalous']} anomalous, {summary['totals']['ood']} ood, "
         f"{summary['totals']['error']} errors); report: {report}")
    return AuditResult(summary["exit_code"], run_id, summary, report)


def read_retries(output: str, last: dict | None, arrived: pa.Table) -> pa.Table:
    """The inputs the last finished run left with a transient error (its RETRY file), less
    those that arrived again: scored again tonight, night after night until they score or
    fail as bad files."""
    schema = arrived.schema
    if not last:
        return schema.empty_table()
    try:
        table = pq.read_table(pa.BufferReader(read_bytes(join_uri(output, RUNS, last["run_id"], RETRY))))
    except FileNotFoundError:
        return schema.empty_table()
    again = set(arrived["image_uri"].to_pylist())
    table = table.filter(pa.array([u not in again for u in table["image_uri"].to_pylist()], pa.bool_()))
    return pa.table([table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
                     for f in schema], schema=schema)


def write_retries(run_dir: str, inputs: pa.Table, table: pa.Table) -> None:
    """RETRY: the rows of `inputs` whose standing row in the run's table is a transient error."""
    transient = {r["image_uri"] for r in one_row_per_input(table) if r.get("error_kind") == TRANSIENT_ERROR}
    retry = inputs.filter(pa.array([u in transient for u in inputs["image_uri"].to_pylist()], pa.bool_()))
    sink = pa.BufferOutputStream()
    pq.write_table(retry, sink)
    write_bytes(join_uri(run_dir, RETRY), sink.getvalue().to_pybytes())


def _apply_s3(options: dict) -> None:
    """s3.endpoint / s3.region of the config into the environment (stfpm.storage)."""
    set_s3_environment(options.get("endpoint"), options.get("region"))


def read_run_table(run_dir: str) -> pa.Table:
    """The run's score table (empty when nothing was scored)."""
    fs, path = filesystem_for(join_uri(run_dir, "scores"))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return pa.table({})
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


def rerender_report(cfg: AuditConfig, run_id: str) -> str:
    """Write runs/<run_id>/report.html again from its audit.json (fresh presigned links)."""
    _apply_s3(cfg.s3)
    run_dir = join_uri(cfg.output, RUNS, run_id)
    summary = json.loads(read_bytes(join_uri(run_dir, "audit.json")))
    report = join_uri(run_dir, "report.html")
    write_bytes(report, render_report(summary, report, cfg.report.link_expiry_hours).encode())
    return report
