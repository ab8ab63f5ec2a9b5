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
from stfpm.scoring.table import BUCKET, INDEX_SCHEMA, INPUT_ERROR, SCORES, SUCCESS, TRANSIENT_ERROR, drop_columns, table_schema
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
             allow_roots: list[str] | None = None) -> Plan:
    """List the inputs, resolve the model(s) (checking their weights), and leave out what
    OUTPUT's table already settles for the same content and model version: an ok row
    scored with the threshold this run uses, or an error row of kind "input" (the file
    itself is bad). Transient errors are retried. A row without input_version (written
    before it existed) settles any content, so an upgrade does not rescore a whole table.
    All of it in Arrow (anti-joins on image_uri, input_version, model_version): no Python
    object per input."""
    t0 = time.perf_counter()
    output = output.rstrip("/") if is_s3(output) else filesystem_for(output)[1]  # URIs in the table are absolute
    models = resolve_models(model, threshold)
    registry = is_registry(model)
    partitions = list(partitions) if partitions is not None else ([CATEGORY] if registry else [])
    if registry and CATEGORY not in partitions:
        raise ValueError(f"a model registry picks the model by the {CATEGORY!r} column; "
                         f"name a directory level {CATEGORY!r} in partitions (got {partitions})")
    reserved = set(table_schema([]).names) | {"size_bytes", BUCKET}
    if clash := reserved.intersection(partitions):
        raise ValueError(f"partition names {sorted(clash)} are table columns; choose other names")
    inputs = list_inputs(source, partitions, extensions, exclude=output, allow_roots=allow_roots)
    t_list = time.perf_counter() - t0
    n = len(inputs)
    refs = list(models.values())
    if registry:  # each input's model by its category; null where the registry has none
        which = pc.index_in(inputs[CATEGORY], value_set=pa.array(list(models), pa.string()))
    else:
        which = pa.array(np.zeros(n, np.int32))
    per_input = lambda values, kind: pa.array(values, kind).take(which)  # noqa: E731
    inputs = inputs.append_column("model_version", per_input([r.version for r in refs], pa.string()))
    inputs = inputs.append_column("_row", pa.array(np.arange(n), pa.int64()))
    scores = join_uri(output, SCORES)
    done = settled(scores, {r.version: r.threshold for r in refs})
    keys = inputs.select(["image_uri", "input_version", "model_version", "_row"])
    rows = _not_settled(keys, done)["_row"].combine_chunks()
    pending = inputs.take(rows.take(pc.sort_indices(rows)))  # in image_uri order, as listed
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
    table_files = _files_to_compact(scores, join_uri(output, SUCCESS), pending["image_uri"])
    pending = drop_columns(pending, "_input_error", "_row", "model_version")
    columns = {"model_name": per_input([r.name for r in refs], pa.string()),
               "model_version": per_input([r.version for r in refs], pa.string()),
               "status": pc.if_else(pc.is_valid(errors), "error", pa.scalar(None, pa.string())),
               "error": errors, "error_kind": kinds,
               "_model_key": per_input([r.name if registry else "" for r in refs], pa.string()),
               "_size": per_input([r.input_size for r in refs], pa.int32()).fill_null(0),
               "_tile": per_input([r.tile_size for r in refs], pa.int32()),
               "_tile_overlap": per_input([r.tile_overlap for r in refs], pa.int32()).fill_null(0)}
    for name, values in columns.items():
        pending = pending.append_column(pa.field(name, values.type), values)
    run_id = run_id or new_run_id()
    return Plan(output=output, run_id=run_id, models=models, partitions=partitions, pending=pending,
                n_listed=n, n_skipped=n - len(pending), table_files=table_files,
                timings={"list_s": t_list, "plan_s": time.perf_counter() - t0})


def settled(scores_uri: str, thresholds: dict[str, float]) -> pa.Table:
    """(image_uri, input_version, model_version) of the rows of the table that settle their
    input (plan_run): ok rows scored with the threshold this run uses for their model
    version, and error rows of kind "input". The filter runs in the scan: only these rows'
    three columns are held."""
    empty = pa.table({c: pa.array([], pa.string()) for c in ("image_uri", "input_version", "model_version")})
    fs, path = filesystem_for(scores_uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return empty
    version, threshold = pads.field("model_version"), pads.field("threshold")
    same = None
    for v, t in thresholds.items():
        term = (version == v) & (threshold == t)
        same = term if same is None else same | term
    ok = pads.field("status") == "ok"
    settles = (ok & same if same is not None else pads.scalar(False)) | (pads.field("error_kind") == INPUT_ERROR)
    dataset = pads.dataset(path, filesystem=fs, format="parquet", schema=INDEX_SCHEMA)
    return dataset.to_table(columns=empty.column_names, filter=settles)


def _not_settled(inputs: pa.Table, done: pa.Table) -> pa.Table:
    """The rows of `inputs` that no row of `done` (settled) settles, by two left anti-joins:
    on (image_uri, input_version, model_version), and on (image_uri, model_version) against
    the rows without input_version (written before it existed: they settle any content). An
    input without a model (null model_version) is never settled: nulls never match in a join."""
    keys = ["image_uri", "input_version", "model_version"]
    pending = inputs.join(done, keys=keys, join_type="left anti", use_threads=False) if len(done) else inputs
    any_version = done.filter(pc.is_null(done["input_version"])).select(["image_uri", "model_version"])
    if len(any_version) and len(pending):
        pending = pending.join(any_version, keys=["image_uri", "model_version"], join_type="left anti",
                               use_threads=False)
    return pending


def _files_to_compact(scores_uri: str, success_uri: str, pending_uris: pa.ChunkedArray) -> list[str] | None:
    """The table files the end of the run must compact besides its own (sink.remove_superseded):
    those holding a row of an input this run scores. None (the whole table) when the last run
    did not finish (no _SUCCESS: it is deleted when a run starts, written when it ends), as it
    may have left superseded rows anywhere."""
    fs, path = filesystem_for(scores_uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    if filesystem_for(success_uri)[0].get_file_info(filesystem_for(success_uri)[1]).type != pafs.FileType.File:
        return None
    if not len(pending_uris):
        return []
    dataset = pads.dataset(path, filesystem=fs, format="parquet", schema=INDEX_SCHEMA)
    found = dataset.to_table(columns=["__fragment_index"],
                             filter=pads.field("image_uri").isin(pending_uris.combine_chunks()))
    return sorted(dataset.files[i] for i in pc.unique(found["__fragment_index"]).to_pylist())
