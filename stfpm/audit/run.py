"""The nightly audit: score the images no finished run has taken yet, then
summarise them (JSON) and show them (a static HTML report).

Layout under OUTPUT (a local folder or s3://bucket/prefix):

    _audit_state.json              the audit's state (below); written only by the audit
    runs/<run_id>/inputs.parquet   the run's inputs: image_uri, size_bytes, arrived_at, partitions
    runs/<run_id>/scores/ maps/ overlays/ _SUCCESS
                                   the scoring output (stfpm.scoring.run, TABLE_DOC)
    runs/<run_id>/audit.json       the summary: counts, errors, anomaly rate per category, alerts
    runs/<run_id>/report.html      score histogram and the top-K most anomalous images per category

What a night takes is decided by a ledger, not by a time window: every night lists the whole
source (or every manifest) and takes each item whose (URI, version) no finished run took
(runs/<run_id>/seen.parquet of the last one, cumulative; a replaced file is a new version).
Arrival times ("arrived": an object's LastModified on S3, for local or NFS files the later of
mtime and ctime, stfpm.scoring.sources.list_files) only hold back what arrived in the last
`settle_minutes` (uploads still in flight; S3 dates a multipart upload by its start) for the
next night, and leave out what arrived before `first_run_since`. So an unmounted share, a
clock set ahead or back, or a file dated 2099 (scored at once, counted as future_dated)
cannot hide an input: every listed item is counted in the run's `listing` (audit.json and
the state): listed = seen + settling + before_first_run_since + new.

State, in _audit_state.json:
    last_success   run_id, cut-off ("until", shown), listing counts and ledger ("seen") of the
                   last run that finished
    open_run       the run in progress or failed: its run_id, window start, attempts, last error
    runs           the finished runs, newest last (at most HISTORY of them)
A run first records itself as open_run, so a failed night leaves it there. The next night
reuses that run_id and folder and lists again: the scorer skips every input the failed
attempt already scored (same output folder, same model version), so nothing is scored
twice, and the state (with the ledger) advances only after audit.json and report.html are
written.

Manifest mode (`manifests:` instead of `source:`): a manifest file, or a folder/prefix of
them (.txt with one URI per line, .parquet with an image_uri column, an S3 Inventory .csv or
.parquet, as `stfpm score` reads them); the entries of every manifest the ledger does not hold
yet are scored. A manifest with size and modification time (ours, an inventory) gives each
entry its input_version, so the scorer looks none up.
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
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stfpm.audit.config import (AlertConfig, AuditConfig, ReportConfig, ScoringConfig, iso, load_config, parse_time,
                                utc_now)
from stfpm.audit.report import render_report
from stfpm.audit.summary import summarize, transient_uris
from stfpm.audit.trend import collect_trend
from stfpm.data.images import IMAGE_EXTENSIONS
from stfpm.scoring.dates import DateTemplate, days_to_list, has_date
from stfpm.scoring.plan import new_run_id
from stfpm.scoring.sources import Listed, list_files, path_level, read_manifest
from stfpm.scoring.table import TableShards
from stfpm.storage import filesystem_for, is_s3, join_uri, read_bytes, set_s3_environment, write_bytes

__all__ = ["AlertConfig", "AuditConfig", "AuditResult", "ReportConfig", "ScoringConfig", "load_config",
           "rerender_report", "run_audit"]

logger = logging.getLogger(__name__)

STATE = "_audit_state.json"
RUNS = "runs"
HISTORY = 100
RETRY = "retry.parquet"   # runs/<run_id>/: the run's inputs whose row is a transient error
LOCK = "_audit.lock"      # held while a run is going: a second audit of the same output exits EXIT_LOCKED
LOCK_STALE_HOURS = 12     # a lock older than this (its audit was killed on another machine) is taken over
EXIT_LOCKED = 5
SEEN = "seen.parquet"     # runs/<run_id>/: the ledger, (image_uri, input_version) of every item taken so far
MANIFEST_EXTENSIONS = (".txt", ".lst", ".parquet", ".csv", ".csv.gz")  # .csv: S3 Inventory


# ------------------------------------------------------------------------------ arrivals

def in_window(t: datetime, since: datetime | None, until: datetime) -> bool:
    return (since is None or t > since) and t <= until


def list_items(cfg: AuditConfig, days: list[date] | None = None, missing: list[str] | None = None) -> list[Listed]:
    """What the audit lists each night: the images of `source`, or the manifest files of
    `manifests`. A `{date}` in either (stfpm.scoring.dates) lists the folder of each of `days`
    (default: every day folder that exists); a day folder that does not exist lists nothing
    and its day goes to `missing`."""
    def listed(uri: str) -> list[Listed]:
        if cfg.source is not None:
            return list_files(uri, cfg.scoring.extensions or IMAGE_EXTENSIONS, exclude=cfg.output,
                              roots=cfg.scoring.allow_roots)
        return list_files(uri, MANIFEST_EXTENSIONS, exclude=cfg.output)

    if not has_date(cfg.input):
        return listed(cfg.input)
    template = DateTemplate.parse(cfg.input)
    items = []
    for day in template.existing_days() if days is None else days:
        try:
            items.extend(listed(template.uri(day)))
        except FileNotFoundError:
            if missing is not None:
                missing.append(day.isoformat())
    return items


def days_of_night(cfg: AuditConfig, last: dict | None, now: datetime) -> list[date] | None:
    """The days a dated source lists tonight (stfpm.scoring.dates.days_to_list): from the day of
    the last finished run's cut-off less `lookback_days` to today, or every day folder before
    the first finished run. None for a source without {date}."""
    if not has_date(cfg.input):
        return None
    since = parse_time(cfg.first_run_since) if cfg.first_run_since else None
    return days_to_list(DateTemplate.parse(cfg.input), parse_time(last["until"]) if last else None, now,
                        cfg.lookback_days, since)


def source_root(cfg: AuditConfig) -> str:
    """The folder partitions count from: `source` (its template's root when dated)."""
    source = DateTemplate.parse(cfg.source).root if has_date(cfg.source) else cfg.source
    return source.rstrip("/") if is_s3(source) else filesystem_for(source)[1]


def list_arrivals(cfg: AuditConfig, since: datetime | None, until: datetime) -> pa.Table:
    """The inputs that arrived in (since, until]: `input_rows` of the listed items in that window."""
    return input_rows(cfg, [f for f in list_items(cfg) if in_window(f.arrived, since, until)])


def input_rows(cfg: AuditConfig, items: list[Listed]) -> pa.Table:
    """The inputs of listed items (images, or manifests whose entries are read): image_uri,
    input_version (null for manifest entries: the scorer looks them up), size_bytes,
    arrived_at and one string column per partition, sorted by image_uri (one row per URI,
    the latest arrival)."""
    partitions = cfg.partitions or []
    rows: dict[str, dict] = {}
    if cfg.source is not None:
        root = source_root(cfg)
        for f in items:
            rows[f.uri] = {"image_uri": f.uri, "input_version": f.version, "size_bytes": f.size,
                           "arrived_at": f.arrived,
                           **{p: path_level(f.uri, root, i) for i, p in enumerate(partitions)}}
    else:
        root = cfg.root.rstrip("/") if cfg.root and is_s3(cfg.root) else (
            filesystem_for(cfg.root)[1] if cfg.root else None)
        for manifest in sorted(items, key=lambda m: m.arrived):
            uris, extra = read_manifest(manifest.uri, cfg.scoring.extensions or IMAGE_EXTENSIONS)
            uris, extra = uris.to_pylist(), {k: v.to_pylist() for k, v in extra.items()}
            versions = extra.get("input_version") or [None] * len(uris)  # a manifest with size and mtime
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
                rows[uri] = {"image_uri": uri, "input_version": versions[j], "size_bytes": None,
                             "arrived_at": manifest.arrived, **values}
    schema = inputs_schema(partitions)
    ordered = [rows[u] for u in sorted(rows)]
    return pa.Table.from_pylist(ordered, schema=schema) if ordered else schema.empty_table()


def select_new(items: list[Listed], seen: set[tuple[str, str]], now: datetime, settle_minutes: float,
               first_run_since: datetime | None = None,
               legacy_until: datetime | None = None) -> tuple[list[Listed], dict[str, int], list[Listed]]:
    """The listed items to take tonight, a count of every listed item by what happens to it,
    so that none is skipped silently, and the items left settling (`settling_report`). The
    counts: `seen` (its URI and version are in the ledger of finished runs), `settling`
    (arrived within settle_minutes before now: the next run takes it),
    `before_first_run_since` (config: never scored), `new` (taken tonight), of which
    `future_dated` arrived after now (a clock ahead of ours, a planted mtime: scored now, as
    a time in the future cannot mean "still uploading"). listed = seen + settling +
    before_first_run_since + new. Arrival times decide nothing else: an unmounted share,
    a clock set back or ahead, a file older than the last run cannot hide an input.
    `legacy_until`: the cut-off of a state written before the ledger existed."""
    settle_from = now - timedelta(minutes=settle_minutes)
    counts = dict.fromkeys(("listed", "seen", "settling", "before_first_run_since", "new", "future_dated"), 0)
    new, settling = [], []
    for f in items:
        counts["listed"] += 1
        if (f.uri, f.version) in seen or (legacy_until is not None and f.arrived <= legacy_until):
            counts["seen"] += 1
        elif first_run_since is not None and f.arrived <= first_run_since:
            counts["before_first_run_since"] += 1
        elif settle_from < f.arrived <= now:
            counts["settling"] += 1
            settling.append(f)
        else:
            counts["new"] += 1
            counts["future_dated"] += f.arrived > now
            new.append(f)
    return new, counts, settling


def settling_report(settling: list[Listed], settle_minutes: float) -> dict:
    """The inputs inside the settle window, left to a later run (`select_new`): reported so a
    night that scored nothing says what waits. A run started after `taken_after` (the latest
    arrival + settle_minutes) takes every one of them."""
    arrived = [f.arrived for f in settling]
    return {"count": len(arrived), "settle_minutes": settle_minutes,
            "earliest_arrival": iso(min(arrived)) if arrived else None,
            "latest_arrival": iso(max(arrived)) if arrived else None,
            "taken_after": iso(max(arrived) + timedelta(minutes=settle_minutes)) if arrived else None}


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

class AuditLocked(RuntimeError):
    """Another audit of the same output is running: nothing was done, the state is untouched."""


def acquire_lock(output: str) -> str:
    """Take OUTPUT/_audit.lock, or raise AuditLocked naming who holds it. A lock whose process
    is gone (same machine) or that is older than LOCK_STALE_HOURS is taken over. Locally the
    file is created exclusively; on S3 (no exclusive create) the lock is written, read back
    after a moment and must still be ours. Returns the token `release_lock` needs."""
    uri = join_uri(output, LOCK)
    token = uuid.uuid4().hex
    mine = {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "started_at": iso(utc_now())}
    held = _read_lock(uri)
    if held and not _stale(held):
        raise AuditLocked(f"another audit of {output} is running (pid {held.get('pid')} on {held.get('host')}, "
                          f"since {held.get('started_at')}; lock {uri}); nothing was done")
    data = json.dumps(mine).encode()
    if is_s3(uri):
        write_bytes(uri, data)
        time.sleep(1.0)
    else:
        path = filesystem_for(uri)[1]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if held:  # stale: replaced; a race with another taker is settled by O_EXCL below
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            held = _read_lock(uri) or {}
            raise AuditLocked(f"another audit of {output} is running (pid {held.get('pid')} on "
                              f"{held.get('host')}; lock {uri}); nothing was done") from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    now_held = _read_lock(uri) or {}
    if now_held.get("token") != token:
        raise AuditLocked(f"another audit of {output} took the lock {uri} at the same time; nothing was done")
    return token


def release_lock(output: str, token: str) -> None:
    uri = join_uri(output, LOCK)
    if (_read_lock(uri) or {}).get("token") == token:
        _delete(uri)


def _read_lock(uri: str) -> dict | None:
    try:
        held = json.loads(read_bytes(uri))
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {"started_at": None}  # unreadable or half-written: stale only by age, which it has none of
    return held if isinstance(held, dict) else {"started_at": None}


def _stale(held: dict) -> bool:
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    try:
        started = parse_time(held["started_at"])
    except (KeyError, TypeError, ValueError):
        return True
    return utc_now() - started > timedelta(hours=LOCK_STALE_HOURS)


@dataclass
class AuditResult:
    exit_code: int
    run_id: str
    summary: dict
    report: str


def run_audit(cfg: AuditConfig, now: datetime | None = None, verbose: bool = True) -> AuditResult:
    """One audit run (module docstring). Raises on failure, leaving the state's open_run
    in place for the next run to retry; AuditLocked, touching nothing, while another audit
    of the same output runs."""
    from stfpm.scoring.sources import resolve_models

    _apply_s3(cfg.s3)
    resolve_models(cfg.models, cfg.scoring.threshold)  # a broken model exits 2 before anything is written
    token = acquire_lock(cfg.output)
    try:
        return _run_audit(cfg, now, verbose)
    finally:
        release_lock(cfg.output, token)


def _run_audit(cfg: AuditConfig, now: datetime | None, verbose: bool) -> AuditResult:
    from stfpm.scoring import score

    echo = logger.info if verbose else logger.debug
    now = now or utc_now()
    state = read_state(cfg.output)
    if state["input"] not in (None, cfg.input):
        raise ValueError(f"{cfg.output} holds the audit state of another input ({state['input']}); "
                         f"use another output for {cfg.input}")
    last = state["last_success"]
    first_run_since = parse_time(cfg.first_run_since) if cfg.first_run_since else None
    since = parse_time(last["until"]) if last else first_run_since  # shown; the ledger decides (select_new)
    until = now - timedelta(minutes=cfg.settle_minutes)
    warnings = []
    if last and now < parse_time(last["until"]) + timedelta(minutes=cfg.settle_minutes):
        warnings.append(f"the clock ({iso(now)}) is behind the last run's ({last['until']} + settle_minutes); "
                        "nothing is skipped for it, but check the machine's time")
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
        seen, legacy_until = read_seen(cfg.output, last)
        days, missing_days = days_of_night(cfg, last, now), []
        items = list_items(cfg, days, missing_days)
        taken, listing, settling = select_new(items, seen, now, cfg.settle_minutes, first_run_since, legacy_until)
        if days is not None:  # a dated source: which day folders were listed, which do not exist (yet)
            listing["days"] = {"first": days[0].isoformat() if days else None,
                               "last": days[-1].isoformat() if days else None,
                               "listed": len(days) - len(missing_days), "missing": missing_days}
            if missing_days:
                warnings.append(f"{len(missing_days)} day folders of {cfg.input} do not exist (yet): "
                                f"{', '.join(missing_days[:10])}{' ...' if len(missing_days) > 10 else ''}; "
                                "nothing listed for them (a later night lists them again)")
        if not listing["listed"] and last and last.get("listing", {}).get("listed"):
            warnings.append(f"{cfg.input} lists nothing tonight (the last run listed {last['listing']['listed']}): "
                            "is it mounted? Nothing is lost: what reappears and is not in the ledger is scored")
        arrived = input_rows(cfg, taken)
        retried = read_retries(cfg.output, last, arrived)
        inputs = pa.concat_tables([arrived, retried]).sort_by("image_uri")
        echo(f"run {run_id}: {listing['listed']} listed, {listing['seen']} scored by earlier runs, "
             f"{listing['settling']} still settling (next run), {listing['new']} new "
             f"({listing['future_dated']} dated in the future); {len(arrived)} inputs, "
             f"{len(retried)} retried after a transient error in run {last['run_id'] if last else None}")
        for warning in warnings:
            logger.warning(f"warning: {warning}")
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
                            allow_roots=s.allow_roots or _source_root(cfg), verbose=verbose)
        table = read_run_table(run_dir)
        summary = summarize(table, inputs, cfg, run_id=run_id, since=since, until=until,
                            attempts=open_run["attempts"], scoring=scoring, retried=len(retried),
                            waiting=settling_report(settling, cfg.settle_minutes))
        summary.update(listing=listing, warnings=warnings)
        summary["trend"] = collect_trend(cfg.output, state["runs"], summary)
        write_retries(run_dir, inputs, table)
        write_seen(run_dir, seen | {(f.uri, f.version) for f in taken})
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
                "attempts": open_run["attempts"], "exit_code": summary["exit_code"], **summary["totals"],
                "listing": listing, "seen": run_id}
    state.update(last_success=finished, open_run=None, runs=(state["runs"] + [finished])[-HISTORY:])
    write_state(cfg.output, state)
    if last and last.get("seen") and last["seen"] != run_id:  # the ledger is cumulative: the old copy can go
        _delete(join_uri(cfg.output, RUNS, last["seen"], SEEN))
    echo(f"run {run_id}: {summary['status']} ({summary['totals']['inputs']} inputs, "
         f"{summary['totals']['anomalous']} anomalous, {summary['totals']['ood']} ood, "
         f"{summary['totals']['error']} errors); report: {report}")
    return AuditResult(summary["exit_code"], run_id, summary, report)


def _source_root(cfg: AuditConfig) -> list[str] | None:
    """A local folder source is where its inputs may be read from, unless scoring.allow_roots
    says more: a file symlink out of it becomes an error row, as in `stfpm score`."""
    return [source_root(cfg)] if cfg.source is not None and not is_s3(cfg.source) else None


def read_seen(output: str, last: dict | None) -> tuple[set[tuple[str, str]], datetime | None]:
    """The ledger of finished runs: (URI, version) of every item (image, or manifest) they
    took; and for a state from before the ledger, its cut-off instead (legacy_until)."""
    if not last:
        return set(), None
    if not last.get("seen"):
        return set(), parse_time(last["until"])
    try:
        table = pq.read_table(pa.BufferReader(read_bytes(join_uri(output, RUNS, last["seen"], SEEN))))
    except FileNotFoundError:  # removed by hand: the last cut-off then stands in for it, as before the ledger
        logger.warning(f"warning: the ledger {join_uri(output, RUNS, last['seen'], SEEN)} is missing; "
                       f"taking what arrived after {last['until']}")
        return set(), parse_time(last["until"])
    return set(zip(table["image_uri"].to_pylist(), table["input_version"].to_pylist())), None


def write_seen(run_dir: str, seen: set[tuple[str, str]]) -> None:
    uris, versions = zip(*sorted(seen)) if seen else ((), ())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"image_uri": pa.array(uris, pa.string()), "input_version": pa.array(versions, pa.string())}),
                   sink)
    write_bytes(join_uri(run_dir, SEEN), sink.getvalue().to_pybytes())


def _delete(uri: str) -> None:
    fs, path = filesystem_for(uri)
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass


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
    table = table.filter(pc.invert(pc.is_in(table["image_uri"], value_set=arrived["image_uri"].combine_chunks())))
    return pa.table([table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
                     for f in schema], schema=schema)


def write_retries(run_dir: str, inputs: pa.Table, table) -> None:
    """RETRY: the rows of `inputs` whose standing row in the run's table (a pa.Table or its
    shards, read_run_table) is a transient error."""
    transient = transient_uris(table)
    retry = inputs.filter(pc.is_in(inputs["image_uri"], value_set=transient)) if len(transient) else inputs.slice(0, 0)
    sink = pa.BufferOutputStream()
    pq.write_table(retry, sink)
    write_bytes(join_uri(run_dir, RETRY), sink.getvalue().to_pybytes())


def _apply_s3(options: dict) -> None:
    """s3.endpoint / s3.region of the config into the environment (stfpm.storage)."""
    set_s3_environment(options.get("endpoint"), options.get("region"))


def read_run_table(run_dir: str) -> TableShards:
    """The run's score table, read bucket by bucket each time it is iterated (no shard when
    nothing was scored): summarize and write_retries never hold the whole table."""
    return TableShards(join_uri(run_dir, "scores"))


def rerender_report(cfg: AuditConfig, run_id: str) -> str:
    """Write runs/<run_id>/report.html again from its audit.json (fresh presigned links)."""
    _apply_s3(cfg.s3)
    run_dir = join_uri(cfg.output, RUNS, run_id)
    summary = json.loads(read_bytes(join_uri(run_dir, "audit.json")))
    report = join_uri(run_dir, "report.html")
    write_bytes(report, render_report(summary, report, cfg.report.link_expiry_hours).encode())
    return report
