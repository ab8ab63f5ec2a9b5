"""The per-batch stages of Ray Data scoring: read + decode (CPU tasks), the forward (actor), maps (CPU tasks).

Each takes and returns a pyarrow batch of pipeline rows (table columns plus "_" columns the
next stage needs). A file that cannot be read or decoded, or a model that cannot be loaded,
makes its rows error rows; no input can fail a batch.
"""
from __future__ import annotations

import errno
import os
import resource
import stat
import time

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from stfpm.data.images import decode_image, resize_for_model, sniff_image
from stfpm.distributed.table import (INPUT_ERROR, MAPS, OVERLAYS, TRANSIENT_ERROR, drop_columns, map_to_raw,
                                    set_columns)
from stfpm.storage import filesystem_for, is_http, is_s3, join_uri, write_bytes

MAX_BYTES = 256 << 20


def _input_fs(uri: str, cache: dict) -> tuple[pafs.FileSystem, str]:
    """filesystem_for, keeping one S3FileSystem per batch (making one costs milliseconds)."""
    if not is_s3(uri):
        return filesystem_for(uri)
    if "s3" not in cache:
        cache["s3"] = filesystem_for(uri)[0]
    return cache["s3"], uri[len("s3://"):]


class InputError(ValueError):
    """The input itself cannot be scored (missing, not a regular file, too big, a URL):
    an error row of kind "input", not retried until the file changes. Never quotes content."""


def _read(uri: str, max_bytes: int, cache: dict) -> bytes:
    """The bytes of a local file or S3 object. Nothing but a regular file is ever opened (a
    FIFO would block forever, a device could be endless), and a file above max_bytes is
    refused from its size."""
    if is_http(uri):
        raise InputError("scoring reads local files and s3:// objects, not http(s):// URLs; "
                         "copy the images to a folder or bucket")
    if not is_s3(uri):
        return _read_local(filesystem_for(uri)[1], max_bytes)
    fs, path = _input_fs(uri, cache)
    try:
        f = fs.open_input_file(path)
    except FileNotFoundError:
        raise InputError("no such object") from None
    with f:
        _check_size(f.size(), max_bytes)
        return f.read()


def _read_local(path: str, max_bytes: int) -> bytes:
    try:
        st = os.stat(path)  # follows symlinks: a dangling one or a loop fails here
    except FileNotFoundError:
        raise InputError("no such file (removed since listing, or a dangling symlink)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError("a symlink loop") from None
        raise
    _check_regular(st)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # replaced by a FIFO since the stat: still no hang
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        _check_regular(st)
        _check_size(st.st_size, max_bytes)
        return f.read()


def _check_regular(st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
        raise InputError(f"not a regular file ({kind}); only regular files are read")


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise InputError(f"file is {size:,} bytes, above max_bytes={max_bytes:,}")


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
    status, errors, kinds, heights, widths, images = [], [], [], [], [], []
    t_read = t_decode = 0.0
    cache: dict = {}
    for row in batch.select(["image_uri", "status", "error", "error_kind", "_size"]).to_pylist():
        height = width = image = None
        error, kind = row["error"], row["error_kind"]
        if row["status"] != "error":
            data = None
            t0 = time.perf_counter()
            try:
                data = _read(row["image_uri"], max_bytes, cache)
            except InputError as e:
                error, kind = f"read: {e}", INPUT_ERROR
            except OSError as e:  # permissions, the network, a storage outage: retried by the next run
                error, kind = f"read: {type(e).__name__}: {e}", TRANSIENT_ERROR
            t1 = time.perf_counter()
            if data is not None:
                try:
                    decoded = decode_image(data, row["image_uri"], max_pixels, min_side=row["_size"])
                    height, width = _full_size(data, decoded)
                    image = resize_for_model(decoded, row["_size"]).tobytes()
                except (ValueError, cv2.error) as e:  # ImageDecodeError is a ValueError;
                    # anything else is a bug in this code and fails the task loudly
                    error = f"decode: {getattr(e, 'reason', None) or f'{type(e).__name__}: {e}'}"
                    kind = INPUT_ERROR
                    height, width = _header_size(data)
                except MemoryError:
                    error, kind = "decode: out of memory", TRANSIENT_ERROR
            t_read += t1 - t0
            t_decode += time.perf_counter() - t1
        status.append("error" if error else "ok")
        errors.append(error)
        kinds.append(kind)
        heights.append(height)
        widths.append(width)
        images.append(image)
    n = max(len(batch), 1)
    return set_columns(batch, status=(status, pa.string()), error=(errors, pa.string()),
                       error_kind=(kinds, pa.string()), height=(heights, pa.int32()),
                       width=(widths, pa.int32()), _image=(images, pa.binary()),
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
    s3:// model directory to a local cache itself), on the device Ray assigned it, with
    `threads` CPU threads (default: the CPUs Ray gave it, which Ray passes as OMP_NUM_THREADS)."""

    def __init__(self, models: dict[str, str], threshold: float | None, cache_dir: str,
                 threads: int | None = None):
        import paddle

        from stfpm.inference import Predictor

        self._open = Predictor.open
        self.models, self.threshold, self.cache_dir, self.threads = models, threshold, cache_dir, threads
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
                self.predictors[key] = self._open(local, self.threshold, self.threads)
            except Exception as e:  # noqa: BLE001 - a broken model fails its rows, not the job
                self.failed[key] = f"model: {self.models[key]} could not be loaded: {e}"
        return self.predictors.get(key)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from stfpm.inference import normalize_score

        t0 = time.perf_counter()
        n = len(batch)
        status, errors, kinds = (batch[c].to_pylist() for c in ("status", "error", "error_kind"))
        versions = batch["model_version"].to_pylist()
        raw, norm, anomalous, thresholds, maps = [None] * n, [None] * n, [None] * n, [None] * n, [None] * n
        keys, images = batch["_model_key"].to_pylist(), batch["_image"].to_pylist()
        for key in sorted({k for k, s in zip(keys, status) if s == "ok"}):
            rows = [i for i in range(n) if keys[i] == key and status[i] == "ok"]
            predictor = self._predictor(key)
            if predictor is None:
                for i in rows:
                    status[i], errors[i], kinds[i] = "error", self.failed[key], TRANSIENT_ERROR
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
        batch = drop_columns(batch, "_image")
        return set_columns(batch, status=(status, pa.string()), error=(errors, pa.string()),
                           error_kind=(kinds, pa.string()), model_version=(versions, pa.string()),
                           raw_score=(raw, pa.float64()),
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
    return set_columns(drop_columns(batch, "_map"), map_uri=(map_uris, pa.string()),
                       overlay_uri=(overlay_uris, pa.string()), error=(errors, pa.string()),
                       _t_maps=([per_row] * n, pa.float64()))


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

