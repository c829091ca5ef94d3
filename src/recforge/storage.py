"""Storage: atomic local writes, and the same guarantees on object stores (s3://).

Local: every artifact recforge writes (prepared arrays, vocabularies, checkpoints, reports) goes
through `atomic_open` and friends: the bytes land in a temporary file in the same directory, are
flushed and fsync'd, and only then renamed over the final name. A reader sees the old file or the
new one, never a torn one, and a crash leaves at most a stray `.tmp-*` file that the next write ignores.

Remote (`s3://bucket/key`, any S3-compatible store: AWS S3, MinIO, SeaweedFS, Aliyun OSS): the
endpoint and credentials come from the standard environment variables that botocore reads
(AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION). A single object PUT is atomic on S3 (readers see the old object or the new
one), so files are put directly, with a Content-MD5 the server checks. A directory is many objects,
so `put_dir` uploads them and writes a commit marker (the sha256 and size of every file) last:
readers (`get_dir`, `exists`) treat a prefix without its marker as absent, and `get_dir` verifies
every sha256 before it renames the local copy into place. Transient failures (connection refused
or reset, timeouts, 5xx, throttling) are retried with capped exponential backoff; the final error
names the URI.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import fcntl
import hashlib
import io
import json
import os
import random
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back): files written through a
    temp file get the mode a plain open() would have given them."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = current_umask()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; rename it over `path` on success."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open supports 'wb' and 'w', not {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{target.name}-", dir=target.parent)
    try:
        # mkstemp creates 0600; give the file the permissions an ordinary open() would.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
        fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not supported on every platform, hence best effort.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class JSONFileError(ValueError):
    """A JSON file that cannot be parsed: truncated, empty, not UTF-8. The message names the file."""


def parse_json(data: bytes | str, where: str | Path) -> Any:
    """Parse the JSON bytes read from `where`; every failure names `where`, so one damaged file among
    many (a manifest, aliases.json, a commit marker) is found without a traceback."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as exc:
        raise JSONFileError(f"{where}: not UTF-8 text (byte {exc.start}: {exc.reason}); the file is damaged") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        what = "empty" if not text.strip() else f"not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})"
        raise JSONFileError(f"{where}: {what}; the file is truncated or damaged") from None


def read_json(path: str | Path) -> Any:
    return parse_json(Path(path).read_bytes(), path)


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` for the block; raise RuntimeError(`busy`) at once if it is held.

    The kernel drops the lock when its holder dies, so a killed process never leaves a stale lock
    behind. The holder's pid is written inside only so that `busy` can name it: `{pid}` in `busy`
    is replaced by it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="ascii") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise RuntimeError(busy.replace("{pid}", handle.read(32).strip() or "unknown")) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield


def check_relative(name: str, where: str | Path) -> str:
    """`name` as a path that stays inside its directory: relative, '/'-separated, no '..' or empty parts.

    Names listed in a manifest or commit marker come from the files themselves; one such as
    '../x' or '/etc/x' would make a reader hash or write outside the directory it was given.
    """
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"{where}: file name {name!r} does not stay inside the directory; refusing it")
    return name


def refuse_links(root: str | Path) -> None:
    """Refuse a directory tree holding symbolic links: copying one would copy whatever it points at
    (a file anywhere on the machine, a whole foreign directory) as if it were part of the tree."""
    for directory, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = Path(directory) / name
            if path.is_symlink():
                raise StorageError(f"{path} is a symbolic link; copy what it points at into {root} instead")


def save_array(path: str | Path, array: np.ndarray) -> None:
    """Save as .npy (memory-mappable with np.load(mmap_mode='r'))."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    write_bytes(path, buffer.getvalue())


def load_array(path: str | Path, mmap: bool = True) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# URIs: local paths (plain or file://) and S3-compatible object stores (s3://; s3a://, Hadoop's name, alike)
# ---------------------------------------------------------------------------------------------

COMMIT_MARKER = "_COMMITTED.json"
REMOTE_SCHEMES = ("s3", "s3a")
SINGLE_PUT_MAX = 64 << 20  # larger files go up as multipart uploads
TRANSFER_THREADS = 8
_T = TypeVar("_T")
# Error codes an S3-compatible server answers when it is overloaded or failed on its side.
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout",
                    "InternalError", "ServiceUnavailable", "ConditionalRequestConflict", "OperationAborted",
                    "BadGateway", "GatewayTimeout"}


class StorageError(OSError):
    """A storage operation that failed for good (retries spent, or bytes that do not verify)."""


class ConflictError(StorageError):
    """A compare-and-swap write lost: the object changed (or appeared) after it was read."""


def is_remote(uri: str | Path) -> bool:
    """Whether `uri` names an object store rather than a local (or mounted) path."""
    text = str(uri)
    return "://" in text and text.split("://", 1)[0].lower() in REMOTE_SCHEMES


def join(uri: str | Path, *parts: str) -> str | Path:
    """`uri`/part/...: a Path for local roots, a '/'-joined string for remote ones."""
    if is_remote(uri):
        return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts if p.strip("/"))])
    return _local(uri).joinpath(*[p for p in parts if p])


def _local(uri: str | Path) -> Path:
    text = str(uri)
    return Path(text[len("file://"):]) if text.startswith("file://") else Path(text)


def _bucket_key(uri: str | Path) -> tuple[str, str]:
    rest = str(uri).split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in the URI; write s3://BUCKET/path")
    return bucket, key.strip("/")


def _fs_path(uri: str | Path) -> str:
    bucket, key = _bucket_key(uri)
    return f"{bucket}/{key}" if key else bucket


_FILESYSTEMS: dict[tuple[Any, ...], Any] = {}


def _s3() -> Any:
    """One s3fs filesystem per process and configuration, built from the environment.

    s3fs's and botocore's own retries are turned off so that `_retry` alone decides (one policy,
    one clear final error). Listing caches are off: the registry must see other processes' writes.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    style = os.environ.get("RECFORGE_S3_ADDRESSING_STYLE")  # "virtual" for Aliyun OSS
    key = (os.getpid(), endpoint, region, style, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        import s3fs

        client_kwargs: dict[str, Any] = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint  # explicit: older botocore ignores the variable
        if region:
            client_kwargs["region_name"] = region
        config_kwargs: dict[str, Any] = {"retries": {"max_attempts": 1, "mode": "standard"},
                                         "connect_timeout": 10, "read_timeout": 120}
        if style:
            config_kwargs["s3"] = {"addressing_style": style}
        fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False,
                               client_kwargs=client_kwargs, config_kwargs=config_kwargs)
        fs.retries = 1
        _FILESYSTEMS[key] = fs
    return fs


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _http_status(exc: BaseException) -> tuple[str, int]:
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return "", 0
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _transient(exc: BaseException) -> bool:
    """Whether trying again later may succeed: network trouble, timeouts, 5xx, throttling."""
    try:
        from botocore import exceptions as bex
        from botocore.parsers import ResponseParserError

        boto_transient: tuple[type[BaseException], ...] = (bex.ConnectionError, bex.HTTPClientError,
                                                           ResponseParserError, bex.IncompleteReadError)
    except ImportError:  # pragma: no cover - s3fs always brings botocore
        boto_transient = ()
    for item in _chain(exc):
        if isinstance(item, (FileNotFoundError, FileExistsError, PermissionError)):
            return False
        if isinstance(item, (ConnectionError, TimeoutError, socket.timeout, *boto_transient)):
            return True
        if type(item).__name__ in ("ClientConnectionError", "ServerDisconnectedError", "ClientPayloadError",
                                   "FSTimeoutError", "ClientOSError"):
            return True
        code, status = _http_status(item)
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return True
    return False


def _precondition_failed(exc: BaseException) -> bool:
    for item in _chain(exc):
        if isinstance(item, FileExistsError):
            return True
        code, status = _http_status(item)
        if code == "PreconditionFailed" or status == 412:
            return True
    return False


def _not_found(exc: BaseException) -> bool:
    for item in _chain(exc):
        if isinstance(item, FileNotFoundError):
            return True
        code, status = _http_status(item)
        if code in ("NoSuchKey", "NotFound", "404") or status == 404:
            return True
    return False


def retry_attempts() -> int:
    """Attempts per remote operation (RECFORGE_STORAGE_RETRIES, default 6: about 6 s of backoff in all)."""
    try:
        return max(1, int(os.environ.get("RECFORGE_STORAGE_RETRIES", "6")))
    except ValueError:
        return 6


def _retry(action: str, uri: str | Path, fn: Callable[[], _T], *, base_s: float = 0.2, cap_s: float = 5.0) -> _T:
    """Run `fn`, retrying transient failures with capped, jittered exponential backoff."""
    attempts = retry_attempts()
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if not _transient(exc):
                if _not_found(exc):
                    raise FileNotFoundError(f"{uri} does not exist") from exc
                if isinstance(exc, StorageError):
                    raise
                raise StorageError(f"{action} {uri} failed: {type(exc).__name__}: {exc}") from exc
            if attempt == attempts - 1:
                endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
                first_line = str(exc).splitlines()[0] if str(exc) else ""
                raise StorageError(f"{action} {uri} failed after {attempts} attempts ({type(exc).__name__}: "
                                   f"{first_line}); is the store at {endpoint} reachable? "
                                   "(attempts: RECFORGE_STORAGE_RETRIES)") from exc
            time.sleep(min(cap_s, base_s * 2**attempt) * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")  # noqa: S324 - S3's integrity header


def _put_object(uri: str | Path, data: bytes, **conditions: str) -> str:
    """One PUT with a Content-MD5 the server verifies; returns the ETag."""
    bucket, key = _bucket_key(uri)

    def put() -> str:
        response = _s3().call_s3("put_object", Bucket=bucket, Key=key, Body=data, ContentMD5=_md5_b64(data),
                                 **conditions)
        return str(response.get("ETag", ""))

    return _retry("upload to", uri, put)


def put_bytes(uri: str | Path, data: bytes, *, expected_etag: str | None = None, expect_absent: bool = False) -> str:
    """Make `uri` hold `data`; readers see the old bytes or the new ones. Returns the new ETag (remote).

    With `expected_etag` (from `get_with_etag`) or `expect_absent`, the write is a compare-and-swap
    on an object store (If-Match / If-None-Match): ConflictError if someone else wrote meanwhile.
    Local files are written unconditionally (local callers serialize with a lock file).
    """
    if not is_remote(uri):
        write_bytes(_local(uri), data)
        return ""
    conditions = {"IfMatch": expected_etag} if expected_etag else {"IfNoneMatch": "*"} if expect_absent else {}
    try:
        return _put_object(uri, data, **conditions)
    except Exception as exc:
        if conditions and _precondition_failed(exc):
            raise ConflictError(f"{uri} was changed by another writer since it was read; run the operation "
                                "again") from exc
        raise


def get_with_etag(uri: str | Path) -> tuple[bytes, str]:
    """The bytes at `uri` and their ETag (empty for local files), for a later compare-and-swap `put_bytes`."""
    if not is_remote(uri):
        return _local(uri).read_bytes(), ""
    bucket, key = _bucket_key(uri)

    def get() -> tuple[bytes, str]:
        fs = _s3()

        async def read() -> tuple[bytes, str]:
            # One GET gives the bytes and the ETag they belong to (a HEAD then a GET could straddle a write).
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                return await body.read(), str(response.get("ETag", ""))
            finally:
                body.close()

        from fsspec.asyn import sync

        return sync(fs.loop, read)

    try:
        return _retry("download of", uri, get)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} does not exist") from None


def get_bytes(uri: str | Path) -> bytes:
    """The bytes at `uri`; FileNotFoundError if there is no such file."""
    if not is_remote(uri):
        return _local(uri).read_bytes()
    try:
        return _retry("download of", uri, lambda: bytes(_s3().cat_file(_fs_path(uri))))
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} does not exist") from None


def create_if_absent(uri: str | Path, data: bytes) -> bool:
    """Create `uri` holding `data` only if nothing is there (S3: PUT with If-None-Match: *); False if it was.

    A retried PUT whose first attempt did succeed (the reply was lost) finds its own bytes in place:
    `data` should carry a unique token so that case counts as ours.
    """
    if not is_remote(uri):
        path = _local(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return True
    try:
        _put_object(uri, data, IfNoneMatch="*")
    except Exception as exc:
        if not _precondition_failed(exc):
            raise
        try:
            return get_bytes(uri) == data
        except FileNotFoundError:
            return False
    return True


_CONDITIONAL_OK: dict[tuple[str | None, str], bool] = {}


def honours_conditional_create(uri: str | Path) -> bool:
    """Whether the store behind `uri` refuses a second PUT with If-None-Match: * (probed once per bucket).

    Claims and locks rely on it; a store that silently ignores the header would let two writers
    both "win", so callers check this before trusting `create_if_absent`.
    """
    if not is_remote(uri):
        return True
    bucket, key = _bucket_key(uri)
    cache_key = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"), bucket)
    if cache_key not in _CONDITIONAL_OK:
        probe = join(uri, f".recforge-probe-{os.getpid()}-{random.getrandbits(64):016x}")
        try:
            first = create_if_absent(probe, b"first")
            second = create_if_absent(probe, b"second")
            _CONDITIONAL_OK[cache_key] = first and not second and get_bytes(probe) == b"first"
        finally:
            delete(probe)
    return _CONDITIONAL_OK[cache_key]


def exists(uri: str | Path) -> bool:
    """Whether a file, or a committed directory (see `put_dir`), is at `uri`; uncommitted prefixes are not."""
    if not is_remote(uri):
        return _local(uri).exists()
    return _is_object(uri) or _is_object(join(uri, COMMIT_MARKER))


def _is_object(uri: str | Path) -> bool:
    # HEAD, not fs.isfile: isfile answers False when the store cannot be reached at all.
    bucket, key = _bucket_key(uri)
    if not key:
        return False
    try:
        _retry("lookup of", uri, lambda: _s3().call_s3("head_object", Bucket=bucket, Key=key))
    except FileNotFoundError:
        return False
    return True


def list_dir(uri: str | Path) -> list[str]:
    """Names of the immediate children of `uri` (files and sub-prefixes), sorted; [] if there are none."""
    if not is_remote(uri):
        directory = _local(uri)
        return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    fs = _s3()

    def ls() -> list[str]:
        try:
            return sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(_fs_path(uri), detail=False))
        except FileNotFoundError:
            return []

    return _retry("listing of", uri, ls)


def list_tree(uri: str | Path) -> list[tuple[str, int]]:
    """Every object under the prefix `uri` as (name relative to it, size), sorted by name; [] if none."""
    fs = _s3()
    root = _fs_path(uri).rstrip("/")

    def find() -> dict[str, Any]:
        try:
            return fs.find(root, detail=True)
        except FileNotFoundError:
            return {}

    found = _retry("listing of", uri, find)
    # A URI naming one object lists that object, under its own name.
    entries = [(key[len(root):].lstrip("/") or key.rsplit("/", 1)[-1], int(info.get("size") or 0))
               for key, info in found.items() if info.get("type", "file") != "directory"]
    return sorted(entries)


def read_head(uri: str | Path, nbytes: int) -> bytes:
    """The first `nbytes` of an object (fewer if it is shorter): enough to sniff a format or a header."""
    if not is_remote(uri):
        with open(_local(uri), "rb") as handle:
            return handle.read(nbytes)
    fs = _s3()
    return _retry("read of", uri, lambda: fs.cat_file(_fs_path(uri), start=0, end=nbytes))


def delete(uri: str | Path) -> None:
    """Remove the file at `uri` if present."""
    if not is_remote(uri):
        with contextlib.suppress(FileNotFoundError):
            _local(uri).unlink()
        return
    bucket, key = _bucket_key(uri)
    _retry("delete of", uri, lambda: _s3().call_s3("delete_object", Bucket=bucket, Key=key))


def delete_dir(uri: str | Path) -> None:
    """Remove a directory and everything under it; its commit marker goes first, so readers stop seeing it."""
    if not is_remote(uri):
        shutil.rmtree(_local(uri), ignore_errors=True)
        return
    delete(join(uri, COMMIT_MARKER))
    fs = _s3()
    keys = _retry("listing of", uri, lambda: fs.find(_fs_path(uri)))
    if keys:
        _retry("delete of", uri, lambda: fs.rm(keys))
    # Stores with real directories (SeaweedFS) keep emptied ones listed until their "dir/" key goes;
    # elsewhere deleting a missing key is a no-op. Deepest first.
    bucket, key = _bucket_key(uri)
    folders = {key}
    for full in keys:
        parent = full.split("/", 1)[1].rsplit("/", 1)[0]
        while parent.startswith(f"{key}/") and parent not in folders:
            folders.add(parent)
            parent = parent.rsplit("/", 1)[0]
    for folder in sorted(folders, key=lambda f: -f.count("/")):
        with contextlib.suppress(FileNotFoundError):
            _retry("delete of", f"s3://{bucket}/{folder}/",
                   lambda folder=folder: _s3().call_s3("delete_object", Bucket=bucket, Key=f"{folder}/"))


def _file_entries(root: Path, skip: str) -> dict[str, dict[str, Any]]:
    return {path.relative_to(root).as_posix(): {"sha256": sha256_file(path), "size": path.stat().st_size}
            for path in sorted(root.rglob("*")) if path.is_file() and path.relative_to(root).as_posix() != skip}


def _upload_file(src: Path, uri: str | Path) -> None:
    size = src.stat().st_size
    if size <= SINGLE_PUT_MAX:
        _put_object(uri, src.read_bytes())
        return
    fs = _s3()  # multipart: each part is checksummed by botocore; the total size is checked here
    _retry("upload to", uri, lambda: fs.put_file(str(src), _fs_path(uri)))
    remote_size = _retry("lookup of", uri, lambda: fs.info(_fs_path(uri))["size"])
    if remote_size != size:
        raise StorageError(f"upload to {uri} stored {remote_size} bytes, not {size}; upload again")


def put_file(src: str | Path, uri: str | Path) -> None:
    """Copy one local file to `uri`, verified (local: sha256 of the copy; S3: Content-MD5 / size)."""
    src = Path(src)
    if is_remote(uri):
        _upload_file(src, uri)
        return
    expected = sha256_file(src)
    with atomic_open(_local(uri), "wb") as handle, open(src, "rb") as source:
        shutil.copyfileobj(source, handle, 1 << 20)
    if sha256_file(_local(uri)) != expected:
        raise StorageError(f"copy of {src} to {uri} does not match its source; copy again")


def get_file(uri: str | Path, dst: str | Path) -> Path:
    """Download one file to `dst` atomically (temp sibling, then rename); returns `dst`."""
    dst = Path(dst)
    if not is_remote(uri):
        put_file(_local(uri), dst)
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{dst.name}-", dir=dst.parent)
    os.close(fd)
    try:
        fs = _s3()
        _retry("download of", uri, lambda: fs.get_file(_fs_path(uri), tmp))
        info = _retry("lookup of", uri, lambda: fs.info(_fs_path(uri)))
        etag = str(info.get("ETag", "")).strip('"')
        if Path(tmp).stat().st_size != int(info["size"]):
            raise StorageError(f"download of {uri} is {Path(tmp).stat().st_size} bytes, not {info['size']}")
        if etag and "-" not in etag and len(etag) == 32:  # a single-part ETag is the MD5 of the bytes
            digest = hashlib.md5(Path(tmp).read_bytes()).hexdigest()  # noqa: S324
            if digest != etag:
                raise StorageError(f"download of {uri} does not match its ETag; download again")
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dst


def _parallel(jobs: list[Callable[[], None]]) -> None:
    if len(jobs) <= 1:
        for job in jobs:
            job()
        return
    with concurrent.futures.ThreadPoolExecutor(min(TRANSFER_THREADS, len(jobs))) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


def put_dir(src: str | Path, uri: str | Path, *, extra: Mapping[str, bytes] | None = None,
            marker: str = COMMIT_MARKER) -> None:
    """Copy directory `src` (plus `extra` small files) to `uri`, visible to readers only once complete.

    The marker, written last, lists every file's sha256 and size; `get_dir` checks them. Local: the
    copy is built in a temporary sibling and renamed into place. Remote: the objects go under the
    prefix, then the marker; replacing an existing directory first removes its marker, so a reader
    never takes a mixture of old and new files for a committed directory.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a directory")
    refuse_links(src)
    extra = dict(extra or {})
    entries = _file_entries(src, marker)
    for name, data in extra.items():
        entries[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    record = (json.dumps({"format": 1, "files": entries, "committed_unix": time.time()}, indent=1,
                         sort_keys=True) + "\n").encode("utf-8")
    if not is_remote(uri):
        _put_local_dir(src, _local(uri), extra, marker, entries, record)
        return
    replacing = exists(join(uri, marker))
    if replacing:
        delete(join(uri, marker))
    jobs: list[Callable[[], None]] = [
        (lambda rel=rel: _upload_file(src / rel, join(uri, rel))) for rel in entries if rel not in extra]
    jobs += [(lambda name=name, data=data: _put_object(join(uri, name), data)) for name, data in extra.items()]
    _parallel(jobs)
    if replacing:  # files of the old directory that the new one does not have
        prefix = _fs_path(uri) + "/"
        stale = [k for k in _retry("listing of", uri, lambda: _s3().find(_fs_path(uri)))
                 if k[len(prefix):] not in entries and not k[len(prefix):].startswith(".")]
        if stale:
            _retry("delete of", uri, lambda: _s3().rm(stale))
    _put_object(join(uri, marker), record)


def _put_local_dir(src: Path, target: Path, extra: Mapping[str, bytes], marker: str,
                   entries: Mapping[str, Mapping[str, Any]], record: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    old: Path | None = None
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        shutil.copytree(src, tmp, symlinks=True, dirs_exist_ok=True,
                        ignore=lambda d, names: [marker] if Path(d) == src else [])
        for name, data in extra.items():
            write_bytes(tmp / name, data)
        _verify_tree(tmp, entries, str(target))
        write_bytes(tmp / marker, record)
        if target.exists() and any(target.iterdir()):
            old = target.with_name(f".tmp-{target.name}-old-{os.getpid()}")
            os.rename(target, old)
        elif target.exists():
            target.rmdir()
        os.rename(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _verify_tree(root: Path, entries: Mapping[str, Mapping[str, Any]], where: str) -> None:
    for rel, entry in entries.items():
        path = root / rel
        if not path.is_file():
            raise StorageError(f"{where}: {rel} is listed in the commit marker but missing")
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise StorageError(f"{where}: {rel} does not match its sha256 in the commit marker "
                               "(corrupted or changed after upload); upload it again")


def read_marker(uri: str | Path, marker: str = COMMIT_MARKER) -> dict[str, Any]:
    """The commit record of a directory; FileNotFoundError if it was never (completely) uploaded."""
    try:
        record = parse_json(get_bytes(join(uri, marker)), join(uri, marker))
    except FileNotFoundError:
        raise FileNotFoundError(f"no committed directory at {uri} ({marker} is missing: the upload never "
                                "finished, or the path is wrong)") from None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict):
        raise StorageError(f"{join(uri, marker)}: no 'files' table; the commit marker is damaged")
    for name in files:
        check_relative(name, join(uri, marker))
    return record


def get_dir(uri: str | Path, dst: str | Path, *, marker: str = COMMIT_MARKER) -> Path:
    """Download a committed directory into `dst` and verify every sha256; `dst` appears only when complete.

    `dst` must not exist yet (or be empty); if another process filled it first, FileExistsError.
    A local source without a marker (a plain directory) is copied and hashed as it is.
    """
    dst = Path(dst)
    remote = is_remote(uri)
    if remote:
        entries = read_marker(uri, marker)["files"]
    else:
        source = _local(uri)
        refuse_links(source)
        entries = read_marker(source, marker)["files"] if (source / marker).is_file() \
            else _file_entries(source, marker)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dst.name}-", dir=dst.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        for rel in entries:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        if remote:
            fs = _s3()
            _parallel([(lambda rel=rel: _retry("download of", join(uri, rel),
                                               lambda: fs.get_file(_fs_path(join(uri, rel)), str(tmp / rel))))
                       for rel in entries])
        else:
            for rel in entries:
                shutil.copyfile(source / rel, tmp / rel)
        _verify_tree(tmp, entries, str(uri))
        write_json(tmp / marker, {"format": 1, "files": entries, "source": str(uri)})
        if dst.exists() and not any(dst.iterdir()):
            dst.rmdir()
        try:
            os.rename(tmp, dst)
        except OSError as exc:
            if dst.exists():
                raise FileExistsError(f"{dst} already exists") from exc
            raise
        fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
