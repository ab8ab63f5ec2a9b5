"""The per-batch stages of Ray Data scoring: read + decode (CPU tasks), the forward (actor), maps (CPU tasks).

Each takes and returns a pyarrow batch of pipeline rows (table columns plus "_" columns the
next stage needs). A file that cannot be read or decoded, or a model that cannot be loaded,
makes its rows error rows; no input can fail a batch.
"""
from __future__ import annotations

import errno
import importlib.util
import itertools
import os
import resource
import stat
import time

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from stfpm.data.images import frames_note, prepare_input, sniff_image
from stfpm.data.tiling import tiling_of
from stfpm.scoring.table import (INPUT_ERROR, MAPS, OVERLAYS, TRANSIENT_ERROR, drop_columns, set_columns,
                                 with_image_ids)
from stfpm.storage import filesystem_for, has_credentials, is_http, is_s3, join_uri, readable_path, write_bytes

MAX_BYTES = 256 << 20
OVERLAY_MAX_PIXELS = 4_000_000  # overlays are drawn at the input's size up to this, scaled down above it


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
    if has_credentials(uri):
        raise InputError("credentials in a URL are not accepted; the AWS chain (environment, profile, role) is used")
    if "://" in uri and not is_s3(uri):  # a manifest line such as ftp://...: local paths are absolute
        raise InputError(f"unsupported URL scheme {uri.split('://', 1)[0]!r}: scoring reads local files "
                         "and s3:// objects")
    if not is_s3(uri):
        return _read_local(readable_path(filesystem_for(uri)[1]), max_bytes)
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


def _header_size(data: bytes | None) -> tuple[int | None, int | None]:
    """(h, w) an undecodable file's header claims, where plausible (it fits the int32 columns)."""
    header = sniff_image(data) if data else None
    plausible = lambda v: v if isinstance(v, int) and 0 < v < 2**31 else None  # noqa: E731
    return (plausible(header.height), plausible(header.width)) if header else (None, None)


# ------------------------------------------------------------------------ stage 1: CPU tasks

def load_images(batch: pa.Table, max_pixels: int, max_bytes: int, keep_images: bool = False) -> pa.Table:
    """Read each row's file and prepare it for its model (`_size`) with the decode policy of
    every other path (`stfpm.data.prepare_input`). `keep_images` (overlays) also keeps the
    decoded image (`_decoded`, raw pixels) so the maps stage does not read and decode the
    file again. A file that cannot be read or decoded makes its row an error row; no file can
    fail the batch."""
    batch = with_image_ids(batch)
    status, errors, kinds, heights, widths, images, decoded = [], [], [], [], [], [], []
    t_read = t_decode = 0.0
    cache: dict = {}
    tiled = "_tile" in batch.column_names  # the plan's columns of a tiled model (stfpm.data.tiling)
    tiles = (zip(batch["_tile"].to_pylist(), batch["_tile_overlap"].to_pylist(), batch["_tile_whole"].to_pylist())
             if tiled else itertools.repeat((None, 0, False)))
    for row, (tile, overlap, whole) in zip(batch.select(["image_uri", "status", "error", "error_kind", "_size"]).to_pylist(),
                                    tiles):
        height = width = image = kept = note = None
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
                    tiling = tiling_of(tile, overlap, whole)
                    prepared = prepare_input(data, row["_size"], row["image_uri"], max_pixels, keep_images, tiling)
                    height, width, image = prepared.height, prepared.width, prepared.pixels.tobytes()
                    note = frames_note(data)  # on an ok row, as overlay notes are
                    if keep_images:  # bounded: three 100-MP images took ~3 GiB per worker
                        kept = _pack(_bounded(prepared.image, *_overlay_size(height, width)))
                except (ValueError, cv2.error) as e:  # ImageDecodeError is a ValueError;
                    # anything else is a bug in this code and fails the task loudly
                    error = f"decode: {getattr(e, 'reason', None) or f'{type(e).__name__}: {e}'}"
                    # OpenCV out of memory is the machine's state, not the file's: retried
                    kind = TRANSIENT_ERROR if "Insufficient memory" in str(e) else INPUT_ERROR
                    height, width = _header_size(data)
                except MemoryError:
                    error, kind = "decode: out of memory", TRANSIENT_ERROR
            t_read += t1 - t0
            t_decode += time.perf_counter() - t1
        status.append("error" if error else "ok")
        errors.append(error or note)
        kinds.append(kind)
        heights.append(height)
        widths.append(width)
        images.append(image)
        decoded.append(kept)
    n = max(len(batch), 1)
    columns = {"_decoded": (decoded, pa.binary())} if keep_images else {}
    return set_columns(batch, status=(status, pa.string()), error=(errors, pa.string()),
                       error_kind=(kinds, pa.string()), height=(heights, pa.int32()),
                       width=(widths, pa.int32()), _image=(images, pa.binary()),
                       _t_read=([t_read / n] * len(batch), pa.float64()),
                       _t_decode=([t_decode / n] * len(batch), pa.float64()), **columns)


def _overlay_size(height: int, width: int) -> tuple[int, int]:
    """(h, w) of an input's overlay: its own size, scaled down to at most OVERLAY_MAX_PIXELS."""
    if height * width <= OVERLAY_MAX_PIXELS:
        return height, width
    scale = (OVERLAY_MAX_PIXELS / (height * width)) ** 0.5
    return max(1, int(height * scale)), max(1, int(width * scale))


def _bounded(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`image` no larger than (height, width): a smaller one (a JPEG decoded at reduced scale) is kept."""
    if image.shape[0] * image.shape[1] <= height * width:
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def _pack(image: np.ndarray) -> bytes:
    """A uint8 image (a BGR image, an 8-bit map) as bytes: an 8-byte (h, w) header, then the pixels."""
    return np.array(image.shape[:2], np.int32).tobytes() + image.tobytes()


def _unpack(data: bytes, channels: int = 3) -> np.ndarray:
    h, w = np.frombuffer(data[:8], np.int32)
    return np.frombuffer(data[8:], np.uint8).reshape((h, w, channels) if channels > 1 else (h, w))


# ---------------------------------------------------------------------- stage 2: actor pool

class ScoreActor:
    """Runs the STFPM predictor. Each actor loads each model it needs once (fetching an
    s3:// model directory to a local cache itself), on the device Ray assigned it, with
    `threads` CPU threads (default: the CPUs Ray gave it, which Ray passes as OMP_NUM_THREADS)."""

    def __init__(self, models: dict[str, str], threshold: float | None, cache_dir: str,
                 threads: int | None = None):
        from stfpm.model.inference import Predictor

        self._open = Predictor.open
        self.models, self.threshold, self.cache_dir, self.threads = models, threshold, cache_dir, threads
        self.predictors: dict[str, object] = {}
        self.failed: dict[str, str] = {}
        self.device = "cpu"
        if importlib.util.find_spec("paddle") is not None:  # without it, ONNX/OpenVINO exports still score
            import paddle

            from stfpm.runtime import ray_paddle_device

            device, self.device = ray_paddle_device()
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
        from stfpm.model.heatmap import to_heat

        t0 = time.perf_counter()
        n = len(batch)
        status, errors, kinds = (batch[c].to_pylist() for c in ("status", "error", "error_kind"))
        versions = batch["model_version"].to_pylist()
        raw, norm, anomalous, thresholds, maps = [None] * n, [None] * n, [None] * n, [None] * n, [None] * n
        ood, ood_scores = [None] * n, [None] * n
        keys, images = batch["_model_key"].to_pylist(), batch["_image"].to_pylist()
        heights, widths = batch["height"].to_pylist(), batch["width"].to_pylist()
        for key in sorted({k for k, s in zip(keys, status) if s == "ok"}):
            rows = [i for i in range(n) if keys[i] == key and status[i] == "ok"]
            predictor = self._predictor(key)
            if predictor is None:
                for i in rows:
                    status[i], errors[i], kinds[i] = "error", self.failed[key], TRANSIENT_ERROR
                continue
            size = predictor.size
            tiles = [np.frombuffer(images[i], np.uint8).reshape(-1, size, size, 3) for i in rows]
            image_maps, oods = predictor.image_maps(tiles, [(heights[i], widths[i]) for i in rows])
            # calibrated at the maps' own size; the maps stage resizes them to the image's
            for i, p in zip(rows, predictor.calibrate(image_maps, oods, [m.shape for m in image_maps])):
                raw[i], norm[i], anomalous[i], thresholds[i] = p.score, p.norm_score, p.is_anomaly, p.threshold
                ood[i], ood_scores[i] = p.ood, p.ood_score
                maps[i] = _pack(to_heat(predictor.calibration.normalize(p.anomaly_map, p.threshold)))
                versions[i] = predictor.model_version
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        per_row = (time.perf_counter() - t0) / max(n, 1)
        batch = drop_columns(batch, "_image")
        return set_columns(batch, status=(status, pa.string()), error=(errors, pa.string()),
                           error_kind=(kinds, pa.string()), model_version=(versions, pa.string()),
                           raw_score=(raw, pa.float64()),
                           score=(norm, pa.float64()), is_anomaly=(anomalous, pa.bool_()),
                           threshold=(thresholds, pa.float64()), ood=(ood, pa.bool_()),
                           ood_score=(ood_scores, pa.float64()), device=([self.device] * n, pa.string()),
                           _map=(maps, pa.binary()), _t_predict=([per_row] * n, pa.float64()),
                           _actor_rss_mb=([rss_mb] * n, pa.float64()))


class FusedScoreActor(ScoreActor):
    """For one machine (`stfpm score --fused`): each batch read and decoded (`load_images`),
    scored, and its maps written (`write_maps`) in this actor, the in-process loop's work with
    the actor's CPUs and threads. On a few cores the separate stages cost more than they
    overlap (bench/RESULTS.md, issue 14); on a cluster keep them apart, so decoding runs on
    CPU-only nodes and GPU actors only predict."""

    def __init__(self, models: dict[str, str], threshold: float | None, cache_dir: str, threads: int | None = None,
                 *, output: str, max_pixels: int, max_bytes: int, keep_images: bool = False):
        super().__init__(models, threshold, cache_dir, threads)
        self.output, self.max_pixels, self.max_bytes, self.keep_images = output, max_pixels, max_bytes, keep_images

    def __call__(self, batch: pa.Table) -> pa.Table:
        decoded = load_images(batch, self.max_pixels, self.max_bytes, self.keep_images)
        return write_maps(super().__call__(decoded), self.output)


# ------------------------------------------------------------------------ stage 3: CPU tasks

def write_maps(batch: pa.Table, output: str) -> pa.Table:
    """Resize each ok row's 8-bit map to the input's size, PNG-encode it and write it to its
    deterministic key (a re-run overwrites it with the same content). Rows that carry their
    decoded image (overlays) and are anomalous also get the overlay, drawn from that map."""
    from stfpm.model.heatmap import encode_png, heat_at, overlay

    t0 = time.perf_counter()
    n = len(batch)
    map_uris, overlay_uris = [None] * n, [None] * n
    errors = batch["error"].to_pylist()
    images = batch["_decoded"].to_pylist() if "_decoded" in batch.column_names else [None] * n
    rows = batch.select(["image_id", "status", "model_version", "width", "height", "_map",
                         "is_anomaly", "raw_score", "score"]).to_pylist()
    for i, row in enumerate(rows):
        if row["status"] != "ok":
            continue
        h, w = row["height"], row["width"]
        heat = heat_at(_unpack(row["_map"], channels=1), h, w)  # from the model's scale (or a stitched map)
        key = f"{row['model_version']}/{row['image_id']}.png"
        map_uris[i] = join_uri(output, MAPS, key)
        write_bytes(map_uris[i], encode_png(heat))
        if images[i] is not None and row["is_anomaly"]:
            try:
                oh, ow = _overlay_size(h, w)
                small = heat if (oh, ow) == heat.shape else cv2.resize(heat, (ow, oh), interpolation=cv2.INTER_AREA)
                drawn = overlay(_unpack(images[i]), small, True, row["score"], row["raw_score"])
                overlay_uris[i] = join_uri(output, OVERLAYS, key)
                write_bytes(overlay_uris[i], encode_png(drawn))
            except Exception as e:  # noqa: BLE001 - the score stands; the optional picture failed
                overlay_uris[i], errors[i] = None, f"overlay: {e}"
    per_row = (time.perf_counter() - t0) / max(n, 1)
    return set_columns(drop_columns(batch, "_map", "_decoded"), map_uri=(map_uris, pa.string()),
                       overlay_uri=(overlay_uris, pa.string()), error=(errors, pa.string()),
                       _t_maps=([per_row] * n, pa.float64()))
