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
from datetime import date, datetime, timezone
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
from stfpm.scoring.dates import DateTemplate, has_date
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
                exclude: str | None = None, allow_roots: list[str] | None = None,
                dates: list[date] | None = None) -> pa.Table:
    """The inputs of `source` as a table sorted by image_uri, one row per distinct URI:
    image_uri, input_version (Listed.version; null when the entry cannot be stat'ed),
    size_bytes (null when unknown), one string column per partition name, and
    `_input_error`: why the input is refused before reading (null when it is not).
    `exclude` is a URI prefix to skip (the output of the run). With `allow_roots`, a local
    input whose real path (symlinks resolved) is not under one of these folders is refused.
    A manifest goes from its file to Arrow arrays without a Python object per entry (only
    entries with neither an input_version nor a size and mtime are looked up, one by one).

    A source with `{date}` (stfpm.scoring.dates) lists the folder (or manifest) of each day
    of `dates` (default: every day folder that exists); partitions count from the template's
    root, and a day whose folder does not exist is logged and lists nothing."""
    if not has_date(source):
        return distinct_sorted(_inputs_of(source, partitions, extensions, exclude, allow_roots), "image_uri")
    template = DateTemplate.parse(source)
    root = template.root if is_s3(template.root) else filesystem_for(template.root)[1]
    if allow_roots is None and not is_s3(source):  # as for a folder source: its root
        allow_roots = [root]
    days = template.existing_days() if dates is None else dates
    tables, missing = [], []
    for day in days:
        with errors_name(template.uri(day)):
            found = _inputs_of(template.uri(day), partitions, extensions, exclude, allow_roots, root=root,
                               missing_ok=True)
        if found is None:
            missing.append(day.isoformat())
        else:
            tables.append(found)
    if missing:
        logger.warning(f"warning: {len(missing)} of {len(days)} day folders of {source} do not exist (yet), "
                       f"nothing listed for them: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if not tables:
        return pa.table({"image_uri": pa.array([], pa.string()), "input_version": pa.array([], pa.string()),
                         "size_bytes": pa.array([], pa.int64()), **{p: pa.array([], pa.string()) for p in partitions},
                         "_input_error": pa.array([], pa.string())})
    return distinct_sorted(pa.concat_tables(tables, promote_options="permissive"), "image_uri")


def _inputs_of(source: str, partitions: list[str], extensions, exclude: str | None, allow_roots: list[str] | None,
               root: str | None = None, missing_ok: bool = False) -> pa.Table | None:
    """list_inputs of a source without {date}, not yet sorted; partitions count from `root` for
    a folder (default: the folder itself), from the entries' common folder for a manifest. None when the
    source does not exist and `missing_ok`."""
    fs, path = filesystem_for(source)
    with errors_name(source):  # wrong credentials: one line naming the source
        info = fs.get_file_info(path.rstrip("/"))
    if info.type == pafs.FileType.NotFound:
        if missing_ok:
            return None
        raise FileNotFoundError(f"{source}: no such directory, prefix, manifest or image")
    extra: dict[str, pa.Array] = {}
    if info.type == pafs.FileType.Directory or info.path.lower().endswith(tuple(extensions)):
        if info.type == pafs.FileType.Directory:
            with errors_name(source):
                listed, root_uri = list_files(source, extensions, exclude, allow_roots), _uri(fs, path.rstrip("/"))
            if allow_roots is None and not is_s3(source):  # symlinks out of a folder source: opt-in (allow_roots)
                allow_roots = [path]
        else:
            listed = list_files(source, extensions)
            root_uri = parent_uri(listed[0].uri) if listed else parent_uri(source)
        uris = pa.array([f.uri for f in listed], pa.string())
        versions = pa.array([f.version for f in listed], pa.string())
        sizes = pa.array([f.size for f in listed], pa.int64())
    else:
        uris, extra = read_manifest(source, extensions)
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
    root_uri = root if root and info.type == pafs.FileType.Directory else root_uri  # a manifest: its entries'
    columns = {"image_uri": uris, "input_version": versions, "size_bytes": sizes}
    for i, name in enumerate(partitions):
        columns[name] = extra[name] if name in extra else path_levels(uris, root_uri, i)
    inside = real_folders(allow_roots)  # resolved once, not per input
    columns["_input_error"] = pa.nulls(len(uris), pa.string()) if inside is None else pa.array(
        [None if allowed(uri, inside) else "read: outside the folders inputs may be read from (allow_roots)"
         for uri in uris.to_pylist()], pa.string())
    return pa.table(columns)


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


def read_manifest(uri: str, extensions=IMAGE_EXTENSIONS) -> tuple[pa.Array, dict[str, pa.Array]]:
    """A manifest's entries (URIs resolved: relative ones against its folder, local paths
    normalised) and, for a Parquet or CSV manifest, its other columns as strings, as Arrow
    arrays. A manifest that carries each entry's size and modification time (`size` +
    `mtime`, or an S3 Inventory's `size` + `last_modified_date`) gets its `input_version`
    from them, exactly as a listing makes it (`manifest_versions`): no HEAD or stat per entry.
    An S3 Inventory lists every object of its bucket or prefix: only its keys ending in one of
    `extensions` are entries (the entries of other manifests are all kept)."""
    base = parent_uri(uri)
    lower = uri.lower()
    if lower.endswith((".csv", ".csv.gz")):
        return read_inventory_csv(uri, extensions)
    if lower.endswith(".parquet"):
        table = pq.read_table(pa.BufferReader(read_bytes(uri)))
        column = next((c for c in MANIFEST_URI_COLUMNS if c in table.column_names), None)
        if column is None and {"bucket", "key"} <= set(table.column_names):  # an S3 Inventory in Parquet
            return _inventory_entries(uri, table, extensions)
        if column is None:
            raise ValueError(f"{uri}: a Parquet manifest needs one of the columns {MANIFEST_URI_COLUMNS} "
                             "(or bucket and key, as an S3 Inventory has)")
        entries = table[column].combine_chunks().cast(pa.string())
        if entries.null_count or pc.any(pc.equal(entries, "")).as_py():
            raise ValueError(f"{uri}: the {column!r} column has empty entries")
        versions = manifest_versions(table, uri)
        extra = {c: table[c].combine_chunks().cast(pa.string())
                 for c in table.column_names
                 if c not in (column, "image_uri", "size_bytes", "arrived_at", *MANIFEST_TIME_COLUMNS, "size")}
        if versions is not None:
            extra["input_version"] = pc.coalesce(extra["input_version"], versions) if "input_version" in extra \
                else versions
        return resolve_entries(entries, base), extra
    text = read_bytes(uri).decode("utf-8", "surrogateescape")  # a non-UTF-8 file name in it is listed escaped
    lines = (line.strip() for line in text.splitlines())
    entries = pa.array([printable_path(line) for line in lines if line and not line.startswith("#")], pa.string())
    return resolve_entries(entries, base), {}


MANIFEST_SIZE_COLUMNS = ("size", "size_bytes")
MANIFEST_TIME_COLUMNS = ("mtime", "last_modified_date")
INVENTORY_CSV_COLUMNS = ("bucket", "key", "size", "last_modified_date")


def manifest_versions(table: pa.Table, uri: str) -> pa.Array | None:
    """input_version "<size>-<modified, ns since the epoch>" of each entry, as a listing makes it
    (Listed.version: on S3 the object's LastModified, locally the later of mtime and ctime), from
    a size column and a modification-time column (a timestamp, an ISO time string, or whole
    nanoseconds). None when the manifest has no such pair. An entry whose size or time is
    missing or unreadable gets null: it is looked up like an entry of a plain manifest."""
    size = next((c for c in MANIFEST_SIZE_COLUMNS if c in table.column_names), None)
    when = next((c for c in MANIFEST_TIME_COLUMNS if c in table.column_names), None)
    if size is None or when is None:
        return None
    sizes, times = table[size].combine_chunks(), table[when].combine_chunks()
    if not (pa.types.is_integer(sizes.type) or pa.types.is_string(sizes.type)):
        raise ValueError(f"{uri}: the {size!r} column must hold whole numbers of bytes, not {sizes.type}")
    sizes = pa.array([_whole(v) for v in sizes.to_pylist()], pa.int64()) if pa.types.is_string(sizes.type) \
        else sizes.cast(pa.int64())
    sizes = pc.if_else(pc.greater_equal(sizes, 0), sizes, pa.scalar(None, pa.int64()))
    if pa.types.is_timestamp(times.type):
        ns = times.cast(pa.timestamp("ns", times.type.tz)).cast(pa.int64())
    elif pa.types.is_integer(times.type):
        ns = times.cast(pa.int64())
    elif pa.types.is_string(times.type) or pa.types.is_large_string(times.type):
        ns = _iso_ns(times.cast(pa.string()))
    else:
        raise ValueError(f"{uri}: the {when!r} column must be a timestamp, an ISO time or nanoseconds, "
                         f"not {times.type}")
    versions = pc.binary_join_element_wise(sizes.cast(pa.string()), ns.cast(pa.string()), "-")
    if versions.null_count:
        logger.warning(f"warning: {uri}: {versions.null_count} entries have no valid {size}/{when}; "
                       "they are looked up one by one")
    return versions


def _whole(text: str | None) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _iso_ns(times: pa.Array) -> pa.Array:
    """ISO times ("2026-12-03T02:10:00.000Z"; no offset: UTC) as int64 ns; null where unreadable."""
    try:
        return times.cast(pa.timestamp("ns", "UTC")).cast(pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass

    def one(text):
        try:
            t = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except (AttributeError, ValueError):
            return None
        t = t if t.tzinfo else t.replace(tzinfo=timezone.utc)
        return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000
    return pa.array([one(t) for t in times.to_pylist()], pa.int64())


def read_inventory_csv(uri: str, extensions=IMAGE_EXTENSIONS) -> tuple[pa.Array, dict[str, pa.Array]]:
    """An S3 Inventory CSV (`.csv` or `.csv.gz`) whose fileSchema starts with "Bucket, Key, Size,
    LastModifiedDate" (the inventory's optional fields Size and Last modified), or any CSV
    with a header row naming bucket, key, size and last_modified_date. Keys are URL-encoded
    in an inventory CSV and are decoded here."""
    import pyarrow.csv as pcsv

    data = read_bytes(uri)
    if data[:2] == b"\x1f\x8b":  # still gzip (read_bytes opens some .gz files decompressed already)
        import gzip

        data = gzip.decompress(data)
    first = data.split(b"\n", 1)[0].decode("utf-8", "replace").lower()
    header = all(name in first for name in ("bucket", "key"))
    names = None if header else list(INVENTORY_CSV_COLUMNS)
    try:
        table = pcsv.read_csv(pa.BufferReader(data), read_options=pcsv.ReadOptions(
            column_names=names if names is None else names + [f"_{k}" for k in range(_csv_width(first) - 4)]),
            convert_options=pcsv.ConvertOptions(column_types={"bucket": pa.string(), "key": pa.string(),
                                                               "size": pa.string(),
                                                               "last_modified_date": pa.string()}))
    except (pa.ArrowInvalid, ValueError) as e:
        raise ValueError(f"{uri}: not an S3 Inventory CSV with the columns {', '.join(INVENTORY_CSV_COLUMNS)} "
                         f"({str(e).splitlines()[0][:200]})") from None
    table = table.rename_columns([c.strip().lower() for c in table.column_names])
    missing = [c for c in INVENTORY_CSV_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{uri}: an inventory CSV needs the columns {', '.join(INVENTORY_CSV_COLUMNS)} "
                         f"(missing {', '.join(missing)})")
    if not header and len(table) and not pc.any(pc.is_valid(
            pa.array([_whole(v) for v in table["size"].to_pylist()[:100]], pa.int64()))).as_py():
        raise ValueError(f"{uri}: the third column is not a size; an inventory CSV's fileSchema must start with "
                         "Bucket, Key, Size, LastModifiedDate (or give a header row naming them)")
    keys = table["key"].combine_chunks()
    encoded = pc.indices_nonzero(pc.fill_null(pc.match_substring_regex(keys, r"[%+]"), False))
    if len(encoded):
        from urllib.parse import unquote_plus

        decoded = pa.array([unquote_plus(k) for k in keys.take(encoded).to_pylist()], pa.string())
        position = pc.index_in(pa.array(np.arange(len(keys)), pa.int64()), value_set=encoded.cast(pa.int64()))
        keys = pc.if_else(pc.is_null(position), keys, decoded.take(position))
    return _inventory_entries(uri, table.set_column(table.column_names.index("key"), "key", keys), extensions)


def _csv_width(first_line: str) -> int:
    import csv

    return max(4, len(next(csv.reader([first_line]), [])))


def _inventory_entries(uri: str, table: pa.Table, extensions) -> tuple[pa.Array, dict[str, pa.Array]]:
    """The s3://bucket/key entries of an S3 Inventory table whose key ends in one of
    `extensions` (case-insensitive), and their input_version."""
    lower = pc.utf8_lower(table["key"].combine_chunks().cast(pa.string()))
    image = None
    for ending in extensions:
        term = pc.ends_with(lower, ending.lower())
        image = term if image is None else pc.or_(image, term)
    if image is not None:
        table = table.filter(pc.fill_null(pc.or_(image, pc.equal(lower, "")), True))  # no key: refused below
    bucket, key = table["bucket"].combine_chunks().cast(pa.string()), table["key"].combine_chunks().cast(pa.string())
    bad = pc.or_(pc.fill_null(pc.equal(bucket, ""), True), pc.fill_null(pc.equal(key, ""), True))
    if pc.any(bad).as_py():
        row = pc.indices_nonzero(bad)[0].as_py()
        raise ValueError(f"{uri}: row {row + 1} has no bucket or key")
    entries = pc.binary_join_element_wise("s3://", bucket, "/", key, "")
    versions = manifest_versions(table, uri)
    return entries, ({} if versions is None else {"input_version": versions})


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
    tile_whole: bool = False  # the "whole+tiles" views (model.json input.tile_whole)

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
                   tile_overlap=card.input.tile_overlap, tile_whole=card.input.tile_whole)


def resolve_models(model: str, threshold: float | None = None) -> dict[str | None, ModelRef]:
    """{category: ModelRef} for a registry YAML, {None: ModelRef} for one model directory."""
    if not is_registry(model):
        return {None: ModelRef.read(posixpath.basename(model.rstrip("/")), model, threshold)}
    return {category: ModelRef.read(category, uri, threshold) for category, uri in read_registry(model).items()}
