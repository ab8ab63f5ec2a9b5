"""URIs to bytes, files and filesystems, in one place: local paths, file://, s3:// and http(s)://.

s3:// goes to AWS or to any S3-compatible server named by AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL (the AWS SDKs' variables, most specific first); an http:// endpoint means a
plain-HTTP connection. Region comes from AWS_REGION / AWS_DEFAULT_REGION, credentials from
the standard AWS chain; none of it is logged. Errors are `StorageError`s naming the URI.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import sys
import tempfile
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

from stfpm.errors import UserError

_CHUNK = 1 << 20
_HTTP_TIMEOUT_S = 60


class StorageError(OSError):
    """A URI could not be read or written; the message names the URI."""


class StorageNotFound(StorageError, FileNotFoundError):
    """Nothing exists at the URI."""


class ChecksumError(StorageError):
    """A transferred file does not have the expected checksum; nothing was kept."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def has_credentials(uri: str) -> bool:
    """s3://KEY:SECRET@bucket/...: credentials written into a URL, which would end up in
    messages, logs and the audit state; only the AWS chain (environment, profile, role) is used."""
    return "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]


def redact(uri: str) -> str:
    """`uri` with any credentials in it replaced by ***, fit to print or store."""
    if not has_credentials(uri):
        return uri
    scheme, rest = uri.split("://", 1)
    host, sep, path = rest.partition("/")
    return f"{scheme}://***@{host.rsplit('@', 1)[1]}{sep}{path}"


def refuse_credentials(uri: str, what: str = "") -> None:
    if has_credentials(uri):
        raise UserError(f"{what + ': ' if what else ''}{redact(uri)}: credentials in a URL are not accepted (they "
                        "would be printed and stored); give them as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                        "a profile or a role")


def join_uri(base: str, *parts: str) -> str:
    """`base`/part/...: the one way output keys (maps, overlays, table files, run folders,
    state, reports) are built. A part may hold several "/"-separated names but no empty
    name, ".", ".." or backslash, so the key stays under `base` whatever a model.json, run
    id or state file says; anything else is a UserError naming the part."""
    for part in parts:
        names = part.strip("/").split("/")
        if any(n in ("", ".", "..") or "\\" in n or "\0" in n for n in names):
            raise UserError(f"{part!r} cannot be a file or folder name under {base} "
                            "(empty, '.', '..' or a backslash); nothing is written outside the output")
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def printable_path(path: str) -> str:
    """A local path as valid UTF-8 text for tables, manifests and messages: bytes of a file
    name that are not UTF-8 (os gives them as surrogates) are written \\xNN. `readable_path`
    turns it back, so such a file is scored like any other instead of failing the run."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def readable_path(path: str) -> str:
    """The file `printable_path` made `path` from: itself when it exists, else with its \\xNN
    escapes turned back into the file name's bytes (when that file exists)."""
    if "\\x" not in path or os.path.lexists(path):
        return path
    raw = re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), path.encode("utf-8"))
    original = os.fsdecode(raw)
    return original if os.path.lexists(original) else path


def resolve_entry(entry: str, base: str) -> str:
    """A manifest or registry entry, relative ones taken relative to the folder `base`."""
    if entry.startswith(("/", "file://")):  # normalised: "d/../d/a.png" is "d/a.png"
        return printable_path(filesystem_for(entry)[1])
    if "://" in entry:  # s3:// keys are taken literally; other schemes fail when read
        return redact(entry)  # credentials in a URL are never stored (the read refuses the entry)
    if is_s3(base):
        return join_uri(base, entry)
    return printable_path(filesystem_for(posixpath.join(base, entry))[1])


def parent_uri(uri: str) -> str:
    """The folder (or prefix) holding `uri`; "." for a bare name."""
    return uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."


MODEL_CACHE = os.path.join(tempfile.gettempdir(), "stfpm-models")  # s3:// model directories, fetched (fetch_to_cache)


S3_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def set_s3_environment(endpoint: str | None = None, region: str | None = None) -> None:
    """An S3 endpoint and region given as options, into the environment this module, boto3
    and the workers of a local Ray read (`s3_settings` forwards them to a cluster)."""
    if endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
    if region:
        os.environ["AWS_REGION"] = os.environ["AWS_DEFAULT_REGION"] = region


def s3_settings() -> dict[str, str]:
    """The S3 endpoint and region variables that are set (never credentials)."""
    return {n: os.environ[n] for n in S3_SETTINGS if os.environ.get(n)}


def _s3_options() -> dict:
    options = {}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        if parsed.scheme:
            options["scheme"] = parsed.scheme
            endpoint = parsed.netloc + parsed.path.rstrip("/")
        options["endpoint_override"] = endpoint
    return options


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path without scheme): `bucket/key` for s3://, an absolute path otherwise.

    The S3FileSystem pickles, so it can be handed to Ray workers as it is. It opens files
    lazily (`allow_delayed_open`), which lets a small write be one PutObject instead of a
    three-request multipart upload: anomaly maps are many small objects.
    """
    refuse_credentials(uri)
    if is_s3(uri):
        return pafs.S3FileSystem(allow_delayed_open=True, **_s3_options()), uri[len("s3://"):]
    if uri.startswith("file://"):
        return pafs.LocalFileSystem(), unquote(urlparse(uri).path)
    if "://" in uri:
        raise ValueError(f"{redact(uri)}: unsupported scheme; use a local path, file://, s3:// or (to read) http(s)://")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


# pyarrow's names of the S3 errors the user fixes (credentials, bucket name), not retried
S3_USER_ERRORS = {"ACCESS_DENIED": "access denied: check the credentials and the bucket policy",
                  "INVALID_ACCESS_KEY_ID": "the access key id is not known: check the credentials",
                  "SIGNATURE_DOES_NOT_MATCH": "the secret key does not match the access key id: check the credentials",
                  "EXPIRED_TOKEN": "the session token has expired: renew the credentials",
                  "NO_SUCH_BUCKET": "no such bucket"}


def s3_user_error(exc: OSError, uri: str) -> UserError | None:
    """A UserError, one line naming `uri` and the fix, for an S3 failure the user causes."""
    text = str(exc)
    for code, meaning in S3_USER_ERRORS.items():
        if f"AWS Error {code}" in text or code.replace("_", "").lower() in text.replace(" ", "").lower():
            return UserError(f"{redact(uri)}: {meaning}")
    return None


@contextlib.contextmanager
def errors_name(uri: str):
    """Re-raise I/O failures (pyarrow's and urllib's are OSErrors) as StorageErrors naming `uri`;
    wrong credentials or a missing bucket as a UserError (s3_user_error)."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise StorageNotFound(f"{uri}: no such file or object") from exc
    except OSError as exc:
        raise s3_user_error(exc, uri) or StorageError(f"{uri}: {exc}") from None


_errors_name = errors_name


def check_output(uri: str) -> None:
    """Fail before any work when OUTPUT cannot be written to: on S3 a bucket that does not
    exist or that these credentials cannot reach (before, a missing bucket failed after every
    image was scored); locally a file in the way. UserErrors naming `uri`."""
    if not is_s3(uri):
        path = filesystem_for(uri)[1]
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f"{uri} is a file; the output is a folder")
        return
    fs, path = filesystem_for(uri)
    bucket = path.split("/", 1)[0]
    with errors_name(f"s3://{bucket}"):
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise UserError(f"{uri}: the bucket {bucket!r} does not exist; create it or name another output")


@contextlib.contextmanager
def _open_input(uri: str):
    """Yields (readable stream, size in bytes or None)."""
    if is_http(uri):
        with urllib.request.urlopen(uri, timeout=_HTTP_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            yield response, int(length) if length else None
        return
    fs, path = filesystem_for(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise StorageNotFound(f"{uri}: no such file or object")
    if info.type != pafs.FileType.File:
        raise StorageError(f"{uri}: not a file")
    with fs.open_input_stream(path) as stream:
        yield stream, info.size


def read_bytes(uri: str) -> bytes:
    with _errors_name(uri), _open_input(uri) as (stream, _):
        return stream.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri`. Local files appear whole or not at all (temp file + os.replace);
    an S3 object is replaced whole by nature."""
    if is_http(uri):
        raise ValueError(f"{uri}: cannot write to http(s)://")
    fs, path = filesystem_for(uri)
    with _errors_name(uri):
        if is_s3(uri):
            with fs.open_output_stream(path) as out:
                out.write(data)
            return
        with _atomic_local_file(Path(path)) as out:
            out.write(data)


@contextlib.contextmanager
def _atomic_local_file(dest: Path):
    """A binary file object that becomes `dest` only if the block completes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        os.fchmod(fd, _new_file_mode())  # mkstemp makes it 0600; other readers of the output need the umask's mode
        with os.fdopen(fd, "wb") as out:
            yield out
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_file_mode() -> int:
    """0o666 less the process umask, as open() would create a file (read without changing
    the umask where /proc says it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def download_file(uri: str, dest: Path, md5: str | None = None, progress: bool = False) -> Path:
    """Stream `uri` to the local file `dest` through a temp file beside it; with `md5`, a file
    whose checksum differs is deleted and ChecksumError raised. `progress` draws a bar on stderr."""
    dest = Path(dest)
    digest = hashlib.md5()
    with _errors_name(uri), _open_input(uri) as (stream, size), _atomic_local_file(dest) as out:
        bar = _ProgressBar(dest.name, size) if progress else None
        while chunk := stream.read(_CHUNK):
            out.write(chunk)
            digest.update(chunk)
            if bar:
                bar.advance(len(chunk))
        if bar:
            bar.close()
        if md5 is not None and digest.hexdigest() != md5.lower():
            raise ChecksumError(f"{uri}: md5 {digest.hexdigest()} differs from the expected {md5}")
    return dest


class _ProgressBar:
    def __init__(self, label: str, total: int | None):
        self.label, self.total, self.done, self.shown = label, total, 0, -1

    def advance(self, n: int) -> None:
        self.done += n
        step = self.done * 100 // self.total if self.total else self.done >> 20
        if step != self.shown:
            self.shown = step
            of = f" / {self.total / 1e6:.1f} MB ({step}%)" if self.total else " MB"
            sys.stderr.write(f"\rdownloading {self.label}: {self.done / 1e6:.1f}{of}")
            sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


def fetch_to_cache(uri: str, cache_dir: Path) -> Path:
    """A local path holding the file or directory at `uri`.

    Local paths and file:// come back as they are. s3:// and http(s):// are downloaded under
    `cache_dir` as `<hash of the URI>-<basename>`; an s3:// directory (a prefix, such as a model
    directory) is copied file by file. An S3 file already cached with the object's size and
    modification time is not fetched again; http(s) is always fetched (no cheap freshness check).
    """
    if not (is_s3(uri) or is_http(uri)):
        fs, path = filesystem_for(uri)
        with _errors_name(uri):
            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                raise StorageNotFound(f"{uri}: no such file or directory")
        return Path(path)
    name = urlparse(uri).path.rstrip("/").rsplit("/", 1)[-1] or "object"
    dest = Path(cache_dir) / f"{hashlib.sha256(uri.encode()).hexdigest()[:16]}-{name}"
    if is_http(uri):
        return download_file(uri, dest)
    fs, root = filesystem_for(uri.rstrip("/"))
    with _errors_name(uri):
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise StorageNotFound(f"{uri}: no such object or prefix")
        if info.type == pafs.FileType.File:
            _fetch_s3_file(info, dest)
            return dest
        for item in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
            if item.type == pafs.FileType.File:
                _fetch_s3_file(item, dest / os.path.relpath(item.path, root))
    return dest


def _fetch_s3_file(info: pafs.FileInfo, dest: Path) -> None:
    """Download one object unless `dest` already matches its size and modification time,
    which it is then stamped with."""
    if dest.is_file() and dest.stat().st_size == info.size and dest.stat().st_mtime_ns == info.mtime_ns:
        return
    download_file(f"s3://{info.path}", dest)
    os.utime(dest, ns=(info.mtime_ns, info.mtime_ns))


def upload_dir(local_dir: Path, uri: str) -> None:
    """Copy the files of a local directory (e.g. a model directory) under `uri`."""
    for path in sorted(Path(local_dir).rglob("*")):
        if path.is_file():
            write_bytes(uri.rstrip("/") + "/" + path.relative_to(local_dir).as_posix(), path.read_bytes())
