"""Planning a scoring run on the driver: list the inputs, resolve the models, leave out what OUTPUT already holds."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stfpm.data.images import IMAGE_EXTENSIONS
from stfpm.scoring.sources import CATEGORY, ModelRef, is_registry, list_inputs, resolve_models
from stfpm.scoring.table import INPUT_ERROR, SCORES, TRANSIENT_ERROR, codes, drop_columns, read_index, table_schema
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
    table_files: list[str] = field(default_factory=list)  # files compact_run must look at besides the run's own

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
    reserved = set(table_schema([]).names) | {"size_bytes"}
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
    index = read_index(join_uri(output, SCORES), columns=["image_uri", "input_version", "model_version", "status",
                                                          "error_kind", "threshold"])
    pending = _not_settled(inputs, index, {r.version: r.threshold for r in refs}).sort_by("_row")
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
    table_files = _files_to_compact(index, pending["image_uri"])
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


def _not_settled(inputs: pa.Table, index: pa.Table, thresholds: dict[str, float]) -> pa.Table:
    """The rows of `inputs` that no row of `index` settles (plan_run), by two left anti-joins:
    on (image_uri, input_version, model_version), and on (image_uri, model_version) against
    the rows without input_version. An input without a model (null model_version) is never
    settled: nulls never match in a join."""
    run_threshold = pa.array(list(thresholds.values()), pa.float64()).take(
        pc.index_in(index["model_version"], value_set=pa.array(list(thresholds), pa.string())))
    ok = pc.and_kleene(pc.equal(index["status"], "ok"), pc.equal(index["threshold"], run_threshold))
    settled = pc.fill_null(pc.or_kleene(ok, pc.equal(index["error_kind"], INPUT_ERROR)), False)
    done = index.filter(settled).select(["image_uri", "input_version", "model_version"])
    keys = ["image_uri", "input_version", "model_version"]
    pending = inputs.join(done, keys=keys, join_type="left anti", use_threads=False) if len(done) else inputs
    any_version = done.filter(pc.is_null(done["input_version"])).select(["image_uri", "model_version"])
    if len(any_version) and len(pending):
        pending = pending.join(any_version, keys=["image_uri", "model_version"], join_type="left anti",
                               use_threads=False)
    return pending


def _files_to_compact(index: pa.Table, pending_uris: pa.ChunkedArray) -> list[str]:
    """The table files compaction must look at besides the run's own (sink.remove_superseded):
    those holding a row of an input this run scores, and those left with superseded rows by a
    run killed before its compaction (an input with two rows of one model version, or a row
    without a model version beside others)."""
    if not len(index):
        return []
    touched = pc.is_in(index["image_uri"], value_set=pending_uris.combine_chunks())
    uri = codes(index["image_uri"])
    version = codes(index["model_version"])
    _, group, count = np.unique(uri * (int(version.max(initial=0)) + 1) + version, return_inverse=True,
                                return_counts=True)
    per_uri = np.bincount(uri)
    stale = (count[group] > 1) | (index["model_version"].is_null().to_numpy(zero_copy_only=False) & (per_uri[uri] > 1))
    files = index["file"].filter(pc.or_(touched, pa.array(stale)))
    return sorted(pc.unique(files.cast(pa.string())).to_pylist())
