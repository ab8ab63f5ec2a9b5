"""What a scoring run reads: the input files and the model(s) that score them.

Inputs are one of
- a directory (local, recursive) or an s3://bucket/prefix: every file whose extension is in
  `extensions` (case-insensitive); hidden files and folders (a name starting with ".") and
  anything under the run's own output are skipped;
- a manifest file: `.parquet` with an `image_uri` (or `uri`, `path`) column, or any other
  text file with one URI per line (blank lines and lines starting with "#" are ignored;
  relative entries are relative to the manifest's folder). Manifest entries are not
  filtered by extension: each one gets a row;
- a single image file.

Directory levels under the root become columns named by `partitions`: with
`partitions=["category", "line"]`, `root/bottle/l3/x.png` gets category="bottle",
line="l3"; a `name=value` level (Hive style) gives its value. Levels a file does not have
are null; deeper levels stay in `image_uri` only. For manifests the root is the longest
common folder of the entries, and a Parquet manifest column named like a partition gives
that partition's values instead (its other columns are not kept).

The model is a model directory (local path or s3://, exported or not) or a registry YAML
mapping category -> model directory (optionally under a top-level `models:` key; relative
entries are relative to the YAML's folder). With a registry, each input is scored by the
model of its `category` column.
"""
from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from stfpm.model.artifact import verify_weights
from stfpm.model.card import MODEL_JSON, RETRAIN, ModelDirError, check_threshold, parse_card
from stfpm.model.registry import is_registry, read_registry
from stfpm.data.images import IMAGE_EXTENSIONS
from stfpm.storage import (MODEL_CACHE, errors_name, filesystem_for, is_http, is_s3, join_uri, parent_uri, printable_path,
                           read_bytes, readable_path, resolve_entry)

logger = logging.getLogger(__name__)
MANIFEST_URI_COLUMNS = ("image_uri", "uri", "path")
CATEGORY = "category"


def _uri(fs: pafs.FileSystem, path: str) -> str:
    """A filesystem path back to a URI: s3://bucket/key for S3, the absolute path locally."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


# ---------------------------------------------------------------------------------- inputs

def list_inputs(source: str, partitions: list[str], extensions=IMAGE_EXTENSIONS,
                exclude: str | None = None, allow_roots: list[str] | None = None) -> pa.Table:
    """The inputs of `source` as a table sorted by image_uri, one row per distinct URI:
    image_uri, input_version (Listed.version; null when the entry cannot be stat'ed),
    size_bytes (null when unknown), one string column per partition name, and
    `_input_error`: why the input is refused before reading (null when it is not).
    `exclude` is a URI prefix to skip (the output of the run). With `allow_roots`, a local
    input whose real path (symlinks resolved) is not under one of these folders is refused.
    A manifest goes from its file to Arrow arrays without a Python object per entry (only
    entries without an input_version are looked up, one by one)."""
    fs, root = filesystem_for(source)
    with errors_name(source):  # wrong credentials: one line naming the source
        info = fs.get_file_info(root.rstrip("/"))
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{source}: no such directory, prefix, manifest or image")
    extra: dict[str, pa.Array] = {}
    if info.type == pafs.FileType.Directory or info.path.lower().endswith(tuple(extensions)):
        if info.type == pafs.FileType.Directory:
            with errors_name(source):
                listed, root_uri = list_files(source, extensions, exclude, allow_roots), _uri(fs, root.rstrip("/"))
            if allow_roots is None and not is_s3(source):  # symlinks out of a folder source: opt-in (allow_roots)
                allow_roots = [root]
        else:
            listed = list_files(source, extensions)
            root_uri = parent_uri(listed[0].uri) if listed else parent_uri(source)
        uris = pa.array([f.uri for f in listed], pa.string())
        versions = pa.array([f.version for f in listed], pa.string())
        sizes = pa.array([f.size for f in listed], pa.int64())
    else:
        uris, extra = read_manifest(source)
        versions = extra.pop("input_version", None)  # e.g. the audit's, from its listing
        versions = pa.nulls(len(uris), pa.string()) if versions is None else versions
        sizes = pa.nulls(len(uris), pa.int64())
        unknown = pc.indices_nonzero(versions.is_null())
        if len(unknown):
            found = stat_entries(uris.take(unknown).to_pylist())
            position = pc.index_in(pa.array(np.arange(len(uris)), pa.int64()), value_set=unknown.cast(pa.int64()))
            versions = pc.coalesce(versions, pa.array([f.version for f in found], pa.string()).take(position))
            sizes = pc.coalesce(sizes, pa.array([f.size for f in found], pa.int64()).take(position))
        root_uri = common_folder(uris)
    columns = {"image_uri": uris, "input_version": versions, "size_bytes": sizes}
    for i, name in enumerate(partitions):
        columns[name] = extra[name] if name in extra else path_levels(uris, root_uri, i)
    inside = real_folders(allow_roots)  # resolved once, not per input
    columns["_input_error"] = pa.nulls(len(uris), pa.string()) if inside is None else pa.array(
        [None if allowed(uri, inside) else "read: outside the folders inputs may be read from (allow_roots)"
         for uri in uris.to_pylist()], pa.string())
    return distinct_sorted(pa.table(columns), "image_uri")


def distinct_sorted(table: pa.Table, key: str) -> pa.Table:
    """`table` sorted by `key`, keeping the first row of each value (a stable sort)."""
    table = table.take(pc.sort_indices(table, [(key, "ascending")]))
    if len(table) > 1:
        column = table[key].combine_chunks()
        changed = pc.not_equal(column.slice(1), column.slice(0, len(table) - 1)).fill_null(True)
        keep = pa.concat_arrays([pa.array([True]), changed])
        if not pc.all(keep).as_py():
            table = table.filter(keep)
    return table


def real_folders(roots: list[str] | None) -> list[str] | None:
    """Local folders with their symlinks resolved (None stays None: anywhere)."""
    return None if roots is None else [os.path.realpath(filesystem_for(root)[1]) for root in roots]


def allowed(uri: str, real_roots: list[str] | None) -> bool:
    """Whether a local input lies under one of `real_roots` (`real_folders`) once symlinks are
    resolved (always for S3 objects, whose access the bucket policy governs, and when
    `real_roots` is None)."""
    if real_roots is None or "://" in uri:  # S3, http(s), and schemes the read stage refuses
        return True
    real = os.path.realpath(readable_path(filesystem_for(uri)[1]))
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in real_roots)


def stat_entries(uris: list[str]) -> list[Listed]:
    """Manifest entries as listed, looked up concurrently (S3: one HEAD each); an entry that
    cannot be found (or is a URL) gets size and version None and becomes an error row."""
    from concurrent.futures import ThreadPoolExecutor

    s3 = filesystem_for("s3://x")[0] if any(is_s3(u) for u in uris) else None

    def one(uri: str) -> Listed:
        try:
            if is_s3(uri):
                info = s3.get_file_info(uri[len("s3://"):])
                if info.type == pafs.FileType.File:
                    return _s3_listed(uri, info)
            elif not is_http(uri):
                return stat_local(filesystem_for(uri)[1])
        except (OSError, ValueError):
            pass
        return Listed(uri, None, None, None)

    with ThreadPoolExecutor(max_workers=32) as pool:
        return list(pool.map(one, uris))


class Listed(NamedTuple):
    uri: str                # s3://bucket/key, or an absolute local path
    size: int
    arrived: datetime       # S3: LastModified; local: the later of mtime and ctime
    version: str            # what changes when the content does: "<size>-<arrived, ns>"


def list_files(uri: str, extensions, exclude: str | None = None, roots: list[str] | None = None) -> list[Listed]:
    """Every file under a folder or s3:// prefix (or the one file `uri` names) whose name ends
    with one of `extensions` (case-insensitive), sorted by URI. Names starting with "." at
    any level below `uri` and anything under `exclude` (a run's own output) are skipped;
    local folder symlinks are followed, each real folder once, when they lead to a folder
    under `uri` or under one of `roots` (`ln -s / SRC/x` listed the whole machine; the
    others are logged, not followed). Entries that are not regular
    files (a FIFO, a dangling symlink, a symlink loop) are listed too, so that they get an
    error row; nothing is opened here.

    "Arrived" locally is the later of mtime and ctime: ctime catches a file copied with its
    old mtime kept (`rsync -a`, `cp -p`)."""
    extensions = tuple(e.lower() for e in extensions)
    skip = filesystem_for(exclude)[1].rstrip("/") + "/" if exclude else None
    found = _list_s3(uri) if is_s3(uri) else _list_local(filesystem_for(uri)[1].rstrip("/"), roots)
    return sorted(item for item, rel in found
                  if item.uri.lower().endswith(extensions)
                  and not any(part.startswith(".") for part in rel.split("/"))
                  and not (skip and (item.uri.removeprefix("s3://") + "/").startswith(skip)))


def _list_local(root: str, roots: list[str] | None = None):
    """(Listed, path relative to root) of the files under root."""
    if not os.path.isdir(root):
        if not os.path.lexists(root):
            raise FileNotFoundError(f"{root}: no such folder or file")
        yield stat_local(root), os.path.basename(root)
        return
    seen, inside = set(), real_folders(roots or [root])
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink back up the tree, or a second link to one folder
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and _link_inside(os.path.join(folder, d), inside))
        for name in files:
            path = os.path.join(folder, name)
            try:
                yield stat_local(path), os.path.relpath(path, root)
            except FileNotFoundError:  # removed while listing
                continue


def _link_inside(path: str, roots: list[str]) -> bool:
    """A folder to descend into: not a symlink, or one leading under one of `roots`."""
    if not os.path.islink(path):
        return True
    real = os.path.realpath(path)
    if any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots):
        return True
    logger.warning(f"not following {printable_path(path)} -> {printable_path(real)}: a folder symlink out of the "
                   "source (allow it with --allow-root / scoring.allow_roots)")
    return False


def stat_local(path: str) -> Listed:
    """A local file as listed: through symlinks, or the link itself when it leads nowhere.
    A name that is not UTF-8 is listed as its storage.printable_path."""
    real = readable_path(path)
    try:
        st = os.stat(real)
    except OSError:  # a dangling symlink or a symlink loop: lstat still works
        st = os.lstat(real)
    modified = max(st.st_mtime_ns, st.st_ctime_ns)
    return Listed(printable_path(path), st.st_size, datetime.fromtimestamp(modified / 1e9, timezone.utc),
                  f"{st.st_size}-{modified}")


def _s3_listed(uri: str, info: pafs.FileInfo) -> Listed:
    return Listed(uri, info.size, info.mtime, f"{info.size}-{info.mtime_ns}")


def _list_s3(uri: str):
    fs, root = filesystem_for(uri)
    root = root.rstrip("/")
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        yield _s3_listed(uri, info), posixpath.basename(root)
        return
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such object or prefix")
    for item in s3_files(fs, root):
        yield _s3_listed(f"s3://{item.path}", item), item.path[len(root) + 1:]


S3_LISTERS = 16       # prefixes listed at once
S3_FAN_OUT_LEVELS = 2  # levels listed with a delimiter to find prefixes to list in parallel


def s3_files(fs: pafs.FileSystem, root: str, workers: int | None = None,
             levels: int = S3_FAN_OUT_LEVELS) -> list[pafs.FileInfo]:
    """Every object under the prefix `root`. One recursive listing is one request after the
    other (a page of 1,000 keys each); instead the first `levels` levels are listed with a
    delimiter to find the prefixes under them (cameras, days, ...), and those are listed
    recursively, `workers` at a time. workers=1: the one sequential listing."""
    from concurrent.futures import ThreadPoolExecutor

    workers = workers or S3_LISTERS
    if workers <= 1:
        return [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]
    files: list[pafs.FileInfo] = []
    frontier = [root]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in range(levels):
            below = []
            for listing in pool.map(lambda p: fs.get_file_info(pafs.FileSelector(p, recursive=False)), frontier):
                for item in listing:
                    if item.type == pafs.FileType.File:
                        files.append(item)
                    elif item.type == pafs.FileType.Directory:
                        below.append(item.path)
            frontier = below
            if len(frontier) >= workers or not frontier:
                break
        recursive = lambda p: fs.get_file_info(pafs.FileSelector(p, recursive=True))  # noqa: E731
        for listing in pool.map(recursive, frontier):
            files.extend(i for i in listing if i.type == pafs.FileType.File)
    return files


def read_manifest(uri: str) -> tuple[pa.Array, dict[str, pa.Array]]:
    """A manifest's entries (URIs resolved: relative ones against its folder, local paths
    normalised) and, for a Parquet manifest, its other columns as strings, as Arrow arrays."""
    base = parent_uri(uri)
    if uri.lower().endswith(".parquet"):
        table = pq.read_table(pa.BufferReader(read_bytes(uri)))
        column = next((c for c in MANIFEST_URI_COLUMNS if c in table.column_names), None)
        if column is None:
            raise ValueError(f"{uri}: a Parquet manifest needs one of the columns {MANIFEST_URI_COLUMNS}")
        entries = table[column].combine_chunks().cast(pa.string())
        if entries.null_count or pc.any(pc.equal(entries, "")).as_py():
            raise ValueError(f"{uri}: the {column!r} column has empty entries")
        extra = {c: table[c].combine_chunks().cast(pa.string())
                 for c in table.column_names if c not in (column, "image_uri", "size_bytes", "arrived_at")}
        return resolve_entries(entries, base), extra
    text = read_bytes(uri).decode("utf-8", "surrogateescape")  # a non-UTF-8 file name in it is listed escaped
    lines = (line.strip() for line in text.splitlines())
    entries = pa.array([printable_path(line) for line in lines if line and not line.startswith("#")], pa.string())
    return resolve_entries(entries, base), {}


_CLEAN_PATH = r"^/(?:[^/]+/)*[^/]+$"    # absolute, no empty level, no trailing /
_DOT_LEVEL = r"(^|/)\.\.?(/|$)"          # a "." or ".." level


def resolve_entries(entries: pa.Array, base: str) -> pa.Array:
    """storage.resolve_entry of every entry: URLs (s3://...) and clean absolute paths stay as they are,
    only the others (relative, file://, "." or ".." levels, a URL with "@") go through Python."""
    literal = pc.and_(pc.and_(pc.match_substring(entries, "://"), pc.invert(pc.starts_with(entries, "file://"))),
                      pc.invert(pc.match_substring(entries, "@")))  # a URL with credentials is redacted by resolve_entry
    clean = pc.and_(pc.match_substring_regex(entries, _CLEAN_PATH),
                    pc.invert(pc.match_substring_regex(entries, _DOT_LEVEL)))
    rest = pc.indices_nonzero(pc.invert(pc.or_(literal, clean)))
    if not len(rest):
        return entries
    resolved = pa.array([resolve_entry(e, base) for e in entries.take(rest).to_pylist()], pa.string())
    position = pc.index_in(pa.array(np.arange(len(entries)), pa.int64()), value_set=rest.cast(pa.int64()))
    return pc.if_else(pc.is_null(position), entries, resolved.take(position))


def common_folder(uris: pa.Array) -> str:
    """The longest folder every URI lies in, from the first and last URI in sorted order
    (whatever all URIs share, those two share)."""
    if not len(uris):
        return ""
    bounds = pc.min_max(uris)
    first, last = bounds["min"].as_py(), bounds["max"].as_py()
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    common = first[:n] if first != last else first
    return common.rsplit("/", 1)[0] if "/" in common else ("" if first != last else common)


def path_levels(uris: pa.Array, root: str, i: int) -> pa.Array:
    """path_level of every URI, with Arrow string kernels."""
    prefix = root.rstrip("/") + "/"
    found = pc.extract_regex(pc.utf8_slice_codeunits(uris, len(prefix)), r"^(?:[^/]*/){%d}(?P<level>[^/]*)/" % i)
    level = pc.if_else(pc.is_valid(found), found.field("level"), pa.scalar(None, pa.string()))
    level = pc.replace_substring_regex(level, r"^[^=]*=", "", max_replacements=1)
    return pc.if_else(pc.starts_with(uris, prefix), level, pa.scalar(None, pa.string()))


def path_level(uri: str, root: str, i: int) -> str | None:
    """The i-th directory level of `uri` below `root` (the file name is not a level)."""
    if not uri.startswith(root.rstrip("/") + "/"):
        return None
    levels = uri[len(root.rstrip("/")) + 1:].split("/")[:-1]
    if i >= len(levels):
        return None
    return levels[i].split("=", 1)[1] if "=" in levels[i] else levels[i]


# ---------------------------------------------------------------------------------- models

def check_model_loads(local: str, uri: str) -> None:
    """Build the network and load the weights once on the driver (a second or so once Paddle
    is imported): weights whose hashes match but that are a pickle, the wrong tensors or for
    an unknown backbone fail the run here, by name, and not every row as a "transient" error."""
    from stfpm.model.artifact import load_model
    from stfpm.model.export import is_exported

    if is_exported(local):  # a Paddle program: its files' hashes were checked (verify_weights)
        return
    try:
        load_model(local)
    except ModelDirError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the loader trips on, the model is unusable
        raise ModelDirError(f"{uri}: the model cannot be loaded ({type(e).__name__}: {str(e)[:300]}); "
                            f"{RETRAIN}") from None


@dataclass(frozen=True)
class ModelRef:
    """A model as the driver knows it: where it is and what model.json says, without
    loading any weights (that happens inside the scoring actors)."""
    name: str        # registry key, or the model directory's base name
    uri: str         # local absolute path or s3:// URI
    version: str     # model.json's model_version (a hash of the weights)
    input_size: int
    threshold: float
    log_scale: float  # of the normalised score (stfpm.model.score_scale)
    tile_size: int | None = None  # the model's tiling (model.json input.tile_size, stfpm.data.tiling)
    tile_overlap: int = 0

    @classmethod
    def read(cls, name: str, uri: str, threshold: float | None = None) -> "ModelRef":
        """model.json of `uri`, with the weight files checked against it (artifact.verify_weights;
        an s3:// model is fetched to the local cache the actors use): a model that cannot
        load fails the run before any row is written, not with an error row per input."""
        from stfpm.storage import fetch_to_cache

        uri = uri.rstrip("/") if is_s3(uri) else filesystem_for(uri)[1]
        card_uri = join_uri(uri, MODEL_JSON)
        try:
            card = parse_card(read_bytes(card_uri), card_uri)
        except FileNotFoundError:
            raise ModelDirError(f"{uri} is not a model directory: it has no {MODEL_JSON} "
                                "(train one with `stfpm train`)") from None
        local = fetch_to_cache(uri, MODEL_CACHE)
        verify_weights(local, card)
        check_model_loads(local, uri)
        cal = card.calibration
        return cls(name=name, uri=uri, version=card.model_version, input_size=card.input.size,
                   threshold=cal.threshold if threshold is None else check_threshold(threshold),
                   log_scale=cal.scale.log_scale, tile_size=card.input.tile_size,
                   tile_overlap=card.input.tile_overlap)


def resolve_models(model: str, threshold: float | None = None) -> dict[str | None, ModelRef]:
    """{category: ModelRef} for a registry YAML, {None: ModelRef} for one model directory."""
    if not is_registry(model):
        return {None: ModelRef.read(posixpath.basename(model.rstrip("/")), model, threshold)}
    return {category: ModelRef.read(category, uri, threshold) for category, uri in read_registry(model).items()}
