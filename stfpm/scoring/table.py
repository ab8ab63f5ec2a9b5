"""The score table: its columns (TABLE_DOC), map scaling, reading it, and which row stands for an input."""
from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from stfpm.model.score_scale import ScoreScale
from stfpm.storage import filesystem_for, join_uri, read_bytes

SCORES, MAPS, OVERLAYS, SUCCESS = "scores", "maps", "overlays", "_SUCCESS"
BUCKET, BUCKETS = "bucket", 16  # 2**4: scores/bucket=NN/ by bucket_of(image_uri) (docs/design.md §11)

TABLE_DOC = """\
column         type                 meaning
image_id       string               sha256(image_uri)[:32]; the maps' file name
image_uri      string               the input (s3://bucket/key or an absolute, normalised local path)
input_version  string               "<size>-<modified, ns>" of the file as listed (local: the later of
                                    mtime and ctime; S3: LastModified); a new version is scored again
<partitions>   string               one per --partitions name (null where a file has no such level)
model_name     string               registry category, or the model directory's name
model_version  string               model.json's model_version (a hash of the weights)
raw_score      double               max of the anomaly map (null on error); predict's and the Python
                                    API's `score` (and `raw_score`)
score          double               normalised, in [0, 1]: 0.5 at the threshold, strictly increasing in
                                    raw_score (same rank order; predict's `norm_score`); r = raw / threshold gives
                                    0.5 * r ** (1 / log_scale) below, 1 - 0.5 / r above (stfpm.model.score_scale)
is_anomaly     bool                 raw_score >= threshold
threshold      double               the threshold used (stored or overridden)
ood            bool                 the input is unlike the model's training images: its score is not to be
                                    trusted (wrong model, changed camera); null: the model has no check
ood_score      double               in-distribution distance / its limit (> 1 is ood; stfpm.model.ood)
width, height  int32                the input's size in pixels (from the header on error rows, if known)
map_uri        string               8-bit PNG anomaly map at width x height (see map scaling)
overlay_uri    string               overlay PNG (--overlays, anomalous inputs only)
status         string               "ok" or "error"
error          string               why the row failed ("read: ...", "decode: ...", "model: ..."),
                                    or on an ok row why its overlay is missing ("overlay: ...") or that
                                    only the first of its frames was scored ("frames: ...")
error_kind     string               on error rows: "input" (the file itself is bad: not retried until
                                    its input_version changes) or "transient" (model, IO: retried)
device         string               where the forward ran: "cpu", "gpu:N", with the GPU Ray assigned
run_id         string               the run that wrote the row
scored_at      timestamp[us, UTC]   when the row was written"""


def table_schema(partitions: list[str]) -> pa.Schema:
    head = [("image_id", pa.string()), ("image_uri", pa.string()), ("input_version", pa.string())]
    tail = [("model_name", pa.string()), ("model_version", pa.string()), ("raw_score", pa.float64()),
            ("score", pa.float64()), ("is_anomaly", pa.bool_()), ("threshold", pa.float64()),
            ("ood", pa.bool_()), ("ood_score", pa.float64()),
            ("width", pa.int32()), ("height", pa.int32()), ("map_uri", pa.string()),
            ("overlay_uri", pa.string()), ("status", pa.string()), ("error", pa.string()),
            ("error_kind", pa.string()), ("device", pa.string()), ("run_id", pa.string()),
            ("scored_at", pa.timestamp("us", tz="UTC"))]
    return pa.schema(head + [(p, pa.string()) for p in partitions] + tail)


def reserved_names() -> set[str]:
    """Names a --partitions level may not take: the table's columns, the manifests'
    `size_bytes`, and the hive folder level `bucket` that readers of the folder see."""
    return set(table_schema([]).names) | {"size_bytes", BUCKET}


def map_to_raw(pixels: np.ndarray, threshold: float, log_scale: float) -> np.ndarray:
    """Map PNG pixels back to raw anomaly scores: the exact inverse of the normalised score
    (pixel / 255 = s; 0 -> 0, 255 -> inf), so within the 8-bit quantisation of s. `threshold`
    is the row's, `log_scale` the model's (model.json `threshold.score_scale`, _SUCCESS)."""
    return ScoreScale(log_scale).to_raw(np.asarray(pixels, np.float64) / 255.0, threshold)


INPUT_ERROR, TRANSIENT_ERROR = "input", "transient"
INDEX_SCHEMA = pa.schema([("image_uri", pa.string()), ("input_version", pa.string()),
                          ("model_name", pa.string()), ("model_version", pa.string()), ("status", pa.string()),
                          ("error_kind", pa.string()), ("threshold", pa.float64()),
                          ("scored_at", pa.timestamp("us", tz="UTC"))])


def bucket_of(uris: pa.ChunkedArray | pa.Array, chunk: int = 1 << 18) -> np.ndarray:
    """Each URI's bucket (0..15): the top 4 bits of the CRC-32 of image_uri (its UTF-8), so
    every row of an input lies in one bucket whichever run wrote it (Spark:
    shiftright(crc32(image_uri), 28)). CRC-32 rather than sha256 (image_id): the plan hashes
    every listed URI, and CRC-32 is 2.3x faster; its top bits spread names that differ in a
    few digits evenly (its low bits did not)."""
    out = np.empty(len(uris), np.int8)
    uris = uris.combine_chunks() if isinstance(uris, pa.ChunkedArray) else uris
    for i in range(0, len(uris), chunk):
        part = uris.slice(i, chunk).to_pylist()
        out[i:i + len(part)] = [zlib.crc32(u.encode()) >> 28 for u in part]
    return out


def split_by_code(rows: pa.Table, code: np.ndarray, n: int) -> list[pa.Table]:
    """`rows` in `n` groups by each row's integer code (0..n-1): group i holds the rows of code
    i in their order (empty where none). One stable sort and slices, not a filter per group."""
    order = np.argsort(code, kind="stable")
    rows = rows.take(pa.array(order, pa.int64()))
    counts = np.bincount(code, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)])
    return [rows.slice(int(starts[i]), int(counts[i])) for i in range(n)]


def bucket_folder(bucket: int) -> str:
    """The hive-style folder of a bucket under scores/ (pandas, DuckDB and Spark read it as a column)."""
    return f"{BUCKET}={bucket:02d}"


def table_files(scores_uri: str) -> list[str]:
    """The table's Parquet files (filesystem paths, sorted), in bucket folders or (a table
    written before buckets) at the top; names starting with "." or "_" (temp files) left out."""
    fs, path = filesystem_for(scores_uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(pads.dataset(path, filesystem=fs, format="parquet").files)


def file_bucket(file: str) -> int | None:
    """The bucket whose folder (bucket_folder) holds the table file `file`; None for a file at
    the top of scores/ (a table written before buckets)."""
    folder = file.rsplit("/", 2)[-2]
    return int(folder.split("=", 1)[1]) if folder.startswith(BUCKET + "=") else None


def is_bucketed(file: str) -> bool:
    return file_bucket(file) is not None


def shards(files: Sequence[str]) -> list[list[str]]:
    """`files` in groups that each hold every row of their inputs: one group per bucket
    folder; all of them as one group when some file lies outside the bucket folders (a flat
    table written before buckets, until a run moves its rows, sink.move_flat_files)."""
    if not all(is_bucketed(f) for f in files):
        return [list(files)] if files else []
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(f.rsplit("/", 1)[0], []).append(f)
    return [groups[k] for k in sorted(groups)]


def scan_shards(scores_uri: str, columns: Sequence[str] | None = None, filter=None,
                schema: pa.Schema | None = None):
    """The table's rows shard by shard (shards), each a pa.Table of `columns` (default: all;
    those the table lacks are left out) whose rows pass `filter` (a pyarrow.dataset
    expression, applied in the scan). The schema is `schema`, else the table's (as
    pyarrow.dataset infers it for the whole folder), so every shard has the same columns.
    Memory: one shard's rows at a time."""
    fs, path = filesystem_for(scores_uri)
    files = table_files(scores_uri)
    if not files:
        return
    if schema is None:
        schema = pads.dataset(path, filesystem=fs, format="parquet").schema
    if columns is not None:
        columns = [c for c in columns if c in schema.names or c.startswith("__")]
    for group in shards(files):
        yield pads.dataset(group, filesystem=fs, format="parquet", schema=schema).to_table(
            columns=list(columns) if columns is not None else None, filter=filter)


class TableShards:
    """A score table read shard by shard whenever it is iterated (scan_shards): the whole
    table is never held at once. Iterating twice reads the table twice."""

    def __init__(self, scores_uri: str, columns: Sequence[str] | None = None, filter=None):
        self.scores_uri, self.columns, self.filter = scores_uri, columns, filter

    def __iter__(self):
        return scan_shards(self.scores_uri, self.columns, self.filter)

    def select(self, columns: Sequence[str]) -> TableShards:
        """The same shards with only `columns` (those the table has)."""
        return TableShards(self.scores_uri, columns, self.filter)


def read_index(scores_uri: str, files: Sequence[str] | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """INDEX_SCHEMA's columns (or `columns` of them) and `file` (dictionary-encoded) of every
    row already written (a column older files lack is null), or of the rows of `files` only;
    files whose names start with "." or "_" (in-progress temp files) are not read."""
    fs, path = filesystem_for(scores_uri)
    names = list(columns or INDEX_SCHEMA.names)
    file_type = pa.dictionary(pa.int32(), pa.string())
    if files is not None and not files or files is None and fs.get_file_info(path).type != pafs.FileType.Directory:
        return pa.table({n: pa.array([], INDEX_SCHEMA.field(n).type) for n in names} | {"file": pa.array([], file_type)})
    dataset = pads.dataset(list(files) if files is not None else path, filesystem=fs, format="parquet",
                           schema=INDEX_SCHEMA)
    table = dataset.to_table(columns=names + ["__fragment_index"])
    file = pa.DictionaryArray.from_arrays(table["__fragment_index"].combine_chunks() if len(table) else
                                          pa.array([], pa.int32()), pa.array(dataset.files, pa.string()))
    return table.drop_columns(["__fragment_index"]).append_column("file", file)


def codes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """int64 codes of a column's values, equal where the values are (a null counts as "")."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = column.fill_null("")
    found = pc.index_in(column, value_set=pc.unique(column))
    return found.to_numpy().astype(np.int64) if len(found) else np.zeros(0, np.int64)


def _sorted_ranks(column: pa.ChunkedArray) -> np.ndarray:
    """Per row, the rank of its value in ascending order (a null counts as ""): for columns of
    few distinct values (`file`, dictionary-encoded by read_index)."""
    if pa.types.is_dictionary(column.type):
        encoded = pa.table({"c": column}).unify_dictionaries()["c"]
        if not encoded.num_chunks:
            return np.zeros(0, np.int64)
        rank = pc.rank(encoded.chunk(0).dictionary.fill_null(""), sort_keys="ascending", tiebreaker="dense")
        indices = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in encoded.chunks])
        return rank.to_numpy().astype(np.int64)[indices]
    column = column.fill_null("")
    values = pc.unique(column)
    rank = pc.rank(values, sort_keys="ascending", tiebreaker="dense").to_numpy().astype(np.int64)
    return rank[codes(column)] if len(column) else np.zeros(0, np.int64)


def _group_starts(group: np.ndarray) -> np.ndarray:
    """True where a sorted group code differs from the one before."""
    starts = np.ones(len(group), bool)
    starts[1:] = group[1:] != group[:-1]
    return starts


def winning_rows(table: pa.Table, keys: Sequence[str]) -> np.ndarray:
    """The row numbers, ascending, of the row that stands for each distinct `keys` value (a
    null counts as ""): among the rows of the input's current content (the input_version of
    its latest row), its ok row if it has one, else its latest; among equals the latest
    `scored_at`, then the last `file` if the table has that column, then the first row.
    Arrow codes and numpy sorts: no Python object per row."""
    n = table.num_rows
    if not n:
        return np.zeros(0, np.int64)
    if len(keys) == 1 and not table[keys[0]].null_count and pc.count_distinct(table[keys[0]]).as_py() == n:
        return np.arange(n)  # every value once (one hash pass): every row stands
    group = np.zeros(n, np.int64)
    for key in keys:
        c = codes(table[key])
        group = group * (int(c.max(initial=0)) + 1) + c
    at = table["scored_at"].cast(pa.int64()).fill_null(np.iinfo(np.int64).min).to_numpy()
    file = _sorted_ranks(table["file"]) if "file" in table.column_names else np.zeros(n, np.int64)
    row = np.arange(n)
    current = np.ones(n, bool)
    if "input_version" in table.column_names:
        version = codes(table["input_version"])
        order = np.lexsort((-row, -file, -at, group))  # per group: the latest row first
        starts = _group_starts(group[order])
        newest = version[order][starts][np.cumsum(starts) - 1]
        current[order] = version[order] == newest
    ok = pc.fill_null(pc.equal(table["status"], "ok"), False).to_numpy(zero_copy_only=False)
    order = np.lexsort((row, -file, -at, ~ok, ~current, group))
    return np.sort(order[_group_starts(group[order])])


def current_rows(table: pa.Table, versions: Sequence[str]) -> pa.Table:
    """The rows of the model versions `versions` (as _SUCCESS lists the last run's), or of no
    model (a category without one). A model is its model_version: a copy of a model
    directory under another name is the same model."""
    found = table["model_version"]
    keep = pc.or_(pc.is_null(found), pc.is_in(found, pa.array(sorted(set(versions)), pa.string())))
    return table.filter(keep)


def latest_rows(table: pa.Table, versions: Sequence[str]) -> pa.Table:
    """One row per input, for the model versions `versions`: the row that stands
    (winning_rows) among the input's rows of those versions (current_rows). Rows of other
    model versions (history, from before a retrain) are left out."""
    current = current_rows(table, versions)
    return current.take(pa.array(winning_rows(current, ["image_uri"]), pa.int64()))


def success_versions(output: str) -> list[str]:
    """The model versions of OUTPUT's last finished run (its _SUCCESS)."""
    success = json.loads(read_bytes(join_uri(output, SUCCESS)))
    return [m["model_version"] for m in success["models"].values()]


def read_scores(output: str, latest: bool = True):
    """OUTPUT's score table as a pandas DataFrame sorted by image_uri. latest=True (the
    default): one row per input, scored by the model version(s) of the last finished run
    (latest_rows; _SUCCESS says which); latest=False: every row kept, one per input and model
    version. Read bucket by bucket (scan_shards, the filter in the scan), so besides the
    result only one bucket's rows are held; the sort moves one column at a time."""
    scores = join_uri(output, SCORES)
    found = pads.field("model_version")
    scan = found.is_null() | found.isin(sorted(set(success_versions(output)))) if latest else None
    pool = pa.default_memory_pool()
    parts = []
    for shard in scan_shards(scores, filter=scan):
        if latest:
            rows = winning_rows(shard, ["image_uri"])
            if len(rows) < len(shard):
                shard = shard.take(pa.array(rows, pa.int64()))
        parts.append(shard.combine_chunks())  # the scan's many small chunks held 1.8x their data at 1M rows
        del shard
        pool.release_unused()  # a bucket's scan buffers, before the next bucket's
    if not parts:
        fs, path = filesystem_for(scores)
        parts = [pads.dataset(path, filesystem=fs, format="parquet").to_table(filter=scan)]
    return _sorted_frame(parts, "image_uri", pool)


def _sorted_frame(parts: list[pa.Table], key: str, pool: pa.MemoryPool):
    """The tables `parts` (emptied: the caller gives them up) as one pandas DataFrame sorted
    by `key`, each column moved and converted on its own: one column's copy at a time
    instead of the whole table's."""
    import pandas as pd

    table = pa.concat_tables(parts)
    parts.clear()
    order = pc.sort_indices(table[key])
    names, columns = table.column_names, dict(zip(table.column_names, table.columns))
    index = pd.RangeIndex(table.num_rows)
    del table
    frame = {}
    for name in names:
        column = pa.table({name: columns.pop(name).take(order)})
        frame[name] = column.to_pandas(self_destruct=True, split_blocks=True)[name]
        del column
        pool.release_unused()  # the source column's buffers, before the next column's copy
    return pd.DataFrame(frame, index=index, copy=False)


# ---------------------------------------------------------------- the pipeline's row batches

def set_columns(batch: pa.Table, **columns) -> pa.Table:
    """Add or replace columns; values are (list, arrow type) pairs so every block has the
    same schema whatever its values (an all-null column must not become type null)."""
    for name, (values, kind) in columns.items():
        array = pa.array(values, kind)
        if name in batch.column_names:
            batch = batch.set_column(batch.column_names.index(name), name, array)
        else:
            batch = batch.append_column(name, array)
    return batch


def image_id(uri: str) -> str:
    """A stable id for an input: the first 32 hex digits of sha256(image_uri)."""
    return hashlib.sha256(uri.encode()).hexdigest()[:32]


def with_image_ids(batch: pa.Table) -> pa.Table:
    """The image_id column (image_id of each image_uri), computed where the rows are (in the
    workers), not for every input on the driver. A batch that has it is kept."""
    if "image_id" in batch.column_names:
        return batch
    ids = [image_id(u) for u in batch["image_uri"].to_pylist()]
    return pa.Table.from_arrays([pa.array(ids, pa.string()), *batch.columns], names=["image_id", *batch.column_names])


def drop_columns(batch: pa.Table, *names: str) -> pa.Table:
    return batch.drop_columns([n for n in names if n in batch.column_names])

