"""Writing the score table: whole Parquet files named by their rows, flushed by size and time, and
removing rows a retry superseded."""
from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stfpm.scoring.table import (BUCKETS, INPUT_ERROR, TRANSIENT_ERROR, bucket_folder, bucket_of, codes, is_bucketed,
                                 read_index, set_columns, shards, split_by_code, table_files, winning_rows,
                                 with_image_ids)
from stfpm.storage import filesystem_for, is_s3, join_uri, write_bytes

ROWS_PER_FILE = 4096
FLUSH_S = 30.0
STAGES = ("read", "decode", "predict", "maps", "table")


class TableWriter:
    """Writes the pipeline's rows into table files as they arrive on the driver, each bucket
    (table.bucket_of) into its own folder: a bucket's file when `rows_per_file` of its rows
    are buffered, every bucket's when the oldest buffered row has waited `flush_s`, so a
    killed run loses at most about `flush_s` of scored rows (their maps are rewritten by
    the re-run). Each file is named by a hash of its rows; `totals` sums their stats."""

    def __init__(self, scores_uri: str, run_id: str, schema: pa.Schema, rows_per_file: int = ROWS_PER_FILE,
                 flush_s: float = FLUSH_S):
        self.scores_uri, self.run_id, self.schema = scores_uri, run_id, schema
        self.rows_per_file, self.flush_s = rows_per_file, flush_s
        self.buffers: dict[int, list[pa.Table]] = {}
        self.since: dict[int, float] = {}  # when each bucket's oldest buffered row arrived
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
        now = time.monotonic()
        for bucket, rows in by_bucket(batch):
            self.since.setdefault(bucket, now)
            self.buffers.setdefault(bucket, []).append(rows)
            if sum(map(len, self.buffers[bucket])) >= self.rows_per_file:
                self._flush_bucket(bucket, whole_files_only=True)
        if self.since and now - min(self.since.values()) >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        for bucket in sorted(self.buffers):
            self._flush_bucket(bucket)

    def _flush_bucket(self, bucket: int, whole_files_only: bool = False) -> None:
        rows = pa.concat_tables(self.buffers.pop(bucket))
        self.since.pop(bucket)
        n = len(rows) - len(rows) % self.rows_per_file if whole_files_only else len(rows)
        for i in range(0, n, self.rows_per_file):
            self.parts.append(write_table_file(rows.slice(i, min(self.rows_per_file, n - i)), self.scores_uri,
                                               self.run_id, self.schema))
        if n < len(rows):
            self.buffers[bucket], self.since[bucket] = [rows.slice(n)], time.monotonic()

    @property
    def files(self) -> list[str]:
        """The table files written (filesystem paths, as read_index names them)."""
        return [path for part in self.parts for path in part["paths"]]

    @property
    def totals(self) -> dict:
        return merge_stats(self.parts)


def by_bucket(rows: pa.Table):
    """(bucket, rows of that bucket) for each bucket `rows` hold (table.bucket_of of their image_uri)."""
    if not len(rows):
        return
    buckets = bucket_of(rows["image_uri"])
    if (buckets == buckets[0]).all():
        yield int(buckets[0]), rows
        return
    for bucket, group in enumerate(split_by_code(rows, buckets, BUCKETS)):
        if len(group):
            yield bucket, group


def table_file_name(table: pa.Table) -> str:
    """part-<hash of its rows' (image_uri, model_version, run_id)>.parquet: the same rows, the
    same name (a re-write of a run's rows replaces its file); another run's rows of the same
    inputs, another name (they never replace an earlier row unseen: compaction decides)."""
    runs = table["run_id"] if "run_id" in table.column_names else pa.nulls(len(table), pa.string())
    keys = sorted(zip(table["image_uri"].to_pylist(), table["model_version"].to_pylist(), runs.to_pylist()),
                  key=repr)
    return "part-" + hashlib.sha256(repr(keys).encode()).hexdigest()[:24] + ".parquet"


def write_file(table: pa.Table, scores_uri: str) -> str:
    """Table rows of one bucket as one whole Parquet file in its bucket folder (one PUT on S3,
    temp file + rename locally: readers never see half a file); returns its filesystem path."""
    (bucket, _), = by_bucket(table.slice(0, 1))
    uri = join_uri(scores_uri, bucket_folder(bucket), table_file_name(table))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(uri, sink.getvalue().to_pybytes())
    return filesystem_for(uri)[1]


def write_table_file(batch: pa.Table, scores_uri: str, run_id: str, schema: pa.Schema) -> dict:
    """Table rows from pipeline rows, one file per bucket they fall in; returns the rows'
    stats (`paths`: the files written)."""
    t0 = time.perf_counter()
    n = len(batch)
    now = datetime.now(timezone.utc)
    batch = set_columns(with_image_ids(batch), run_id=([run_id] * n, pa.string()),
                        scored_at=([now] * n, pa.timestamp("us", tz="UTC")))
    table = pa.table([batch[f.name].cast(f.type) for f in schema], schema=schema)
    paths = [write_file(rows, scores_uri) for _, rows in by_bucket(table)]
    status, kinds = table["status"], table["error_kind"]
    count = lambda column, value: int(pc.sum(pc.equal(column, value)).as_py() or 0)  # noqa: E731
    errors = table.filter(pc.equal(status, "error")).slice(0, 10)
    stats = {"rows": n, "ok": count(status, "ok"), "error": count(status, "error"),
             "error_input": count(kinds, INPUT_ERROR), "error_transient": count(kinds, TRANSIENT_ERROR),
             "anomalous": int(pc.sum(table["is_anomaly"]).as_py() or 0),
             "ood": int(pc.sum(table["ood"]).as_py() or 0), "files": len(paths),
             "seconds": {s: float(pc.sum(batch[f"_t_{s}"]).as_py() or 0.0)
                         for s in STAGES[:-1] if f"_t_{s}" in batch.column_names},
             "actor_peak_rss_mb": float(pc.max(batch["_actor_rss_mb"]).as_py() or 0.0)
             if "_actor_rss_mb" in batch.column_names else 0.0,
             "devices": sorted(pc.unique(table["device"].drop_null()).to_pylist()),
             "error_examples": [list(r) for r in zip(errors["image_uri"].to_pylist(), errors["error"].to_pylist())],
             "paths": paths}
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



def remove_superseded(scores_uri: str, files: Sequence[str] | None = None) -> int:
    """Keep one row per (image_uri, model_version): the one that stands (table.winning_rows:
    of the current content, the ok row, else the latest). An error row without a model
    version (unknown category) is superseded by any later row of its input. Files holding
    superseded rows are rewritten without them (idempotent, so a run killed here is finished
    by the next). `files`: only these files are looked at (a run's own files and those that
    held earlier rows of its inputs, Plan.table_files), so the cost is the run's, not the
    table's history; None: the whole table. Bucket by bucket (an input's rows are all in one).
    Returns the number of rows removed."""
    groups = shards(table_files(scores_uri) if files is None else sorted(files))
    return sum(_remove_superseded(scores_uri, group) for group in groups)


def _remove_superseded(scores_uri: str, files: list[str]) -> int:
    """remove_superseded among the rows of `files` (every row of their inputs)."""
    index = read_index(scores_uri, files, ["image_uri", "input_version", "model_version", "status", "scored_at"])
    if not len(index):
        return 0
    n = len(index)
    winners = np.zeros(n, bool)
    winners[winning_rows(index, ["image_uri", "model_version"])] = True
    uri = codes(index["image_uri"])
    at = index["scored_at"].cast(pa.int64()).fill_null(np.iinfo(np.int64).min).to_numpy()
    latest = np.full(int(uri.max(initial=0)) + 1, np.iinfo(np.int64).min)
    np.maximum.at(latest, uri, at)
    no_model = index["model_version"].is_null().to_numpy(zero_copy_only=False)
    losers = ~winners | (no_model & (at < latest[uri]))
    if not losers.any():
        return 0
    fs, _ = filesystem_for(scores_uri)
    lost = index.filter(pa.array(losers))
    lost = lost.set_column(lost.column_names.index("file"), "file", lost["file"].cast(pa.string()))
    for file in pc.unique(lost["file"]).to_pylist():
        group = lost.filter(pc.equal(lost["file"], file))
        table = pq.read_table(file, filesystem=fs)
        drop = set(zip(group["image_uri"].to_pylist(), group["model_version"].fill_null("").to_pylist()))
        keep = [(u, v or "") not in drop for u, v in zip(table["image_uri"].to_pylist(),
                                                         table["model_version"].to_pylist())]
        uri_of_file = f"s3://{file}" if is_s3(scores_uri) else file
        if any(keep):
            sink = pa.BufferOutputStream()
            pq.write_table(table.filter(pa.array(keep)), sink, compression="zstd")
            write_bytes(uri_of_file, sink.getvalue().to_pybytes())
        else:
            fs.delete_file(file)
    return int(losers.sum())


def move_flat_files(scores_uri: str) -> int:
    """Move the rows of files at the top of scores/ (a table written before buckets) into
    their bucket folders, then delete those files: once per table, by the first run that
    ends in it. Idempotent (the same rows make the same file names), so a run killed midway
    leaves copies that the next run finishes moving. Returns the number of files moved."""
    fs, _ = filesystem_for(scores_uri)
    flat = [f for f in table_files(scores_uri) if not is_bucketed(f)]
    for file in flat:
        table = pq.read_table(file, filesystem=fs)
        for _, rows in by_bucket(table):
            write_file(rows, scores_uri)
        fs.delete_file(file)
    return len(flat)
