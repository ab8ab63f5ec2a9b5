"""Batch scoring on Ray Data: images in, a Parquet score table and anomaly maps out.

    list inputs (driver) -> read + decode + resize (CPU tasks) -> STFPM forward (actor pool,
    one model load per actor, GPU if asked) -> encode + write maps (CPU tasks) -> table files

Decoding is the expensive part at scale (DESIGN §10), so it runs in CPU tasks that Ray can
place on CPU-only nodes; only uint8 model-size images reach the actors. A JPEG at least
twice the model's input is decoded at 1/2, 1/4 or 1/8 scale. Everything streams: each
stage holds a few batches, whatever the number of images.

Output under OUTPUT (local folder or s3://bucket/prefix):
    scores/part-<hash>.parquet   the score table, TABLE_DOC below
    maps/<model_version>/<image_id>.png       8-bit anomaly map at the input's size
    overlays/<model_version>/<image_id>.png   (--overlays) heatmap over anomalous inputs
    _SUCCESS                     JSON with counts, timings, stage throughput, models;
                                 written last, deleted when a run starts

Map scaling: pixel = round(255 * s), s = clip((raw - threshold) / (score_max - score_min)
+ 0.5, 0, 1) per pixel, the same normalisation as the `score` column; so pixel / 255 is
the normalised score, pixel >= 128 is at or above the threshold, and inside the unclipped
range raw = threshold + (pixel / 255 - 0.5) * (score_max - score_min) (`map_to_raw`).
score_min and score_max of each model are in model.json and in _SUCCESS.

Exactly once: every listed input yields one row (unreadable, corrupt, truncated, empty,
oversized and unsupported files yield status="error" rows naming the reason). A run first
reads the existing table and skips inputs that already have an ok row for the same model
version; error rows are retried. Table files are written whole (temp file + rename, or one
S3 PUT) and named by a hash of their rows, maps at deterministic keys before their rows, so
a killed run leaves only complete rows, and a re-run writes what is missing. Before
_SUCCESS, rows superseded by a retry are removed, so the table holds one row per
(image_uri, model_version).
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from stfpm.data.images import IMAGE_EXTENSIONS, decode_image, resize_for_model, sniff_image
from stfpm.distributed.sources import (CATEGORY, ModelRef, image_id, is_registry, join_uri, list_inputs,
                                       resolve_models)
from stfpm.storage import filesystem_for, is_s3, write_bytes

warnings.filterwarnings("ignore", message="No ccache found")  # Paddle's import-time noise, in every worker

SCORES, MAPS, OVERLAYS, SUCCESS = "scores", "maps", "overlays", "_SUCCESS"
ROWS_PER_FILE = 4096
DECODE_BATCHES_PER_WORKER = 256
MAX_BYTES = 256 << 20

TABLE_DOC = """\
column         type                 meaning
image_id       string               sha256(image_uri)[:32]; the maps' file name
image_uri      string               the input (s3://bucket/key or an absolute local path)
<partitions>   string               one per --partitions name (null where a file has no such level)
model_name     string               registry category, or the model directory's name
model_version  string               model.json's model_version (a hash of the weights)
raw_score      double               max of the anomaly map (null on error)
score          double               normalised: clip((raw - thr) / (max - min) + 0.5, 0, 1); 0.5 at the threshold
is_anomaly     bool                 raw_score >= threshold
threshold      double               the threshold used (stored or overridden)
width, height  int32                the input's size in pixels (from the header on error rows, if known)
map_uri        string               8-bit PNG anomaly map at width x height (see map scaling)
overlay_uri    string               overlay PNG (--overlays, anomalous inputs only)
status         string               "ok" or "error"
error          string               why the row failed ("read: ...", "decode: ...", "model: ..."),
                                    or on an ok row why its overlay is missing ("overlay: ...")
device         string               where the forward ran: "cpu", "gpu:N", with the GPU Ray assigned
run_id         string               the run that wrote the row
scored_at      timestamp[us, UTC]   when the row was written"""


def table_schema(partitions: list[str]) -> pa.Schema:
    head = [("image_id", pa.string()), ("image_uri", pa.string())]
    tail = [("model_name", pa.string()), ("model_version", pa.string()), ("raw_score", pa.float64()),
            ("score", pa.float64()), ("is_anomaly", pa.bool_()), ("threshold", pa.float64()),
            ("width", pa.int32()), ("height", pa.int32()), ("map_uri", pa.string()),
            ("overlay_uri", pa.string()), ("status", pa.string()), ("error", pa.string()),
            ("device", pa.string()), ("run_id", pa.string()), ("scored_at", pa.timestamp("us", tz="UTC"))]
    return pa.schema(head + [(p, pa.string()) for p in partitions] + tail)


def map_to_raw(pixels: np.ndarray, threshold: float, score_min: float, score_max: float) -> np.ndarray:
    """Map PNG pixels back to raw anomaly scores (exact inside the unclipped range, +-0.5/255)."""
    return threshold + (pixels.astype(np.float64) / 255.0 - 0.5) * (score_max - score_min)


# ---------------------------------------------------------------------------- batch helpers

def _set(batch: pa.Table, **columns) -> pa.Table:
    """Add or replace columns; values are (list, arrow type) pairs so every block has the
    same schema whatever its values (an all-null column must not become type null)."""
    for name, (values, kind) in columns.items():
        array = pa.array(values, kind)
        if name in batch.column_names:
            batch = batch.set_column(batch.column_names.index(name), name, array)
        else:
            batch = batch.append_column(name, array)
    return batch


def _drop(batch: pa.Table, *names: str) -> pa.Table:
    return batch.drop_columns([n for n in names if n in batch.column_names])


def _input_fs(uri: str, cache: dict) -> tuple[pafs.FileSystem, str]:
    """filesystem_for, keeping one S3FileSystem per batch (making one costs milliseconds)."""
    if not is_s3(uri):
        return filesystem_for(uri)
    if "s3" not in cache:
        cache["s3"] = filesystem_for(uri)[0]
    return cache["s3"], uri[len("s3://"):]


def _read(uri: str, max_bytes: int, cache: dict) -> bytes:
    fs, path = _input_fs(uri, cache)
    with fs.open_input_file(path) as f:
        size = f.size()
        if size > max_bytes:
            raise ValueError(f"file is {size:,} bytes, above max_bytes={max_bytes:,}")
        return f.read()


def _full_size(data: bytes, image: np.ndarray) -> tuple[int, int]:
    """(h, w) of the full-resolution image: a JPEG decoded at reduced scale is smaller than
    its header says, and possibly turned by its EXIF orientation."""
    h, w = image.shape[:2]
    header = sniff_image(data)
    if header.format != "jpeg" or {h, w} == {header.width, header.height}:
        return h, w
    turned = abs(h * header.width - w * header.height) > abs(h * header.height - w * header.width)
    return (header.width, header.height) if turned else (header.height, header.width)


def _header_size(data: bytes | None) -> tuple[int | None, int | None]:
    """(h, w) an undecodable file's header claims, where plausible (it fits the int32 columns)."""
    header = sniff_image(data) if data else None
    plausible = lambda v: v if isinstance(v, int) and 0 < v < 2**31 else None  # noqa: E731
    return (plausible(header.height), plausible(header.width)) if header else (None, None)


# ------------------------------------------------------------------------ stage 1: CPU tasks

def load_images(batch: pa.Table, max_pixels: int, max_bytes: int) -> pa.Table:
    """Read, decode and resize each row's image to its model's input (`_size`). A file that
    cannot be read or decoded makes its row an error row; no file can fail the batch."""
    status, errors, heights, widths, images = [], [], [], [], []
    t_read = t_decode = 0.0
    cache: dict = {}
    for row in batch.select(["image_uri", "status", "error", "_size"]).to_pylist():
        height = width = image = None
        error = row["error"]
        if row["status"] != "error":
            data = None
            t0 = time.perf_counter()
            try:
                data = _read(row["image_uri"], max_bytes, cache)
            except (OSError, ValueError) as e:  # missing, unreadable, too big: this row's error
                error = f"read: {e}"
            t1 = time.perf_counter()
            if data is not None:
                try:
                    decoded = decode_image(data, row["image_uri"], max_pixels, min_side=row["_size"])
                    height, width = _full_size(data, decoded)
                    image = resize_for_model(decoded, row["_size"]).tobytes()
                except (ValueError, cv2.error, MemoryError) as e:  # ImageDecodeError is a ValueError;
                    # anything else is a bug in this code and fails the task loudly
                    error = f"decode: {getattr(e, 'reason', None) or f'{type(e).__name__}: {e}'}"
                    height, width = _header_size(data)
            t_read += t1 - t0
            t_decode += time.perf_counter() - t1
        status.append("error" if error else "ok")
        errors.append(error)
        heights.append(height)
        widths.append(width)
        images.append(image)
    n = max(len(batch), 1)
    return _set(batch, status=(status, pa.string()), error=(errors, pa.string()),
                height=(heights, pa.int32()), width=(widths, pa.int32()), _image=(images, pa.binary()),
                _t_read=([t_read / n] * len(batch), pa.float64()),
                _t_decode=([t_decode / n] * len(batch), pa.float64()))


# ---------------------------------------------------------------------- stage 2: actor pool

def paddle_device(gpu_ids: list, cuda_visible: str | None, compiled_with_cuda: bool) -> tuple[str, str]:
    """(Paddle device, description) for the GPUs Ray assigned to this process.

    Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs, so the device index is the assigned
    id's position in that list (0 for one GPU), never a hard-coded gpu:0. Without CUDA in
    Paddle (fake GPUs in tests, a CPU wheel) the forward runs on the CPU and the
    description still records what Ray assigned."""
    if not gpu_ids:
        return "cpu", "cpu"
    assigned = str(gpu_ids[0])
    visible = [d.strip() for d in cuda_visible.split(",")] if cuda_visible else []
    index = visible.index(assigned) if assigned in visible else int(assigned)
    if not compiled_with_cuda:
        return "cpu", f"cpu (ray gpu {assigned} assigned; paddle built without CUDA)"
    return f"gpu:{index}", f"gpu:{index} (ray gpu {assigned})"


class ScoreActor:
    """Runs the STFPM predictor. Each actor loads each model it needs once (fetching an
    s3:// model directory to a local cache itself), on the device Ray assigned it."""

    def __init__(self, models: dict[str, str], threshold: float | None, cache_dir: str):
        import paddle

        from stfpm.inference import Predictor

        self._open = Predictor.open
        self.models, self.threshold, self.cache_dir = models, threshold, cache_dir
        self.predictors: dict[str, object] = {}
        self.failed: dict[str, str] = {}
        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
        device, self.device = paddle_device(gpu_ids, os.environ.get("CUDA_VISIBLE_DEVICES"),
                                            paddle.is_compiled_with_cuda())
        paddle.set_device(device)

    def _predictor(self, key: str):
        if key not in self.predictors and key not in self.failed:
            from stfpm.storage import fetch_to_cache

            try:
                local = fetch_to_cache(self.models[key], self.cache_dir)
                self.predictors[key] = self._open(local, self.threshold)
            except Exception as e:  # noqa: BLE001 - a broken model fails its rows, not the job
                self.failed[key] = f"model: {self.models[key]} could not be loaded: {e}"
        return self.predictors.get(key)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from stfpm.inference import normalize_score

        t0 = time.perf_counter()
        n = len(batch)
        status, errors = batch["status"].to_pylist(), batch["error"].to_pylist()
        versions = batch["model_version"].to_pylist()
        raw, norm, anomalous, thresholds, maps = [None] * n, [None] * n, [None] * n, [None] * n, [None] * n
        keys, images = batch["_model_key"].to_pylist(), batch["_image"].to_pylist()
        for key in sorted({k for k, s in zip(keys, status) if s == "ok"}):
            rows = [i for i in range(n) if keys[i] == key and status[i] == "ok"]
            predictor = self._predictor(key)
            if predictor is None:
                for i in rows:
                    status[i], errors[i] = "error", self.failed[key]
                continue
            size = predictor.size
            stack = np.stack([np.frombuffer(images[i], np.uint8).reshape(size, size, 3) for i in rows])
            for i, p in zip(rows, predictor.predict_resized(stack, [(size, size)] * len(rows))):
                heat = normalize_score(p.anomaly_map, p.threshold, predictor.score_min, predictor.score_max)
                raw[i], norm[i], anomalous[i], thresholds[i] = p.score, p.norm_score, p.is_anomaly, p.threshold
                maps[i] = np.rint(heat * 255).astype(np.uint8).tobytes()
                versions[i] = predictor.model_version
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        per_row = (time.perf_counter() - t0) / max(n, 1)
        batch = _drop(batch, "_image")
        return _set(batch, status=(status, pa.string()), error=(errors, pa.string()),
                    model_version=(versions, pa.string()), raw_score=(raw, pa.float64()),
                    score=(norm, pa.float64()), is_anomaly=(anomalous, pa.bool_()),
                    threshold=(thresholds, pa.float64()), device=([self.device] * n, pa.string()),
                    _map=(maps, pa.binary()), _t_predict=([per_row] * n, pa.float64()),
                    _actor_rss_mb=([rss_mb] * n, pa.float64()))


# ------------------------------------------------------------------------ stage 3: CPU tasks

def write_maps(batch: pa.Table, output: str, overlays: bool, score_ranges: dict[str, tuple[float, float]],
               max_pixels: int, max_bytes: int) -> pa.Table:
    """Resize each ok row's 8-bit map to the input's size, PNG-encode it and write it to its
    deterministic key (a re-run overwrites it with the same content). With `overlays`,
    anomalous inputs also get the heatmap over the image."""
    t0 = time.perf_counter()
    n = len(batch)
    map_uris, overlay_uris = [None] * n, [None] * n
    errors = batch["error"].to_pylist()
    cache: dict = {}
    rows = batch.select(["image_id", "image_uri", "status", "model_version", "width", "height", "_size", "_map",
                         "_model_key", "is_anomaly", "threshold", "raw_score", "score"]).to_pylist()
    for i, row in enumerate(rows):
        if row["status"] != "ok":
            continue
        s, h, w = row["_size"], row["height"], row["width"]
        heat = np.frombuffer(row["_map"], np.uint8).reshape(s, s)
        if (h, w) != (s, s):
            heat = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
        key = f"{row['model_version']}/{row['image_id']}.png"
        map_uris[i] = join_uri(output, MAPS, key)
        write_bytes(map_uris[i], _png(heat))
        if overlays and row["is_anomaly"]:
            try:
                image = decode_image(_read(row["image_uri"], max_bytes, cache), row["image_uri"], max_pixels)
                overlay_uris[i] = join_uri(output, OVERLAYS, key)
                write_bytes(overlay_uris[i], _png(_overlay(image, heat, row, *score_ranges[row["_model_key"]])))
            except Exception as e:  # noqa: BLE001 - the score stands; the optional picture failed
                overlay_uris[i], errors[i] = None, f"overlay: {e}"
    per_row = (time.perf_counter() - t0) / max(n, 1)
    return _set(_drop(batch, "_map"), map_uri=(map_uris, pa.string()), overlay_uri=(overlay_uris, pa.string()),
                error=(errors, pa.string()), _t_maps=([per_row] * n, pa.float64()))


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def _overlay(image: np.ndarray, heat: np.ndarray, row: dict, score_min: float, score_max: float) -> np.ndarray:
    """results.overlay on a Prediction rebuilt from the 8-bit map (same picture as `predict`)."""
    from stfpm.inference import Prediction
    from stfpm.results import overlay

    raw_map = map_to_raw(heat, row["threshold"], score_min, score_max).astype(np.float32)
    prediction = Prediction(score=row["raw_score"], norm_score=row["score"], is_anomaly=row["is_anomaly"],
                            threshold=row["threshold"], anomaly_map=raw_map,
                            pred=np.where(heat >= 128, 255, 0).astype(np.uint8))
    return overlay(image, prediction, score_min, score_max)


# ------------------------------------------------------------------------ stage 4: the table

STAGES = ("read", "decode", "predict", "maps", "table")


class ScoreTableSink(Datasink):
    """Writes each bundle of rows as one Parquet file named by a hash of its rows (so a
    retried task rewrites the same file) and returns per-bundle counts and stage times,
    summed on the driver into `self.totals`."""

    def __init__(self, scores_uri: str, run_id: str, schema: pa.Schema, rows_per_file: int = ROWS_PER_FILE):
        self.scores_uri, self.run_id, self.schema, self.rows_per_file = scores_uri, run_id, schema, rows_per_file
        self.totals: dict = {}

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks, ctx) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if len(t)]
        return write_table_file(pa.concat_tables(tables), self.scores_uri, self.run_id, self.schema) if tables else {}

    def on_write_complete(self, write_result) -> None:
        self.totals = merge_stats(write_result.write_returns)


def write_table_file(batch: pa.Table, scores_uri: str, run_id: str, schema: pa.Schema) -> dict:
    """One Parquet file of table rows from pipeline rows; returns the rows' stats."""
    t0 = time.perf_counter()
    n = len(batch)
    now = datetime.now(timezone.utc)
    batch = _set(batch, run_id=([run_id] * n, pa.string()), scored_at=([now] * n, pa.timestamp("us", tz="UTC")))
    table = pa.table([batch[f.name].cast(f.type) for f in schema], schema=schema)
    keys = sorted(zip(table["image_id"].to_pylist(), table["model_version"].to_pylist()))
    name = "part-" + hashlib.sha256(repr(keys).encode()).hexdigest()[:24] + ".parquet"
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(join_uri(scores_uri, name), sink.getvalue().to_pybytes())
    status = table["status"].to_pylist()
    stats = {"rows": n, "ok": status.count("ok"), "error": status.count("error"),
             "anomalous": sum(bool(a) for a in table["is_anomaly"].to_pylist()), "files": 1,
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
    total = {"rows": 0, "ok": 0, "error": 0, "anomalous": 0, "files": 0, "seconds": {s: 0.0 for s in STAGES},
             "actor_peak_rss_mb": 0.0, "devices": [], "error_examples": []}
    for part in parts:
        if not part:
            continue
        for k in ("rows", "ok", "error", "anomalous", "files"):
            total[k] += part[k]
        for s, v in part["seconds"].items():
            total["seconds"][s] += v
        total["actor_peak_rss_mb"] = max(total["actor_peak_rss_mb"], part["actor_peak_rss_mb"])
        total["devices"] = sorted(set(total["devices"]) | set(part["devices"]))
        total["error_examples"] = (total["error_examples"] + part["error_examples"])[:10]
    return total


# ------------------------------------------------------------------- the existing table

def read_index(scores_uri: str) -> pa.Table:
    """(image_uri, model_version, status, scored_at, file) of every row already written;
    files whose names start with "." or "_" (in-progress temp files) are not read."""
    fs, path = filesystem_for(scores_uri)
    columns = ["image_uri", "model_version", "status", "scored_at"]
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return pa.table({c: pa.array([], pa.string()) for c in columns + ["file"]})
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    table = dataset.to_table(columns=columns + ["__filename"])
    return table.rename_columns(columns + ["file"])


def remove_superseded(scores_uri: str) -> tuple[int, list[str]]:
    """Keep one row per (image_uri, model_version): the ok row, else the latest. An error row
    without a model version (unknown category) is superseded by any later row of its input.
    Files holding superseded rows are rewritten without them (idempotent, so a run killed
    here is finished by the next). Returns (rows removed, status of each remaining row)."""
    index = read_index(scores_uri)
    if not len(index):
        return 0, []
    df = index.to_pandas()
    df["version"] = df["model_version"].fillna("")
    df["ok"] = df["status"] == "ok"
    ranked = df.sort_values(["ok", "scored_at", "file"], ascending=False)
    losers = ranked.duplicated(["image_uri", "version"], keep="first")
    latest = df.groupby("image_uri")["scored_at"].transform("max")
    losers = losers.reindex(df.index) | ((df["version"] == "") & (df["scored_at"] < latest))
    if not losers.any():
        return 0, df["status"].tolist()
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
    return int(losers.sum()), df.loc[~losers, "status"].tolist()


# -------------------------------------------------------------------------------- the run

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
             extensions=IMAGE_EXTENSIONS, threshold: float | None = None, run_id: str | None = None) -> Plan:
    """List the inputs, resolve the model(s), and drop inputs already scored ok with the same
    model version in OUTPUT's table."""
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
    inputs = list_inputs(source, partitions, extensions, exclude=output)
    t_list = time.perf_counter() - t0
    done = read_index(join_uri(output, SCORES))
    done = {(u, v) for u, v, s in zip(done["image_uri"].to_pylist(), done["model_version"].to_pylist(),
                                      done["status"].to_pylist()) if s == "ok"}
    uris = inputs["image_uri"].to_pylist()
    categories = inputs[CATEGORY].to_pylist() if registry else [None] * len(uris)
    refs = [models.get(c) for c in categories]
    pending_rows = [i for i, (u, ref) in enumerate(zip(uris, refs)) if ref is None or (u, ref.version) not in done]
    pending = inputs.take(pending_rows)
    refs = [refs[i] for i in pending_rows]
    known = ", ".join(sorted(str(k) for k in models))
    errors = [None if ref else f"model: no model for category {categories[i]!r} in {model} (known: {known})"
              for i, ref in zip(pending_rows, refs)]
    pending = _set(pending,
                   image_id=([image_id(u) for u in pending["image_uri"].to_pylist()], pa.string()),
                   model_name=([ref.name if ref else None for ref in refs], pa.string()),
                   model_version=([ref.version if ref else None for ref in refs], pa.string()),
                   status=(["error" if e else None for e in errors], pa.string()), error=(errors, pa.string()),
                   _model_key=([(ref.name if registry else "") if ref else None for ref in refs], pa.string()),
                   _size=([ref.input_size if ref else 0 for ref in refs], pa.int32()))
    run_id = run_id or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    return Plan(output=output, run_id=run_id, models=models, partitions=partitions, pending=pending,
                n_listed=len(uris), n_skipped=len(uris) - len(pending_rows),
                timings={"list_s": t_list, "plan_s": time.perf_counter() - t0})


def parse_actors(actors: int | str | tuple[int, int]) -> tuple[int, int]:
    """3 -> (3, 3); "1..8" -> (1, 8); (1, 8) -> (1, 8)."""
    if isinstance(actors, str):
        low, _, high = actors.partition("..")
        actors = (int(low), int(high or low))
    elif isinstance(actors, int):
        actors = (actors, actors)
    low, high = actors
    if not 1 <= low <= high:
        raise ValueError(f"actors must be N or MIN..MAX with 1 <= MIN <= MAX, got {low}..{high}")
    return low, high


def check_cpus_left_for_decoding(actors: int, cpus_per_actor: float, cluster_cpus: float) -> None:
    """On a fixed-size (local) Ray, actors that hold every CPU leave none for the read and
    decode tasks, and Ray Data then waits forever without an error (measured): refuse it."""
    if actors * cpus_per_actor >= cluster_cpus:
        raise ValueError(f"{actors} scoring actor(s) x {cpus_per_actor:g} CPU take all {cluster_cpus:g} CPUs of "
                         "this local Ray, leaving none to read and decode images: use fewer actors or a "
                         "smaller cpus_per_actor (--cpus-per-actor), e.g. "
                         f"{max(0.25, (cluster_cpus - 1) / max(actors, 1)):g}")


def score(model: str, source: str, output: str, *, partitions: list[str] | None = None,
          extensions=IMAGE_EXTENSIONS, batch_size: int = 32, actors: int | str | tuple[int, int] = (1, 1),
          gpus_per_actor: float = 0, cpus_per_actor: float = 1, threshold: float | None = None,
          overlays: bool = False, run_id: str | None = None, ray_address: str | None = None,
          max_pixels: int = 100_000_000, max_bytes: int = MAX_BYTES, wait_for_actors_s: float = 600,
          rows_per_file: int = ROWS_PER_FILE, verbose: bool = True) -> dict:
    """Score every image of SOURCE with MODEL on Ray Data and write OUTPUT (module docstring).

    model: a model directory (local or s3://) or a registry YAML (category -> model directory).
    source: a directory, an s3:// prefix, a manifest (.parquet or text, one URI per line) or
        an image. partitions: names for the directory levels under it (e.g. category, line).
    actors: pool size, N or "MIN..MAX" (autoscaling); gpus_per_actor > 0 puts each actor on a
        GPU Ray assigns. Ray is started locally unless it is running or ray_address is given.
    Returns the _SUCCESS summary (counts, timings, per-stage throughput, models)."""
    echo = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    started = time.perf_counter()
    low, high = parse_actors(actors)
    plan = plan_run(model, source, output, partitions, extensions, threshold, run_id)
    _delete(join_uri(plan.output, SUCCESS))
    echo(f"{plan.n_listed} inputs listed in {plan.timings['list_s']:.1f}s; {plan.n_skipped} already scored "
         f"with the same model version; {len(plan.pending)} to score")
    totals, started_ray = merge_stats([]), False
    if len(plan.pending):
        t0 = time.perf_counter()
        if not ray.is_initialized():
            ray.init(address=ray_address, runtime_env=_forwarded_env(), log_to_driver=verbose)
            started_ray = True
        plan.timings["ray_start_s"] = time.perf_counter() - t0
        try:
            if started_ray and ray_address is None:
                check_cpus_left_for_decoding(high, cpus_per_actor, ray.cluster_resources().get("CPU", 0))
            t0 = time.perf_counter()
            ds, sink = build_pipeline(plan, batch_size=batch_size, actors=(low, high), gpus_per_actor=gpus_per_actor,
                                      cpus_per_actor=cpus_per_actor, threshold=threshold, overlays=overlays,
                                      max_pixels=max_pixels, max_bytes=max_bytes, wait_for_actors_s=wait_for_actors_s,
                                      rows_per_file=rows_per_file, progress_bars=verbose)
            ds.write_datasink(sink)
            totals = sink.totals
            plan.timings["pipeline_s"] = time.perf_counter() - t0
        finally:
            if started_ray:
                ray.shutdown()
    t0 = time.perf_counter()
    removed, table_status = remove_superseded(join_uri(plan.output, SCORES))
    plan.timings["compact_s"] = time.perf_counter() - t0
    plan.timings["total_s"] = time.perf_counter() - started
    summary = _summary(plan, totals, removed, table_status)
    write_bytes(join_uri(plan.output, SUCCESS), json.dumps(summary, indent=2).encode())
    echo(format_report(summary))
    return summary


def build_pipeline(plan: Plan, *, batch_size: int = 32, actors: tuple[int, int] = (1, 1), gpus_per_actor: float = 0,
                   cpus_per_actor: float = 1, threshold: float | None = None, overlays: bool = False,
                   max_pixels: int = 100_000_000, max_bytes: int = MAX_BYTES, wait_for_actors_s: float = 600,
                   rows_per_file: int = ROWS_PER_FILE,
                   progress_bars: bool = False) -> tuple[ray.data.Dataset, ScoreTableSink]:
    """The Ray Data pipeline for `plan.pending` up to the maps, and the sink for its rows:
    `ds.write_datasink(sink)` runs it; `sink.totals` then holds the counts and stage times."""
    pending = plan.pending
    ds = ray.data.from_arrow([pending.slice(i, batch_size) for i in range(0, len(pending), batch_size)])
    ds.context.wait_for_min_actors_s = wait_for_actors_s
    ds.context.enable_progress_bars = progress_bars
    models = {("" if key is None else key): ref.uri for key, ref in plan.models.items()}
    ranges = {("" if key is None else key): (ref.score_min, ref.score_max) for key, ref in plan.models.items()}
    # max_calls: a decoding worker is replaced after that many batches, so heap fragmentation
    # from images of every size cannot build up. Being a remote argument the actors lack, it
    # also keeps Ray Data from fusing decoding into the actors: decoding stays in CPU tasks
    # that any node can run, and the stage report can tell it apart (DESIGN §10).
    ds = ds.map_batches(load_images, batch_format="pyarrow", batch_size=None, num_cpus=1,
                        max_calls=DECODE_BATCHES_PER_WORKER,
                        fn_kwargs={"max_pixels": max_pixels, "max_bytes": max_bytes})
    ds = ds.map_batches(ScoreActor, batch_format="pyarrow", batch_size=batch_size,
                        compute=ray.data.ActorPoolStrategy(min_size=actors[0], max_size=actors[1]),
                        num_gpus=gpus_per_actor, num_cpus=cpus_per_actor,
                        fn_constructor_kwargs={"models": models, "threshold": threshold,
                                               "cache_dir": os.path.join(tempfile.gettempdir(), "stfpm-models")})
    ds = ds.map_batches(write_maps, batch_format="pyarrow", batch_size=None, num_cpus=1,
                        fn_kwargs={"output": plan.output, "overlays": overlays, "score_ranges": ranges,
                                   "max_pixels": max_pixels, "max_bytes": max_bytes})
    return ds, ScoreTableSink(join_uri(plan.output, SCORES), plan.run_id, plan.schema, rows_per_file)


def _forwarded_env() -> dict | None:
    """S3 endpoint and region (never credentials) for workers on a cluster the driver joins."""
    names = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
    env = {n: os.environ[n] for n in names if os.environ.get(n)}
    return {"env_vars": env} if env else None


def _delete(uri: str) -> None:
    fs, path = filesystem_for(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def _summary(plan: Plan, totals: dict, removed: int, status: list[str]) -> dict:
    rows = totals["rows"]
    wall = plan.timings.get("pipeline_s")
    stages = {s: {"busy_s": round(t, 3), "images_per_busy_s": round(rows / t, 1) if t > 0 else None}
              for s, t in totals["seconds"].items()}
    return {
        "run_id": plan.run_id, "finished_at": datetime.now(timezone.utc).isoformat(),
        "output": {"root": plan.output, "scores": join_uri(plan.output, SCORES), "maps": join_uri(plan.output, MAPS)},
        "models": {str(k or ref.name): {"uri": ref.uri, "model_version": ref.version, "threshold": ref.threshold,
                                        "score_min": ref.score_min, "score_max": ref.score_max,
                                        "input_size": ref.input_size} for k, ref in plan.models.items()},
        "counts": {"listed": plan.n_listed, "skipped_already_scored": plan.n_skipped, "scored": rows,
                   "ok": totals["ok"], "error": totals["error"], "anomalous": totals["anomalous"],
                   "superseded_rows_removed": removed, "files_written": totals["files"],
                   "table_rows": len(status), "table_ok": status.count("ok"), "table_error": status.count("error")},
        "timings_s": {k: round(v, 3) for k, v in plan.timings.items()},
        "images_per_s": round(rows / wall, 2) if wall else None,
        "stages": stages, "actor_peak_rss_mb": round(totals["actor_peak_rss_mb"], 1),
        "devices": totals["devices"], "error_examples": totals["error_examples"],
        "map_scaling": "pixel = round(255 * clip((raw - threshold) / (score_max - score_min) + 0.5, 0, 1))",
    }


def format_report(summary: dict) -> str:
    c, t = summary["counts"], summary["timings_s"]
    lines = [f"run {summary['run_id']}: {c['scored']} scored ({c['ok']} ok, {c['error']} errors, "
             f"{c['anomalous']} anomalous), {c['skipped_already_scored']} skipped as already scored",
             f"  ray start {t.get('ray_start_s', 0):.1f}s, pipeline {t.get('pipeline_s', 0):.1f}s "
             f"({summary['images_per_s'] or 0} images/s), total {t['total_s']:.1f}s",
             "  stage      busy s   images per busy second (one task or actor)"]
    for stage, s in summary["stages"].items():
        lines.append(f"  {stage:<9}{s['busy_s']:>8.1f}   {s['images_per_busy_s'] or '-'}")
    lines.append(f"  table: {summary['output']['scores']} ({c['table_rows']} rows), maps: {summary['output']['maps']}")
    return "\n".join(lines)
