"""A nightly audit run's summary (audit.json): counts, errors, anomaly and out-of-distribution
rates per category, alerts, and the job's exit code.

Exit codes (jobs/nightly_audit.py): 0 done, every category at or under its alert level;
3 done, some category's anomaly rate above its alert level, or its share of inputs unlike
the model's training images (`ood`: wrong model, changed camera) above `alert.ood_rate`;
4 done, but transient errors above alert.error_rate of the inputs (default: any); 1 failed
(state not advanced, the next run retries); 2 invalid arguments, configuration or model directory.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stfpm.audit.config import AuditConfig, iso, utc_now
from stfpm.scoring.sources import CATEGORY
from stfpm.scoring.table import INPUT_ERROR, TRANSIENT_ERROR, TableShards, split_by_code, winning_rows

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ALERT, EXIT_ERRORS = 0, 1, 2, 3, 4
HISTOGRAM_BINS = 20
NO_CATEGORY = "(none)"


def summarize(table, inputs: pa.Table, cfg: AuditConfig, *, run_id: str, since: datetime | None,
              until: datetime, attempts: int, scoring: dict | None, retried: int = 0,
              waiting: dict | None = None) -> dict:
    """audit.json: counts, errors and anomaly rate per category, alerts and the exit code.
    One row per input: its ok row if any (the latest), else its latest error row. Errors
    of kind "transient" above alert.error_rate of the inputs make the exit code 4 (after an
    alert's 3); bad input files never do. `table`: the run's table, a pa.Table or its shards
    (table.TableShards: tables whose inputs do not overlap), summed shard by shard, so only
    one shard's rows are held; Arrow compute and numpy throughout: no Python object per row.
    `waiting`: the inputs inside the settle window, reported, not scored. Every decision
    carries its reasons: "why" per category (`category_why`) and for the run (`run_why`)."""
    tallies: dict[str, _Tally] = {}
    scored = error_input = transient = 0
    for shard in shards_of(table, SUMMARY_COLUMNS):
        rows = one_row_per_input(shard, sort=False)
        if not len(rows):
            continue
        scored += len(rows)
        failed = _not_ok(rows)
        kinds = rows["error_kind"].filter(failed)
        error_input, transient = error_input + _count(kinds, INPUT_ERROR), transient + _count(kinds, TRANSIENT_ERROR)
        for n, ok, errors in _by_category(rows, failed):
            tallies.setdefault(n, _Tally(cfg.report.top_k)).add(ok, errors)
    categories = {n: tallies[n].summary(n, cfg) for n in sorted(tallies)}
    ok = sum(c["ok"] for c in categories.values())
    anomalous = sum(c["anomalous"] for c in categories.values())
    ood = sum(c["ood"] for c in categories.values())
    alerts = [n for n, c in categories.items() if c["alert"]]
    totals = {"inputs": len(inputs), "retried": retried, "scored": scored, "ok": ok,
              "error": sum(c["error"] for c in categories.values()), "error_input": error_input,
              "error_transient": transient, "anomalous": anomalous, "anomaly_rate": anomalous / ok if ok else None,
              "ood": ood, "ood_rate": ood / ok if ok else None}
    failing = bool(transient) and transient / max(len(inputs), 1) > cfg.alert.error_rate
    status, code = ("alert", EXIT_ALERT) if alerts else ("errors", EXIT_ERRORS) if failing else ("ok", EXIT_OK)
    for c in categories.values():
        c["why"] = category_why(c, cfg.alert)
    summary = {
        "run_id": run_id, "input": cfg.input, "output": cfg.output, "models": cfg.models,
        "window": {"since": iso(since), "until": iso(until), "waiting": waiting}, "attempts": attempts,
        "generated_at": iso(utc_now()), "status": status, "exit_code": code, "errors_above_level": failing,
        "alerts": alerts, "alert_config": asdict(cfg.alert), "totals": totals, "categories": categories,
        "scoring": _scoring_digest(scoring),
    }
    summary["why"] = run_why(summary, cfg)
    return summary


PICK_COLUMNS = ["image_uri", "input_version", "status", "scored_at"]  # table.winning_rows's
SUMMARY_COLUMNS = [*PICK_COLUMNS, CATEGORY, "model_name", "model_version", "threshold", "error", "error_kind",
                   "is_anomaly", "score", "raw_score", "ood", "ood_score", "width", "height", "map_uri", "overlay_uri"]


def shards_of(table, columns: list[str]) -> Iterable[pa.Table]:
    """A run's table as shards: a pa.Table is one; table.TableShards reads its buckets one by
    one, only `columns` of them; other shards (tables) are taken as they are."""
    if isinstance(table, pa.Table):
        return [table]
    return table.select(columns) if isinstance(table, TableShards) else table


def one_row_per_input(table: pa.Table, sort: bool = True) -> pa.Table:
    """The row that stands for each input (table.winning_rows), sorted by image_uri (or in
    table order with sort=False)."""
    if not table.num_rows:
        return table
    rows = winning_rows(table, ["image_uri"])
    if len(rows) < table.num_rows:
        table = table.take(pa.array(rows, pa.int64()))
    return table.sort_by("image_uri") if sort else table


def transient_uris(table) -> pa.Array:
    """The inputs whose standing row (one_row_per_input) is a transient error, shard by shard."""
    found = [pa.array([], pa.string())]
    for shard in shards_of(table, [*PICK_COLUMNS, "error_kind"]):
        rows = one_row_per_input(shard, sort=False)
        if len(rows) and "error_kind" in rows.column_names:
            failed = rows.filter(pc.fill_null(pc.equal(rows["error_kind"], TRANSIENT_ERROR), False))["image_uri"]
            found.append(failed.combine_chunks().cast(pa.string()))
    return pa.concat_arrays(found)


def _count(column, value) -> int:
    return int(pc.sum(pc.equal(column, value)).as_py() or 0)


def _not_ok(rows: pa.Table) -> pa.ChunkedArray:
    return pc.fill_null(pc.not_equal(rows["status"], "ok"), True)


def _non_empty(column) -> pa.ChunkedArray:
    return pc.if_else(pc.equal(column, ""), pa.scalar(None, pa.string()), column)


def _category_of(rows: pa.Table) -> pa.ChunkedArray:
    """Each row's category: its category column, else its model name, else NO_CATEGORY."""
    found = [_non_empty(rows[c]) for c in (CATEGORY, "model_name") if c in rows.column_names]
    return pc.coalesce(*found, pa.scalar(NO_CATEGORY)) if found else pa.chunked_array(
        [pa.array([NO_CATEGORY] * len(rows), pa.string())])


def _by_category(rows: pa.Table, failed: pa.ChunkedArray):
    """(category, its ok rows, its other rows) for each category of `rows` (_category_of):
    one sort of the rows by (category, failed), then slices, instead of a filter per category."""
    encoded = pc.dictionary_encode(_category_of(rows)).combine_chunks()
    labels = encoded.dictionary.to_pylist()
    key = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64) * 2 + failed.to_numpy(zero_copy_only=False)
    groups = split_by_code(rows, key, 2 * len(labels))
    for code, label in enumerate(labels):
        yield label, groups[2 * code], groups[2 * code + 1]


def _first(rows: pa.Table, keys: list[tuple[str, str]], k: int) -> pa.Table:
    """The first k rows in `keys` order, then by image_uri (one row per input: a total order,
    so the first k of the first k of each shard are the first k of all)."""
    if not len(rows) or k <= 0:
        return rows.slice(0, 0)
    top = pc.select_k_unstable(rows, k=min(k, len(rows)), sort_keys=[*keys, ("image_uri", "ascending")])
    return rows.take(top).sort_by([*keys, ("image_uri", "ascending")])


TOP_KEYS = [("score", "descending"), ("raw_score", "descending")]
OOD_KEYS = [("ood_score", "descending")]
SHOWN = ("image_uri", "score", "raw_score", "is_anomaly", "ood", "ood_score", "width", "height", "map_uri",
         "overlay_uri")
ERROR_EXAMPLES = 20


class _Tally:
    """One category's figures summed over the shards of a run (one row per input each): counts,
    the histogram, and the few rows the report shows (top, ood, error examples) kept as the
    first k of what was seen so far."""

    def __init__(self, top_k: int):
        self.top_k = top_k
        self.inputs = self.ok = self.error = self.anomalous = self.ood = 0
        self.counts = np.zeros(HISTOGRAM_BINS, np.int64)
        self.edges = np.histogram(np.zeros(0), bins=HISTOGRAM_BINS, range=(0.0, 1.0))[1]
        self.top = self.ood_top = self.examples = None
        self.kinds: dict[str, list] = {}  # error prefix -> [count, first image_uri]
        self.models: set[tuple] = set()

    def add(self, ok: pa.Table, errors: pa.Table) -> None:
        """A shard's rows of the category: those that scored ok, and the others."""
        self.inputs += len(ok) + len(errors)
        self.ok += len(ok)
        self.error += len(errors)
        self.anomalous += int(pc.sum(ok["is_anomaly"]).as_py() or 0) if len(ok) else 0
        unlike = ok.filter(pc.fill_null(ok["ood"], False)) if "ood" in ok.column_names else ok.slice(0, 0)  # null: no check
        self.ood += len(unlike)
        if len(ok):
            self.counts += np.histogram(ok["score"].to_numpy(), bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0]
        shown = [c for c in SHOWN if c in ok.column_names]
        self.top = self._keep(self.top, _first(ok.select(shown), TOP_KEYS, self.top_k), TOP_KEYS, self.top_k)
        self.ood_top = self._keep(self.ood_top, _first(unlike.select(shown), OOD_KEYS, self.top_k), OOD_KEYS,
                                  self.top_k)
        if len(errors):
            examples = errors.select(["image_uri", "error"])
            self.examples = self._keep(self.examples, _first(examples, [], ERROR_EXAMPLES), [], ERROR_EXAMPLES)
            prefix = pc.list_element(pc.split_pattern(pc.fill_null(errors["error"], "unknown"), ":", max_splits=1), 0)
            kinds = pa.table({"kind": prefix, "image_uri": errors["image_uri"]}).group_by("kind", use_threads=False)
            for r in kinds.aggregate([("image_uri", "count"), ("image_uri", "min")]).to_pylist():
                seen = self.kinds.setdefault(r["kind"], [0, r["image_uri_min"]])
                seen[0] += r["image_uri_count"]
                seen[1] = min(seen[1], r["image_uri_min"])
        if len(ok):
            found = ok.group_by(["model_name", "model_version", "threshold"], use_threads=False).aggregate([])
            self.models |= {(m["model_name"], m["model_version"], m["threshold"]) for m in found.to_pylist()}

    @staticmethod
    def _keep(kept: pa.Table | None, new: pa.Table, keys, k: int) -> pa.Table:
        return new if kept is None else _first(pa.concat_tables([kept, new]), keys, k)

    def summary(self, name: str, cfg: AuditConfig) -> dict:
        n_ok = self.ok
        rate = self.anomalous / n_ok if n_ok else None
        level = cfg.alert.level(name)
        ood_rate = self.ood / n_ok if n_ok else None
        reasons = []
        if n_ok >= cfg.alert.min_images and rate is not None and rate > level:
            reasons.append(f"anomaly rate {rate:.2%} above {level:.2%}")
        if n_ok >= cfg.alert.min_images and ood_rate is not None and ood_rate > cfg.alert.ood_rate:
            reasons.append(f"{ood_rate:.2%} of inputs unlike the model's training images (ood), above "
                           f"{cfg.alert.ood_rate:.2%}: wrong model or changed images?")
        top = self.top.to_pylist() if self.top is not None else []
        ood_top = self.ood_top.to_pylist() if self.ood_top is not None else []
        examples = self.examples.to_pylist() if self.examples is not None else []
        kinds = {kind: count for kind, (count, _) in sorted(self.kinds.items(), key=lambda kv: kv[1][1])}
        models = sorted(self.models, key=str)
        return {
            "inputs": self.inputs, "ok": n_ok, "error": self.error, "anomalous": self.anomalous, "anomaly_rate": rate,
            "alert_level": level, "alert": bool(reasons), "alert_reasons": reasons,
            "ood": self.ood, "ood_rate": ood_rate,
            "ood_examples": [[r["image_uri"], r.get("ood_score")] for r in ood_top],
            "models": [{"name": n, "model_version": v, "threshold": t} for n, v, t in models],
            "histogram": {"edges": [round(float(e), 4) for e in self.edges], "counts": [int(c) for c in self.counts],
                          "of": "normalised score, 0.5 = the model's threshold"},
            "top": [{k: r.get(k) for k in SHOWN} for r in top],
            "errors": {"by_kind": kinds, "examples": [[r["image_uri"], r["error"]] for r in examples]},
        }


def _pct(rate: float) -> str:
    return f"{rate:.2%}"


def category_why(c: dict, alert) -> list[dict]:
    """The reasons behind a category's alert or its absence, one per check: {"check":
    "anomaly_rate" | "ood_rate" | "min_images", "outcome": "alert" | "ok" | "not checked",
    "text": a sentence with the figures and the level compared}. A rate above its level that
    raised no alert because too few images scored says so (and "above_level": true)."""
    ok, why = c["ok"], []
    checks = (("anomaly_rate", c["anomaly_rate"], c["alert_level"], "anomaly rate", "alert.anomaly_rate"),
              ("ood_rate", c.get("ood_rate"), alert.ood_rate, "share of inputs unlike the training images (ood)",
               "alert.ood_rate"))
    if ok < alert.min_images:
        above = [f"the {label} {_pct(value)} is above its level {_pct(level)}"
                 for _, value, level, label, _key in checks if value is not None and value > level]
        text = (f"only {ok} image(s) scored ok, fewer than alert.min_images ({alert.min_images}): no alert is raised"
                + (f", although {' and '.join(above)}" if above else ""))
        why.append({"check": "min_images", "outcome": "not checked", "text": text, "above_level": bool(above)})
        return why
    for check, value, level, label, key in checks:
        if value is None:
            why.append({"check": check, "outcome": "not checked", "text": f"no {label}: the model has no check"})
        elif value > level:
            why.append({"check": check, "outcome": "alert",
                        "text": f"{label} {_pct(value)} ({_flagged(c, check)} of {ok}) is above {key} {_pct(level)}"})
        else:
            why.append({"check": check, "outcome": "ok",
                        "text": f"{label} {_pct(value)} ({_flagged(c, check)} of {ok}) is at or under {key} {_pct(level)}"})
    return why


def _flagged(c: dict, check: str) -> int:
    return c["anomalous"] if check == "anomaly_rate" else c["ood"]


def run_why(summary: dict, cfg: AuditConfig) -> list[str]:
    """The reasons behind the run's status and exit code, and what the window held: how many
    inputs arrived in it, how many wait in the settle window and from when they are taken."""
    t, window, why = summary["totals"], summary["window"], []
    alerts = summary["alerts"]
    quiet = [name for name, c in summary["categories"].items()
             if any(w["check"] == "min_images" and w["above_level"] for w in c["why"])]
    if alerts:
        why.append(f"exit {summary['exit_code']} (alert): {len(alerts)} categor{'y' if len(alerts) == 1 else 'ies'} "
                   f"above an alert level: " + "; ".join(
                       f"{name}: " + ", ".join(w["text"] for w in summary["categories"][name]["why"]
                                               if w["outcome"] == "alert") for name in alerts))
    elif summary["errors_above_level"]:
        why.append(f"exit {summary['exit_code']} (errors): {t['error_transient']} transient error(s) in "
                   f"{t['inputs']} inputs, above alert.error_rate {_pct(cfg.alert.error_rate)}")
    else:
        why.append(f"exit {summary['exit_code']} (ok): no category above its alert levels"
                   + (f"; {t['error_transient']} transient error(s), not above alert.error_rate "
                      f"{_pct(cfg.alert.error_rate)}" if t.get("error_transient") else ""))
    if quiet:
        why.append(f"not alerted for too few images (alert.min_images {cfg.alert.min_images}) although above a level: "
                   + ", ".join(quiet))
    why.append(f"{t['inputs'] - t['retried']} input(s) new since the last finished run (listed, and not in its "
               "ledger)" + (f", {t['retried']} retried after a transient error" if t["retried"] else ""))
    waiting = window.get("waiting")
    if waiting and waiting["count"]:
        why.append(f"{waiting['count']} file(s) arrived within the last "
                   f"{waiting['settle_minutes']:g} minutes (the settle window, uploads may still be in flight) and wait "
                   f"for a later run; every one of them is taken by a run started after {waiting['taken_after']}")
    return why


def _scoring_digest(scoring: dict | None) -> dict | None:
    if not scoring:
        return None
    return {k: scoring.get(k) for k in ("run_id", "counts", "images_per_s", "timings_s", "devices")}
