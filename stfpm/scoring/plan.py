"""Planning a scoring run on the driver: list the inputs, resolve the models, leave out what OUTPUT already holds."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from stfpm.data.images import IMAGE_EXTENSIONS
from stfpm.model.registry import is_registry
from stfpm.scoring.sources import CATEGORY, ModelRef, list_inputs, resolve_models
from stfpm.scoring.table import (INDEX_SCHEMA, bucket_of, INPUT_ERROR, SCORES, SUCCESS, TRANSIENT_ERROR, drop_columns,
                                 file_bucket, is_bucketed, reserved_names, shards, table_files, table_schema)
from stfpm.storage import filesystem_for, is_s3, join_uri


def new_run_id(now: datetime | None = None) -> str:
    """UTC time + a random suffix, e.g. 20261125T020000Z-3fa9c1."""
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


@dataclass
class Plan:
    """What a run will do, decided on the driver before any Ray work."""
    output: str
    run_id: str
    models: dict[str | None, ModelRef]
    partitions: list[str]
    pending: pa.Table          # one row per input to score, in the pipeline's row format (image_id: the workers')
    n_listed: int
    n_skipped: int
    timings: dict = field(default_factory=dict)
    table_files: list[str] | None = field(default_factory=list)  # files the end of the run compacts besides
    # its own (None: the whole table)

    @property
    def schema(self) -> pa.Schema:
        return table_schema(self.partitions)


def plan_run(model: str, source: str, output: str, partitions: list[str] | None = None,
             extensions=IMAGE_EXTENSIONS, threshold: float | None = None, run_id: str | None = None,
             allow_roots: list[str] | None = None, dates: list | None = None) -> Plan:
    """List the inputs, resolve the model(s) (checking their weights), and leave out what
    OUTPUT's table already settles for the same content and model version: an ok row
    scored with the threshold this run uses, or an error row of kind "input" (the file
    itself is bad). Transient errors are retried. A row without input_version (written
    before it existed) settles any content, so an upgrade does not rescore a whole table.
    All of it in Arrow (per model, anti-joins on image_uri and input_version, bucket by
    bucket: pending_rows): no Python object per input."""
    t0 = time.perf_counter()
    output = output.rstrip("/") if is_s3(output) else filesystem_for(output)[1]  # URIs in the table are absolute
    models = resolve_models(model, threshold)
    registry = is_registry(model)
    partitions = list(partitions) if partitions is not None else ([CATEGORY] if registry else [])
    if registry and CATEGORY not in partitions:
        raise ValueError(f"a model registry picks the model by the {CATEGORY!r} column; "
                         f"name a directory level {CATEGORY!r} in partitions (got {partitions})")
    reserved = reserved_names()
    if clash := reserved.intersection(partitions):
        raise ValueError(f"partition names {sorted(clash)} are table columns; choose other names")
    inputs = list_inputs(source, partitions, extensions, exclude=output, allow_roots=allow_roots, dates=dates)
    t_list = time.perf_counter() - t0
    n = len(inputs)
    refs = list(models.values())
    if registry:  # each input's model by its category; null where the registry has none
        which = pc.index_in(inputs[CATEGORY], value_set=pa.array(list(models), pa.string()))
    else:
        which = pa.array(np.zeros(n, np.int32))
    inputs = inputs.append_column("_row", pa.array(np.arange(n), pa.int64()))
    scores = join_uri(output, SCORES)
    keys = inputs.select(["image_uri", "input_version", "_row"])
    model_of = which.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
    rows, to_compact = pending_rows(scores, join_uri(output, SUCCESS), keys, model_of,
                                    [(r.version, r.threshold) for r in refs])
    del keys, model_of
    pending = inputs.take(rows)  # in image_uri order, as listed
    del inputs
    which = which.take(pending["_row"])
    per_input = lambda values, kind: pa.array(values, kind).take(which)  # noqa: E731
    known = ", ".join(sorted(str(k) for k in models))
    no_model = pc.is_null(which)
    refused = pending["_input_error"]
    if registry and pc.any(no_model).as_py():
        quoted = pc.binary_join_element_wise("'", pending[CATEGORY], "'", "").fill_null("None")  # as repr() shows it
        missing = pc.binary_join_element_wise("model: no model for category ", quoted,
                                              f" in {model} (known: {known})", "")
        unknown = pc.if_else(no_model, missing, pa.scalar(None, pa.string()))
    else:
        unknown = pa.nulls(len(pending), pa.string())
    errors = pc.coalesce(refused, unknown)
    kinds = pc.if_else(pc.is_valid(refused), INPUT_ERROR,
                       pc.if_else(no_model, TRANSIENT_ERROR, pa.scalar(None, pa.string())))
    pending = drop_columns(pending, "_input_error", "_row")
    columns = {"model_name": per_input([r.name for r in refs], pa.string()),
               "model_version": per_input([r.version for r in refs], pa.string()),
               "status": pc.if_else(pc.is_valid(errors), "error", pa.scalar(None, pa.string())),
               "error": errors, "error_kind": kinds,
               "_model_key": per_input([r.name if registry else "" for r in refs], pa.string()),
               "_size": per_input([r.input_size for r in refs], pa.int32()).fill_null(0),
               "_tile": per_input([r.tile_size for r in refs], pa.int32()),
               "_tile_overlap": per_input([r.tile_overlap for r in refs], pa.int32()).fill_null(0),
               "_tile_whole": per_input([r.tile_whole for r in refs], pa.bool_()).fill_null(False)}
    for name, values in columns.items():
        pending = pending.append_column(pa.field(name, values.type), values)
    run_id = run_id or new_run_id()
    return Plan(output=output, run_id=run_id, models=models, partitions=partitions, pending=pending,
                n_listed=n, n_skipped=n - len(pending), table_files=to_compact,
                timings={"list_s": t_list, "plan_s": time.perf_counter() - t0})


def pending_rows(scores_uri: str, success_uri: str, keys: pa.Table, model_of: np.ndarray,
                 models: list[tuple[str, float]]) -> tuple[pa.Array, list[str] | None]:
    """(`_row` of the inputs `keys` (image_uri, input_version, _row) that the table does not
    settle, ascending; the table files the end of the run must compact besides its own:
    those holding a row of an input it scores, or None for the whole table when the last
    run did not finish (no _SUCCESS: it is deleted when a run starts, written when it ends,
    so superseded rows may be anywhere)). `model_of`: each input's model, an index into
    `models` ((model_version, threshold) pairs), -1 for none (never settled). Bucket by
    bucket: the inputs of a bucket (table.bucket_of) against that bucket's rows, read in one
    scan of the columns that decide, so the driver holds one bucket's keys at a time, not
    the table's (a flat table written before buckets is one shard)."""
    fs, _ = filesystem_for(scores_uri)
    groups = shards(table_files(scores_uri))
    if not groups:
        return keys["_row"].combine_chunks(), []
    success_fs, success_path = filesystem_for(success_uri)
    finished = success_fs.get_file_info(success_path).type == pafs.FileType.File
    if len(groups) == 1 and not is_bucketed(groups[0][0]):
        shard_of = {0: groups[0]}
        buckets = np.zeros(len(keys), np.int8)
    else:
        shard_of = {file_bucket(g[0]): g for g in groups}
        buckets = bucket_of(keys["image_uri"])
    found, compact = [], set()
    for bucket in np.unique(buckets):
        in_bucket = buckets == bucket
        files = shard_of.get(int(bucket))
        if files is None:  # no row of this bucket in the table yet
            found.append(keys["_row"].combine_chunks().filter(pa.array(in_bucket)))
            continue
        dataset = pads.dataset(files, filesystem=fs, format="parquet", schema=INDEX_SCHEMA)
        index = dataset.to_table(columns=[*SETTLE_COLUMNS, "__fragment_index"])
        todo = [keys.take(pa.array(np.flatnonzero(in_bucket & (model_of == -1)), pa.int64()))]
        for i, (version, threshold) in enumerate(models):
            mine = np.flatnonzero(in_bucket & (model_of == i))
            if len(mine):
                done = index.filter(settles(index, version, threshold)).select(["image_uri", "input_version"])
                todo.append(_not_settled(keys.take(pa.array(mine, pa.int64())), done))
        todo = pa.concat_tables(todo)
        found.append(todo["_row"].combine_chunks())
        if finished and len(todo):
            held = pc.is_in(index["image_uri"], value_set=todo["image_uri"].combine_chunks())
            compact.update(dataset.files[i] for i in pc.unique(index["__fragment_index"].filter(held)).to_pylist())
        del index, todo
    rows = pa.concat_arrays(found) if found else keys["_row"].combine_chunks()  # no inputs listed
    return rows.take(pc.sort_indices(rows)), sorted(compact) if finished else None


SETTLE_COLUMNS = ["image_uri", "input_version", "model_version", "status", "threshold", "error_kind"]


def settles(index: pa.Table, version: str, threshold: float) -> pa.ChunkedArray:
    """Which rows of the table (SETTLE_COLUMNS) settle their input for the model version
    `version` scoring at `threshold` (plan_run): its ok rows scored with that threshold, and
    its error rows of kind "input" (the file itself is bad)."""
    ok = pc.and_(pc.equal(index["status"], "ok"), pc.equal(index["threshold"], threshold))
    settled = pc.or_kleene(ok, pc.equal(index["error_kind"], INPUT_ERROR))
    return pc.fill_null(pc.and_(pc.equal(index["model_version"], version), settled), False)


def _not_settled(inputs: pa.Table, done: pa.Table) -> pa.Table:
    """The rows of `inputs` that no row of `done` (the settling rows of their model version)
    settles, by two left anti-joins: on (image_uri, input_version), and on image_uri against
    the rows without input_version (written before it existed: they settle any content)."""
    keys = ["image_uri", "input_version"]
    pending = inputs.join(done, keys=keys, join_type="left anti", use_threads=False) if len(done) else inputs
    any_version = done.filter(pc.is_null(done["input_version"])).select(["image_uri"])
    if len(any_version) and len(pending):
        pending = pending.join(any_version, keys=["image_uri"], join_type="left anti", use_threads=False)
    return pending
