"""The score table: its columns (TABLE_DOC), map scaling, reading it, and which row stands for an input."""
from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from stfpm.model.score_scale import ScoreScale
from stfpm.storage import filesystem_for, join_uri, read_bytes

SCORES, MAPS, OVERLAYS, SUCCESS = "scores", "maps", "overlays", "_SUCCESS"

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
                                    or on an ok row why its overlay is missing ("overlay: ...")
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


def map_to_raw(pixels: np.ndarray, threshold: float, log_scale: float) -> np.ndarray:
    """Map PNG pixels back to raw anomaly scores: the exact inverse of the normalised score
    (pixel / 255 = s; 0 -> 0, 255 -> inf), so within the 8-bit quantisation of s. `threshold`
    is the row's, `log_scale` the model's (model.json `threshold.score_scale`, _SUCCESS)."""
    return ScoreScale(log_scale).to_raw(np.asarray(pixels, np.float64) / 255.0, threshold)


INPUT_ERROR, TRANSIENT_ERROR = "input", "transient"
INDEX_SCHEMA = pa.schema([("image_uri", pa.string()), ("input_version", pa.string()),
                          ("model_name", pa.string()), ("model_version", pa.string()), ("status", pa.string()),
                          ("error_kind", pa.string()), ("scored_at", pa.timestamp("us", tz="UTC"))])


def read_index(scores_uri: str) -> pa.Table:
    """INDEX_SCHEMA's columns and `file` of every row already written (a column older files
    lack is null); files whose names start with "." or "_" (in-progress temp files) are not read."""
    fs, path = filesystem_for(scores_uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return pa.table({f.name: pa.array([], f.type) for f in INDEX_SCHEMA} | {"file": pa.array([], pa.string())})
    dataset = pads.dataset(path, filesystem=fs, format="parquet", schema=INDEX_SCHEMA)
    table = dataset.to_table(columns=INDEX_SCHEMA.names + ["__filename"])
    return table.rename_columns(INDEX_SCHEMA.names + ["file"])


def winning_rows(table: pa.Table, keys: Sequence[str]) -> list[int]:
    """The row numbers, ascending, of the row that stands for each distinct `keys` value (a
    null counts as ""): among the rows of the input's current content (the input_version of
    its latest row), its ok row if it has one, else its latest; among equals the latest
    `scored_at`, then the last `file` if the table has that column."""
    if not table.num_rows:
        return []
    order = ["scored_at"] + (["file"] if "file" in table.column_names else [])
    versioned = "input_version" in table.column_names
    df = table.select([*keys, "status", *order, *(["input_version"] if versioned else [])]).to_pandas()
    for key in keys:
        df[key] = df[key].fillna("")
    df["_current"] = True
    if versioned:
        df["input_version"] = df["input_version"].fillna("")
        newest = df.sort_values(order, kind="stable").groupby(list(keys))["input_version"].transform("last")
        df["_current"] = df["input_version"] == newest.reindex(df.index)
    df["_ok"] = df["status"] == "ok"
    ranked = df.sort_values(["_current", "_ok", *order], ascending=False, kind="stable")
    return sorted(int(i) for i in ranked.index[~ranked.duplicated(list(keys), keep="first")])


def latest_rows(table: pa.Table, versions: dict[str, str]) -> pa.Table:
    """One row per input, for the models `versions` names (model_name -> model_version, as
    _SUCCESS lists the last run's): the row that stands (winning_rows) among the input's
    rows of those versions, or of no model (a category without one). Rows of other model
    versions (history, from before a retrain) are left out."""
    names, found = table["model_name"].to_pylist(), table["model_version"].to_pylist()
    current = table.filter(pa.array([v is None or versions.get(n) == v for n, v in zip(names, found)], pa.bool_()))
    return current.take(pa.array(winning_rows(current, ["image_uri"]), pa.int64()))


def read_scores(output: str, latest: bool = True):
    """OUTPUT's score table as a pandas DataFrame. latest=True (the default): one row per
    input, scored by the model version(s) of the last finished run (latest_rows; _SUCCESS
    says which); latest=False: every row kept, one per input and model version."""
    fs, path = filesystem_for(join_uri(output, SCORES))
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    if latest:
        success = json.loads(read_bytes(join_uri(output, SUCCESS)))
        table = latest_rows(table, {name: m["model_version"] for name, m in success["models"].items()})
    return table.sort_by("image_uri").to_pandas()


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


def drop_columns(batch: pa.Table, *names: str) -> pa.Table:
    return batch.drop_columns([n for n in names if n in batch.column_names])

