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

import hashlib
import os
import posixpath
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from stfpm.model.artifact import verify_weights
from stfpm.model.card import MODEL_JSON, ModelDirError, parse_card
from stfpm.model.registry import is_registry, read_registry
from stfpm.data.images import IMAGE_EXTENSIONS
from stfpm.storage import MODEL_CACHE, filesystem_for, is_http, is_s3, join_uri, parent_uri, read_bytes, resolve_entry

MANIFEST_URI_COLUMNS = ("image_uri", "uri", "path")
CATEGORY = "category"


def image_id(uri: str) -> str:
    """A stable id for an input: the first 32 hex digits of sha256(image_uri)."""
    return hashlib.sha256(uri.encode()).hexdigest()[:32]


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
    input whose real path (symlinks resolved) is not under one of these folders is refused."""
    fs, root = filesystem_for(source)
    info = fs.get_file_info(root.rstrip("/"))
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{source}: no such directory, prefix, manifest or image")
    extra: dict[str, list] = {}
    if info.type == pafs.FileType.Directory:
        listed, root_uri = list_files(source, extensions, exclude), _uri(fs, root.rstrip("/"))
    elif info.path.lower().endswith(tuple(extensions)):
        listed = list_files(source, extensions)
        root_uri = parent_uri(listed[0].uri) if listed else parent_uri(source)
    else:
        uris, extra = read_manifest(source)
        given = extra.pop("input_version", None) or [None] * len(uris)  # e.g. the audit's, from its listing
        unknown = [i for i, v in enumerate(given) if v is None]
        found = dict(zip(unknown, stat_entries([uris[i] for i in unknown])))
        listed = [found.get(i) or Listed(u, None, None, given[i]) for i, u in enumerate(uris)]
        root_uri = _common_folder(uris)
    uris = [f.uri for f in listed]
    columns = {"image_uri": uris, "input_version": [f.version for f in listed], "size_bytes": [f.size for f in listed]}
    for i, name in enumerate(partitions):
        columns[name] = extra[name] if name in extra else [path_level(uri, root_uri, i) for uri in uris]
    columns["_input_error"] = [None if allowed(uri, allow_roots) else
                               "read: outside the folders inputs may be read from (allow_roots)" for uri in uris]
    first = {}
    for i, uri in enumerate(uris):
        first.setdefault(uri, i)
    table = pa.table({k: pa.array(v, pa.int64() if k == "size_bytes" else pa.string())
                      for k, v in columns.items()})
    if len(first) != len(uris):
        table = table.take(pa.array(sorted(first.values()), pa.int64()))
    return table.sort_by("image_uri")


def allowed(uri: str, roots: list[str] | None) -> bool:
    """Whether a local input lies under one of `roots` once symlinks are resolved (always
    for S3 objects, whose access the bucket policy governs, and when `roots` is None)."""
    if roots is None or is_s3(uri) or is_http(uri):
        return True
    real = os.path.realpath(filesystem_for(uri)[1])
    return any(real == r or real.startswith(r.rstrip("/") + "/")
               for r in (os.path.realpath(filesystem_for(root)[1]) for root in roots))


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


def list_files(uri: str, extensions, exclude: str | None = None) -> list[Listed]:
    """Every file under a folder or s3:// prefix (or the one file `uri` names) whose name ends
    with one of `extensions` (case-insensitive), sorted by URI. Names starting with "." at
    any level below `uri` and anything under `exclude` (a run's own output) are skipped;
    local folder symlinks are followed, each real folder once. Entries that are not regular
    files (a FIFO, a dangling symlink, a symlink loop) are listed too, so that they get an
    error row; nothing is opened here.

    "Arrived" locally is the later of mtime and ctime: ctime catches a file copied with its
    old mtime kept (`rsync -a`, `cp -p`)."""
    extensions = tuple(e.lower() for e in extensions)
    skip = filesystem_for(exclude)[1].rstrip("/") + "/" if exclude else None
    found = _list_s3(uri) if is_s3(uri) else _list_local(filesystem_for(uri)[1].rstrip("/"))
    return sorted(item for item, rel in found
                  if item.uri.lower().endswith(extensions)
                  and not any(part.startswith(".") for part in rel.split("/"))
                  and not (skip and (item.uri.removeprefix("s3://") + "/").startswith(skip)))


def _list_local(root: str):
    """(Listed, path relative to root) of the files under root."""
    if not os.path.isdir(root):
        if not os.path.lexists(root):
            raise FileNotFoundError(f"{root}: no such folder or file")
        yield stat_local(root), os.path.basename(root)
        return
    seen = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink back up the tree, or a second link to one folder
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = os.path.join(folder, name)
            try:
                yield stat_local(path), os.path.relpath(path, root)
            except FileNotFoundError:  # removed while listing
                continue


def stat_local(path: str) -> Listed:
    """A local file as listed: through symlinks, or the link itself when it leads nowhere."""
    try:
        st = os.stat(path)
    except OSError:  # a dangling symlink or a symlink loop: lstat still works
        st = os.lstat(path)
    modified = max(st.st_mtime_ns, st.st_ctime_ns)
    return Listed(path, st.st_size, datetime.fromtimestamp(modified / 1e9, timezone.utc), f"{st.st_size}-{modified}")


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
    for item in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if item.type == pafs.FileType.File:
            yield _s3_listed(f"s3://{item.path}", item), item.path[len(root) + 1:]


def read_manifest(uri: str) -> tuple[list[str], dict[str, list]]:
    base = parent_uri(uri)
    if uri.lower().endswith(".parquet"):
        table = pq.read_table(pa.BufferReader(read_bytes(uri)))
        column = next((c for c in MANIFEST_URI_COLUMNS if c in table.column_names), None)
        if column is None:
            raise ValueError(f"{uri}: a Parquet manifest needs one of the columns {MANIFEST_URI_COLUMNS}")
        uris = [resolve_entry(str(u), base) for u in table[column].to_pylist() if u]
        extra = {c: [None if v is None else str(v) for v in table[c].to_pylist()]
                 for c in table.column_names if c not in (column, "image_uri", "size_bytes", "arrived_at")}
        if len(uris) != len(table):
            raise ValueError(f"{uri}: the {column!r} column has empty entries")
        return uris, extra
    text = read_bytes(uri).decode("utf-8")
    lines = (line.strip() for line in text.splitlines())
    return [resolve_entry(line, base) for line in lines if line and not line.startswith("#")], {}


def _common_folder(uris: list[str]) -> str:
    folders = [u.rsplit("/", 1)[0].split("/") for u in uris]
    if not folders:
        return ""
    common = folders[0]
    for parts in folders[1:]:
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    return "/".join(common)


def path_level(uri: str, root: str, i: int) -> str | None:
    """The i-th directory level of `uri` below `root` (the file name is not a level)."""
    if not uri.startswith(root.rstrip("/") + "/"):
        return None
    levels = uri[len(root.rstrip("/")) + 1:].split("/")[:-1]
    if i >= len(levels):
        return None
    return levels[i].split("=", 1)[1] if "=" in levels[i] else levels[i]


# ---------------------------------------------------------------------------------- models

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
        verify_weights(fetch_to_cache(uri, MODEL_CACHE), card)
        cal = card.calibration
        return cls(name=name, uri=uri, version=card.model_version, input_size=card.input.size,
                   threshold=cal.threshold if threshold is None else float(threshold),
                   log_scale=cal.scale.log_scale, tile_size=card.input.tile_size,
                   tile_overlap=card.input.tile_overlap)


def resolve_models(model: str, threshold: float | None = None) -> dict[str | None, ModelRef]:
    """{category: ModelRef} for a registry YAML, {None: ModelRef} for one model directory."""
    if not is_registry(model):
        return {None: ModelRef.read(posixpath.basename(model.rstrip("/")), model, threshold)}
    return {category: ModelRef.read(category, uri, threshold) for category, uri in read_registry(model).items()}
