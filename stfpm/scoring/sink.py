"""Writing the score table: whole Parquet files named by their rows, flushed by size and time, and
removing rows a retry superseded."""
from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from stfpm.scoring.table import INPUT_ERROR, TRANSIENT_ERROR, read_index, set_columns, winning_rows
from stfpm.storage import filesystem_for, is_s3, join_uri, write_bytes

ROWS_PER_FILE = 4096
FLUSH_S = 30.0
STAGES = ("read", "decode", "predict", "maps", "table")


class TableWriter:
    """Writes the pipeline's rows into table files as they arrive on the driver: a file when
    `rows_per_file` rows are buffered or the oldest buffered row has waited `flush_s`, so a
    killed run loses at most about `flush_s` of scored rows (their maps are rewritten by
    the re-run). Each file is named by a hash of its rows; `totals` sums their stats."""

    def __init__(self, scores_uri: str, run_id: str, schema: pa.Schema, rows_per_file: int = ROWS_PER_FILE,
                 flush_s: float = FLUSH_S):
        self.scores_uri, self.run_id, self.schema = scores_uri, run_id, schema
        self.rows_per_file, self.flush_s = rows_per_file, flush_s
        self.buffer: list[pa.Table] = []
        self.since = 0.0
        self.parts: list[dict] = []

    def consume(self, ds, on_rows=None) -> dict:
        """Run a Ray Data dataset (streaming), writing its rows; returns `totals`. `on_rows(n)`
        hears of every batch of n rows that arrives (the progress display)."""
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            self.add(batch)
            if on_rows:
                on_rows(len(batch))
        self.flush()
        return self.totals

    def add(self, batch: pa.Table) -> None:
        if not len(batch):
            return
        if not self.buffer:
            self.since = time.monotonic()
        self.buffer.append(batch)
        while sum(map(len, self.buffer)) >= self.rows_per_file:
            rows = pa.concat_tables(self.buffer)
            self.buffer = [rows.slice(self.rows_per_file)] if len(rows) > self.rows_per_file else []
            self._write(rows.slice(0, self.rows_per_file))
        if self.buffer and time.monotonic() - self.since >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            rows, self.buffer = pa.concat_tables(self.buffer), []
            self._write(rows)

    def _write(self, rows: pa.Table) -> None:
        self.parts.append(write_table_file(rows, self.scores_uri, self.run_id, self.schema))
        self.since = time.monotonic()

    @property
    def totals(self) -> dict:
        return merge_stats(self.parts)


def write_table_file(batch: pa.Table, scores_uri: str, run_id: str, schema: pa.Schema) -> dict:
    """One Parquet file of table rows from pipeline rows; returns the rows' stats."""
    t0 = time.perf_counter()
    n = len(batch)
    now = datetime.now(timezone.utc)
    batch = set_columns(batch, run_id=([run_id] * n, pa.string()),
                        scored_at=([now] * n, pa.timestamp("us", tz="UTC")))
    table = pa.table([batch[f.name].cast(f.type) for f in schema], schema=schema)
    keys = sorted(zip(table["image_id"].to_pylist(), table["model_version"].to_pylist()))
    name = "part-" + hashlib.sha256(repr(keys).encode()).hexdigest()[:24] + ".parquet"
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(join_uri(scores_uri, name), sink.getvalue().to_pybytes())
    status, kinds = table["status"].to_pylist(), table["error_kind"].to_pylist()
    stats = {"rows": n, "ok": status.count("ok"), "error": status.count("error"),
             "error_input": kinds.count(INPUT_ERROR), "error_transient": kinds.count(TRANSIENT_ERROR),
             "anomalous": sum(bool(a) for a in table["is_anomaly"].to_pylist()),
             "ood": sum(bool(a) for a in table["ood"].to_pylist()), "files": 1,
             "seconds": {s: float(sum(batch[f"_t_{s}"].to_pylist()))
                         for s in STAGES[:-1] if f"_t_{s}" in batch.column_names},
             "actor_peak_rss_mb": max(batch["_actor_rss_mb"].to_pylist(), default=0.0)
             if "_actor_rss_mb" in batch.column_names else 0.0,
             "devices": sorted(set(table["device"].drop_null().to_pylist())),
             "error_examples": [[u, e] for u, s, e in zip(table["image_uri"].to_pylist(), status,
                                                          table["error"].to_pylist()) if s == "error"][:10]}
    stats["seconds"]["table"] = time.perf_counter() - t0
    return stats


def merge_stats(parts: list[dict]) -> dict:
    counted = ("rows", "ok", "error", "error_input", "error_transient", "anomalous", "ood", "files")
    total = {**dict.fromkeys(counted, 0), "seconds": {s: 0.0 for s in STAGES},
             "actor_peak_rss_mb": 0.0, "devices": [], "error_examples": []}
    for part in parts:
        if not part:
            continue
        for k in counted:
            total[k] += part[k]
        for s, v in part["seconds"].items():
            total["seconds"][s] += v
        total["actor_peak_rss_mb"] = max(total["actor_peak_rss_mb"], part["actor_peak_rss_mb"])
        total["devices"] = sorted(set(total["devices"]) | set(part["devices"]))
        total["error_examples"] = (total["error_examples"] + part["error_examples"])[:10]
    return total



def remove_superseded(scores_uri: str) -> int:
    """Keep one row per (image_uri, model_version): the one that stands (table.winning_rows:
    of the current content, the ok row, else the latest). An error row without a model
    version (unknown category) is superseded by any later row of its input. Files holding
    superseded rows are rewritten without them (idempotent, so a run killed here is finished
    by the next). Returns the number of rows removed."""
    index = read_index(scores_uri)
    if not len(index):
        return 0
    df = index.to_pandas()
    latest = df.groupby("image_uri")["scored_at"].transform("max")
    losers = (~df.index.isin(winning_rows(index, ["image_uri", "model_version"]))
              | (df["model_version"].isna() & (df["scored_at"] < latest)))
    if not losers.any():
        return 0
    fs, _ = filesystem_for(scores_uri)
    for file, group in df[losers].groupby("file"):
        table = pq.read_table(file, filesystem=fs)
        drop = set(zip(group["image_uri"], group["model_version"].fillna("")))
        keep = [(u, v or "") not in drop for u, v in zip(table["image_uri"].to_pylist(),
                                                        table["model_version"].to_pylist())]
        uri = f"s3://{file}" if is_s3(scores_uri) else file
        if any(keep):
            sink = pa.BufferOutputStream()
            pq.write_table(table.filter(pa.array(keep)), sink, compression="zstd")
            write_bytes(uri, sink.getvalue().to_pybytes())
        else:
            fs.delete_file(file)
    return int(losers.sum())
