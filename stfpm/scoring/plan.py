"""Planning a scoring run on the driver: list the inputs, resolve the models, leave out what OUTPUT already holds."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa

from stfpm.data.images import IMAGE_EXTENSIONS
from stfpm.scoring.sources import CATEGORY, ModelRef, image_id, is_registry, list_inputs, resolve_models
from stfpm.scoring.table import (INPUT_ERROR, SCORES, TRANSIENT_ERROR, drop_columns, read_index, set_columns,
                                    table_schema)
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
    pending: pa.Table          # one row per input to score, in the pipeline's row format
    n_listed: int
    n_skipped: int
    timings: dict = field(default_factory=dict)

    @property
    def schema(self) -> pa.Schema:
        return table_schema(self.partitions)


def plan_run(model: str, source: str, output: str, partitions: list[str] | None = None,
             extensions=IMAGE_EXTENSIONS, threshold: float | None = None, run_id: str | None = None,
             allow_roots: list[str] | None = None) -> Plan:
    """List the inputs, resolve the model(s) (checking their weights), and leave out what
    OUTPUT's table already settles for the same content and model version: an ok row, or
    an error row of kind "input" (the file itself is bad). Transient errors are retried.
    A row without input_version (written before it existed) settles any content, so an
    upgrade does not rescore a whole table."""
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
    index = read_index(join_uri(output, SCORES))
    done = {(u, iv, v) for u, iv, v, s, k in zip(*(index[c].to_pylist() for c in (
        "image_uri", "input_version", "model_version", "status", "error_kind")))
        if s == "ok" or k == INPUT_ERROR}
    uris, input_versions = inputs["image_uri"].to_pylist(), inputs["input_version"].to_pylist()
    categories = inputs[CATEGORY].to_pylist() if registry else [None] * len(uris)
    refs = [models.get(c) for c in categories]
    pending_rows = [i for i, (u, iv, ref) in enumerate(zip(uris, input_versions, refs))  # rows written before
                    if ref is None or not {(u, iv, ref.version), (u, None, ref.version)} & done]  # input_version: any
    pending = inputs.take(pa.array(pending_rows, pa.int64()))
    refs = [refs[i] for i in pending_rows]
    known = ", ".join(sorted(str(k) for k in models))
    refused = pending["_input_error"].to_pylist()
    errors = [r or (None if ref else f"model: no model for category {categories[i]!r} in {model} (known: {known})")
              for i, ref, r in zip(pending_rows, refs, refused)]
    kinds = [INPUT_ERROR if r else (None if ref else TRANSIENT_ERROR) for ref, r in zip(refs, refused)]
    pending = set_columns(drop_columns(pending, "_input_error"),
                          image_id=([image_id(u) for u in pending["image_uri"].to_pylist()], pa.string()),
                          model_name=([ref.name if ref else None for ref in refs], pa.string()),
                          model_version=([ref.version if ref else None for ref in refs], pa.string()),
                          status=(["error" if e else None for e in errors], pa.string()),
                          error=(errors, pa.string()), error_kind=(kinds, pa.string()),
                          _model_key=([(ref.name if registry else "") if ref else None for ref in refs],
                                      pa.string()),
                          _size=([ref.input_size if ref else 0 for ref in refs], pa.int32()),
                          _tile=([ref.tile_size if ref else None for ref in refs], pa.int32()),
                          _tile_overlap=([ref.tile_overlap if ref else 0 for ref in refs], pa.int32()))
    run_id = run_id or new_run_id()
    return Plan(output=output, run_id=run_id, models=models, partitions=partitions, pending=pending,
                n_listed=len(uris), n_skipped=len(uris) - len(pending_rows),
                timings={"list_s": t_list, "plan_s": time.perf_counter() - t0})
