"""A versioned model registry: numbered, immutable bundle versions plus movable aliases.

Layout under a registry root::

    <root>/<model>/versions/<N>/        a verified copy of a bundle, N = 1, 2, 3 ...
    <root>/<model>/versions/<N>/registry.json   when, by whom and why it was published
    <root>/<model>/versions/<N>/COMMITTED       written last: without it the version does not exist
    <root>/<model>/aliases.json          {"production": N, "canary": M}
    <root>/<model>/history.jsonl         one JSON object per alias move (time, alias, from, to, reason, user)

The root is a local directory or an object-store URI (``s3://bucket/prefix``, see storage.py). On
an object store a version slot is claimed by ``<N>/.claim`` (conditional PUT, ``If-None-Match: *``),
COMMITTED holds the sha256 of every file and is uploaded last, and the history is one object per
move (``<model>/history/<seq>.json``, itself created conditionally), listed in order.

Why it is shaped this way:

* A version number is claimed by creating its slot with an operation that fails if the slot exists
  (``os.mkdir`` locally), so concurrent publishers never share a number; the loser retries with the
  next one. Numbers can therefore have gaps (a crashed publisher's slot stays claimed), never duplicates.
* A version becomes visible only once its ``COMMITTED`` marker exists, and the marker is written after
  every other file, so a half-copied version is never listed, resolved or promoted.
* Alias moves take a lock file created exclusively (with a stale-lock timeout, so a crashed promoter
  does not wedge the registry forever) and replace ``aliases.json`` atomically; every move is
  recorded in the history, which is what ``rollback`` reads. A history line damaged outside
  recforge is reported by its line number and skipped; the next record still starts a line of its own.
* Publish and promote check a version holds exactly its manifest's files (plus the registry's own
  records) and no symbolic links, so what serves is exactly what was hashed.
* Every file access goes through :class:`RegistryStore`: :class:`LocalStore` for directories,
  :class:`S3Store` for object stores (conditional puts for claims, locks and history events, a
  multi-object upload with the marker last). The logic above it is shared, so both behave alike.
* On an object store, `resolve` returns a local copy, downloaded once into the cache
  (RECFORGE_CACHE, default ~/.cache/recforge) with every sha256 checked, and renamed into place
  so concurrent processes never see a partial copy. Versions are immutable, so the copy stays valid.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from recforge import storage
from recforge.storage import fsync_dir, parse_json, write_bytes

COMMITTED = "COMMITTED"
VERSION_META = "registry.json"
ALIASES = "aliases.json"
HISTORY = "history.jsonl"
LOCK = ".aliases.lock"
CLAIM = ".claim"
GC_AFTER_S = 3600.0
DEFAULT_ALIAS = "production"
LOCK_STALE_AFTER_S = 60.0
LOCK_WAIT_S = 30.0
# What a registry adds beside a bundle's own files in a version directory.
_VERSION_FILES = (COMMITTED, VERSION_META, storage.COMMIT_MARKER)
MANIFEST = "manifest.json"  # bundle.MANIFEST; bundle is imported only where a bundle is loaded or verified
# Matched with fullmatch: `$` would also accept a name ending in a newline.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_NUMBER = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() also accepts '²'
_log = logging.getLogger(__name__)


def _is_number(text: str) -> bool:
    return _NUMBER.fullmatch(text) is not None


class RegistryError(ValueError):
    """A registry request that cannot be honoured: unknown model/version/alias, nothing to roll back."""


class RegistryStore(Protocol):
    """The few storage operations the registry needs, addressed by '/'-separated keys.

    Kept this small so that an object store can implement it: `create_if_absent` maps to a
    conditional put, `put_dir` to an upload with the commit marker last, `replace` to a plain put.
    """

    def put_dir(self, src: Path, key: str, extra: Mapping[str, bytes]) -> None:
        """Copy directory `src` (plus `extra` files) to the claimed slot `key`; COMMITTED goes last."""
        ...

    def get(self, key: str) -> bytes:
        """The bytes at `key`; FileNotFoundError if absent."""
        ...

    def exists(self, key: str) -> bool:
        """Whether a file exists at `key`."""
        ...

    def list(self, prefix: str) -> list[str]:
        """Names of the immediate children under `prefix` (empty if there is none)."""
        ...

    def create_if_absent(self, key: str, data: bytes | None = None) -> bool:
        """Atomically create `key` (a file with `data`, or an empty slot when data is None); False if it exists."""
        ...

    def replace(self, key: str, data: bytes) -> None:
        """Atomically make `key` hold `data`: readers see the old bytes or the new ones."""
        ...

    def delete(self, key: str) -> None:
        """Remove the file at `key` if present."""
        ...

    def local_path(self, key: str) -> Path:
        """A local directory holding `key`'s files, for bundle loading (a verified cached copy if remote)."""
        ...

    def where(self, key: str) -> str:
        """Where `key` lives, for people to read (a path or a URI); fetches nothing."""
        ...

    def verify(self, key: str) -> None:
        """Re-check the stored bytes of version directory `key` against its checksums, as they are now."""
        ...

    def append_event(self, key: str, data: bytes) -> None:
        """Append one record to the log `key` (the caller holds the alias lock)."""
        ...

    def events(self, key: str) -> list[bytes]:
        """The records of log `key`, oldest first."""
        ...

    def claim_age(self, key: str) -> float | None:
        """Seconds since slot `key` was claimed (None if unknown)."""
        ...

    def delete_tree(self, key: str) -> None:
        """Remove slot `key` and everything in it."""
        ...


class LocalStore:
    """RegistryStore on a local (or mounted) directory, using POSIX atomicity guarantees."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*[part for part in key.split("/") if part])

    def put_dir(self, src: Path, key: str, extra: Mapping[str, bytes]) -> None:
        """Copy into a temporary sibling, write the marker last, then rename onto the claimed empty slot.

        rename(2) replaces an empty directory atomically, so the slot goes from "claimed, empty"
        straight to "complete"; a crash leaves only an ignored `.tmp-*` sibling.
        """
        target = self._path(key)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        try:
            os.chmod(tmp, 0o755)
            storage.refuse_links(src)
            shutil.copytree(src, tmp, symlinks=True, dirs_exist_ok=True)
            for name, data in extra.items():
                write_bytes(tmp / name, data)
            write_bytes(tmp / COMMITTED, b"")
            os.rename(tmp, target)
            fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        directory = self._path(prefix)
        return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []

    def create_if_absent(self, key: str, data: bytes | None = None) -> bool:
        path = self._path(key)
        if data is not None:
            return storage.create_if_absent(str(path), data)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path)
        except FileExistsError:
            return False
        return True

    def replace(self, key: str, data: bytes) -> None:
        write_bytes(self._path(key), data)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def where(self, key: str) -> str:
        return str(self._path(key))

    def verify(self, key: str) -> None:
        path = self._path(key)
        bundle = _bundle()
        bundle.verify_bundle(path, bundle.read_manifest(path), exact=True, allowed_extra=_VERSION_FILES)

    def append_event(self, key: str, data: bytes) -> None:
        # Rewritten whole (atomically) rather than appended in place: a torn append cannot happen.
        # A last line torn outside recforge gets its newline first, so the new record stays a line of its own.
        path = self._path(key)
        old = path.read_bytes() if path.is_file() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        write_bytes(path, old + data.rstrip(b"\n") + b"\n")

    def events(self, key: str) -> list[bytes]:
        # Every line, blank ones included, so a record's position is its line number in the file.
        path = self._path(key)
        return path.read_bytes().splitlines() if path.is_file() else []

    def claim_age(self, key: str) -> float | None:
        try:
            return time.time() - self._path(key).stat().st_mtime
        except FileNotFoundError:
            return None

    def delete_tree(self, key: str) -> None:
        shutil.rmtree(self._path(key), ignore_errors=True)


def cache_dir() -> Path:
    """Where local copies of remote registry versions are kept (RECFORGE_CACHE, default ~/.cache/recforge)."""
    return Path(os.environ.get("RECFORGE_CACHE") or Path.home() / ".cache" / "recforge")


class S3Store:
    """RegistryStore on an S3-compatible object store (`s3://bucket/prefix`).

    Claims, locks and history events are conditional PUTs (If-None-Match: *), so exactly one
    concurrent writer wins each; a version is the objects under its prefix plus COMMITTED (the
    sha256 of every file), uploaded last. Stores that ignore If-None-Match would break the claim
    guarantee: SeaweedFS, MinIO and AWS S3 honour it (tests/test_registry_s3.py races real processes).
    """

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        # ETag of each key as this store last read it (None: read as absent). `replace` writes only if
        # the object is still that version, so aliases.json cannot lose a move even if a promoter
        # held the alias lock past its expiry and another one broke it.
        self._seen: dict[str, str | None] = {}

    def _uri(self, key: str) -> str:
        return str(storage.join(self.root, key))

    def put_dir(self, src: Path, key: str, extra: Mapping[str, bytes]) -> None:
        storage.put_dir(src, self._uri(key), extra=extra, marker=COMMITTED)

    def get(self, key: str) -> bytes:
        try:
            data, self._seen[key] = storage.get_with_etag(self._uri(key))
        except FileNotFoundError:
            self._seen[key] = None
            raise
        return data

    def exists(self, key: str) -> bool:
        return storage.exists(self._uri(key))

    def list(self, prefix: str) -> list[str]:
        return storage.list_dir(self._uri(prefix))

    def create_if_absent(self, key: str, data: bytes | None = None) -> bool:
        if not storage.honours_conditional_create(self.root):
            raise RegistryError(f"the object store behind {self.root} ignores If-None-Match (conditional PUT), "
                                "so concurrent publishers could share a version number; use a store that "
                                "supports it (AWS S3, MinIO, SeaweedFS) or a shared directory")
        if data is None:
            claim = {"token": uuid.uuid4().hex, "unix": time.time(), "user": _user(), "pid": os.getpid()}
            return storage.create_if_absent(self._uri(f"{key}/{CLAIM}"), json.dumps(claim).encode("utf-8"))
        return storage.create_if_absent(self._uri(key), data)

    def replace(self, key: str, data: bytes) -> None:
        if key not in self._seen:
            storage.put_bytes(self._uri(key), data)
            return
        seen = self._seen[key]
        self._seen[key] = storage.put_bytes(self._uri(key), data, expected_etag=seen, expect_absent=seen is None)

    def delete(self, key: str) -> None:
        storage.delete(self._uri(key))

    def local_path(self, key: str) -> Path:
        """A verified copy in the cache, keyed by registry URI and key (model/versions/N)."""
        root_id = hashlib.sha256(self.root.encode("utf-8")).hexdigest()[:16]
        local = cache_dir().joinpath("registry", root_id, *key.split("/"))
        if not (local / COMMITTED).is_file():
            with contextlib.suppress(FileExistsError):  # another process cached it first: same bytes
                storage.get_dir(self._uri(key), local, marker=COMMITTED)
        return local

    def where(self, key: str) -> str:
        return self._uri(key)

    def verify(self, key: str) -> None:
        # A fresh download, not the cache: what matters is whether the stored bytes are intact now.
        with tempfile.TemporaryDirectory(prefix="recforge-verify-") as tmp:
            local = storage.get_dir(self._uri(key), Path(tmp) / "v", marker=COMMITTED)
            bundle = _bundle()
            bundle.verify_bundle(local, bundle.read_manifest(local), exact=True, allowed_extra=_VERSION_FILES)

    def _log_prefix(self, key: str) -> str:
        return key[: -len(".jsonl")] if key.endswith(".jsonl") else f"{key}.d"

    def append_event(self, key: str, data: bytes) -> None:
        prefix = self._log_prefix(key)
        number = len(self.events(key)) + 1
        while not storage.create_if_absent(self._uri(f"{prefix}/{number:08d}.json"), data.rstrip(b"\n") + b"\n"):
            number += 1

    def events(self, key: str) -> list[bytes]:
        prefix = self._log_prefix(key)
        names = sorted(n for n in self.list(prefix) if n.endswith(".json") and n[:-5].isdigit())
        return [self.get(f"{prefix}/{name}") for name in names]

    def claim_age(self, key: str) -> float | None:
        try:
            return time.time() - float(parse_json(self.get(f"{key}/{CLAIM}"), self._uri(f"{key}/{CLAIM}"))
                                       .get("unix", 0.0))
        except (FileNotFoundError, ValueError, AttributeError):
            return None

    def delete_tree(self, key: str) -> None:
        storage.delete_dir(self._uri(key))


@dataclass(frozen=True)
class VersionInfo:
    """One committed version as `list_versions` reports it."""

    number: int
    created: str
    note: str
    kind: str
    user: str
    metrics: dict[str, float] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bundle() -> ModuleType:
    """The bundle module, imported on first use: it pulls in torch, which listing and history do not need."""
    from recforge import bundle

    return bundle


def _store(root: str | Path | RegistryStore) -> RegistryStore:
    if isinstance(root, (str, Path)):
        return S3Store(str(root)) if storage.is_remote(root) else LocalStore(root)
    return root


def _check_name(model_name: str) -> str:
    # The name becomes a path component: refuse anything that could climb out of the registry root.
    if not isinstance(model_name, str) or not _NAME.fullmatch(model_name):
        raise RegistryError(f"invalid model name {model_name!r}: use letters, digits, '.', '_' or '-'")
    return model_name


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _user() -> str:
    try:
        return os.environ.get("RECFORGE_USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _committed(store: RegistryStore, model: str) -> list[int]:
    """Version numbers whose COMMITTED marker exists; claimed or half-copied slots are skipped."""
    numbers = [int(name) for name in store.list(f"{model}/versions") if _is_number(name)]
    return sorted(n for n in numbers if store.exists(f"{model}/versions/{n}/{COMMITTED}"))


def _read_json(store: RegistryStore, key: str, default: Any) -> Any:
    try:
        data = store.get(key)
    except FileNotFoundError:
        return default
    return parse_json(data, store.where(key))


def _aliases(store: RegistryStore, model: str) -> dict[str, int]:
    key = f"{model}/{ALIASES}"
    aliases = _read_json(store, key, {})
    if not isinstance(aliases, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in aliases.items()):
        raise RegistryError(f"{store.where(key)}: expected an object of alias -> version number; the file is damaged")
    return dict(aliases)


def _history(store: RegistryStore, model: str) -> list[dict[str, Any]]:
    """The alias moves, oldest first. A damaged record (torn or edited outside recforge) is reported by
    its line number and skipped; the others still count, so `history` and `rollback` keep working."""
    key = f"{model}/{HISTORY}"
    records = []
    for number, line in enumerate(store.events(key), 1):
        if not line.strip():
            continue
        try:
            record = parse_json(line, f"{store.where(key)} line {number}")
        except ValueError as exc:
            _log.warning("%s; skipping it", exc)
            continue
        if not isinstance(record, dict):
            _log.warning("%s line %d: not a history record; skipping it", store.where(key), number)
            continue
        records.append(record)
    return records


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys, so two configs or metric files compare key by key."""
    if isinstance(obj, Mapping):
        flat: dict[str, Any] = {}
        for key, value in obj.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: obj} if prefix else {"": obj}


def _numeric_metrics(store: RegistryStore, key: str) -> dict[str, float]:
    # Read through the store (one small object), so listing a remote registry downloads no bundles.
    flat = _flatten(_read_json(store, f"{key}/metrics.json", {}))
    return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def publish(root: str | Path | RegistryStore, bundle_dir: str | Path, model_name: str, note: str = "") -> int:
    """Verify `bundle_dir`, copy it in as the next version of `model_name`, and return its number.

    The bundle is fully loaded first (checksums, schema version, the model itself), so a bundle that
    could not serve is never stored. The number is claimed with a create-if-absent, so concurrent
    publishers get distinct numbers.
    """
    if storage.is_remote(bundle_dir):  # a bundle exported to the store: verified local copy first
        with tempfile.TemporaryDirectory(prefix="recforge-publish-") as tmp:
            local = storage.get_dir(bundle_dir, Path(tmp) / "bundle")
            return _publish(root, local, model_name, note, str(bundle_dir), (storage.COMMIT_MARKER,))
    return _publish(root, Path(bundle_dir), model_name, note, str(Path(bundle_dir).resolve()))


def _publish(root: str | Path | RegistryStore, bundle_dir: Path, model_name: str, note: str, source: str,
             allowed_extra: tuple[str, ...] = ()) -> int:
    store = _store(root)
    model = _check_name(model_name)
    bundle = _bundle()
    loaded = bundle.load_bundle(bundle_dir)  # verifies every listed file; raises BundleError with its own message
    # Exactly the manifest's files and no links: what is stored is then exactly what was hashed.
    bundle.check_only_listed(bundle_dir, loaded.manifest, allowed_extra)
    meta = {"published": _now(), "published_unix": time.time(), "note": note, "user": _user(),
            "source": source, "kind": loaded.kind,
            "bundle_model_name": loaded.manifest.get("model_name")}
    existing = [int(name) for name in store.list(f"{model}/versions") if _is_number(name)]
    number = max(existing, default=0) + 1
    while not store.create_if_absent(f"{model}/versions/{number}"):
        number += 1
    meta["version"] = number
    store.put_dir(Path(bundle_dir), f"{model}/versions/{number}",
                  {VERSION_META: (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8")})
    return number


def _require_model(store: RegistryStore, model: str) -> list[int]:
    """The committed versions; an unknown model is an error (checked before anything is written for it)."""
    committed = _committed(store, model)
    if not committed and not store.list(model):
        raise RegistryError(f"model {model!r} is not in the registry")
    return committed


def _parse_ref(store: RegistryStore, model: str, ref: str | int) -> int:
    committed = _require_model(store, model)
    text = str(ref).strip()
    if text == "latest":
        if not committed:
            raise RegistryError(f"model {model!r} has no published versions")
        return committed[-1]
    digits = text[1:] if text[:1] in ("v", "V") and text[1:].isdigit() else text
    if digits.isdigit():  # str.isdigit() also takes '²' or Arabic-Indic digits, which int() refuses
        if not _is_number(digits):
            raise RegistryError(f"invalid version {str(ref)!r} of {model!r}: write the number in ASCII digits "
                                "(1, 2, ...), an alias or 'latest'")
        number = int(digits)
        if number not in committed:
            raise RegistryError(f"model {model!r} has no version {number} (versions: "
                                f"{', '.join(map(str, committed)) or 'none'})")
        return number
    aliases = _aliases(store, model)
    if text not in aliases:
        raise RegistryError(f"model {model!r} has no alias {text!r} (aliases: {', '.join(sorted(aliases)) or 'none'}; "
                            "or give a version number or 'latest')")
    return aliases[text]


def resolve(root: str | Path | RegistryStore, model_name: str, version_or_alias: str | int = "latest") -> Path:
    """The directory of a committed version, named by number, alias or 'latest'."""
    store = _store(root)
    model = _check_name(model_name)
    return store.local_path(f"{model}/versions/{_parse_ref(store, model, version_or_alias)}")


def location(root: str | Path | RegistryStore, model_name: str, version_or_alias: str | int = "latest") -> str:
    """Where a committed version lives (a path or a URI), without fetching it."""
    store = _store(root)
    model = _check_name(model_name)
    return store.where(f"{model}/versions/{_parse_ref(store, model, version_or_alias)}")


def _info(store: RegistryStore, model: str, number: int, aliases: Mapping[str, int]) -> VersionInfo:
    key = f"{model}/versions/{number}"
    meta = _read_json(store, f"{key}/{VERSION_META}", {})
    return VersionInfo(number=number, created=str(meta.get("published", "")), note=str(meta.get("note", "")),
                       kind=str(meta.get("kind", "")), user=str(meta.get("user", "")),
                       metrics=_numeric_metrics(store, key),
                       aliases=sorted(a for a, n in aliases.items() if n == number), path=store.where(key))


def list_versions(root: str | Path | RegistryStore, model_name: str) -> list[VersionInfo]:
    """Every committed version, oldest first, with the aliases that point at it."""
    store = _store(root)
    model = _check_name(model_name)
    aliases = _aliases(store, model)
    return [_info(store, model, n, aliases) for n in _committed(store, model)]


def list_models(root: str | Path | RegistryStore) -> list[str]:
    """Model names that have at least one committed version."""
    store = _store(root)
    return [name for name in store.list("") if _NAME.fullmatch(name) and _committed(store, name)]


def show(root: str | Path | RegistryStore, model_name: str, version_or_alias: str | int = "latest") -> dict[str, Any]:
    """Everything about one version: registry record, manifest summary, metrics and aliases."""
    store = _store(root)
    model = _check_name(model_name)
    number = _parse_ref(store, model, version_or_alias)
    info = _info(store, model, number, _aliases(store, model))
    manifest = _read_json(store, f"{model}/versions/{number}/{MANIFEST}", {})
    return {**info.to_dict(), "model": model, "bundle_model_name": manifest.get("model_name"),
            "schema_version": manifest.get("schema_version"), "files": len(manifest.get("files", {})),
            "bundle_created_unix": manifest.get("created_unix"),
            "registry": _read_json(store, f"{model}/versions/{number}/{VERSION_META}", {})}


@contextlib.contextmanager
def _alias_lock(store: RegistryStore, model: str, stale_after: float | None = None,
                wait: float | None = None) -> Iterator[None]:
    """Serialize alias moves. A lock older than `stale_after` belonged to a crashed promoter and is broken."""
    stale_after = LOCK_STALE_AFTER_S if stale_after is None else stale_after
    wait = LOCK_WAIT_S if wait is None else wait
    key = f"{model}/{LOCK}"
    token = {"token": uuid.uuid4().hex, "pid": os.getpid(), "user": _user(), "unix": time.time()}
    deadline = time.monotonic() + wait
    while not store.create_if_absent(key, json.dumps(token).encode("utf-8")):
        try:
            held = parse_json(store.get(key), store.where(key))
        except (FileNotFoundError, ValueError):
            held = None  # released meanwhile, or being written: retry
        if held is not None and time.time() - float(held.get("unix", 0)) > stale_after:
            # Break only the lock we judged stale; a fresh one taken meanwhile has another token.
            with contextlib.suppress(FileNotFoundError, ValueError):
                if json.loads(store.get(key)).get("token") == held.get("token"):
                    store.delete(key)
            continue
        if time.monotonic() > deadline:
            raise RegistryError(f"aliases of {model!r} are locked by {held}; if no promotion is running, delete "
                                f"{store.where(key)}")
        time.sleep(0.02)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError):
            if json.loads(store.get(key)).get("token") == token["token"]:
                store.delete(key)


def _verified(store: RegistryStore, model: str, number: int) -> None:
    """Re-check a stored version's checksums: an alias must never point at bytes that changed on disk."""
    try:
        store.verify(f"{model}/versions/{number}")
    except (_bundle().BundleError, FileNotFoundError, storage.StorageError) as exc:
        raise RegistryError(f"refusing {model!r} version {number}: {exc}") from exc


def _move(store: RegistryStore, model: str, alias: str, target: int | None, action: str,
          reason: str) -> dict[str, Any]:
    """Point `alias` at `target` and record the move; the caller holds the alias lock.

    The history line is written before aliases.json so that a move which happened is always in the
    history (a crash between the two leaves a recorded move that did not take effect, which the
    next move's `from`, read from aliases.json, makes plain).
    """
    aliases = _aliases(store, model)
    record = {"time": _now(), "alias": alias, "from": aliases.get(alias), "to": target, "reason": reason,
              "user": _user(), "action": action}
    store.append_event(f"{model}/{HISTORY}", (json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
    if target is None:
        aliases.pop(alias, None)
    else:
        aliases[alias] = target
    store.replace(f"{model}/{ALIASES}", (json.dumps(aliases, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return record


def _check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not _NAME.fullmatch(alias) or alias == "latest" or alias.isdigit():
        raise RegistryError(f"invalid alias {alias!r}: a name like 'production' (not a number or 'latest')")
    return alias


def promote(root: str | Path | RegistryStore, model_name: str, version: str | int, alias: str = DEFAULT_ALIAS,
            reason: str = "") -> dict[str, Any]:
    """Point `alias` at a committed, re-verified version; returns the history record."""
    store = _store(root)
    model = _check_name(model_name)
    _check_alias(alias)
    _require_model(store, model)
    with _alias_lock(store, model):
        number = _parse_ref(store, model, version)
        _verified(store, model, number)
        return _move(store, model, alias, number, "promote", reason)


def rollback(root: str | Path | RegistryStore, model_name: str, alias: str = DEFAULT_ALIAS,
             reason: str = "") -> dict[str, Any]:
    """Move `alias` back to where it pointed before its last promotion; returns the history record.

    An alias other than production whose last promotion was its first is removed (`to` is None).

    Rollbacks stack: each one undoes one earlier promotion (a rollback does not undo the previous
    rollback), so production 1 -> 2 -> 3 rolls back to 2, then to 1.
    """
    store = _store(root)
    model = _check_name(model_name)
    _check_alias(alias)
    _require_model(store, model)
    with _alias_lock(store, model):
        pending = 0
        target: int | None = None
        found = False
        for record in reversed(_history(store, model)):
            if record.get("alias") != alias:
                continue
            if record.get("action") == "rollback":
                pending += 1
            elif pending:
                pending -= 1
            else:
                target, found = record.get("from"), True
                break
        if not found:
            raise RegistryError(f"alias {alias!r} of {model!r} has no promotion to roll back")
        if target is None:
            if alias == DEFAULT_ALIAS:
                # Withdrawing production would leave servers nothing to serve: that takes a promotion.
                raise RegistryError(f"alias {alias!r} of {model!r} pointed at no version before its first "
                                    "promotion; promote another version instead")
            # Any other alias (a canary) that had no earlier version is withdrawn: no version gets its traffic.
            return _move(store, model, alias, None, "rollback", reason)
        if target not in _committed(store, model):
            raise RegistryError(f"cannot roll {alias!r} back to version {target} of {model!r}: it is gone")
        _verified(store, model, int(target))
        return _move(store, model, alias, int(target), "rollback", reason)


def history(root: str | Path | RegistryStore, model_name: str) -> list[dict[str, Any]]:
    """Every alias move of `model_name`, oldest first."""
    store = _store(root)
    return _history(store, _check_name(model_name))


def diff(root: str | Path | RegistryStore, model_name: str, a: str | int, b: str | int) -> dict[str, Any]:
    """Two versions side by side: config keys that differ, and every metric (flattened, dotted keys)."""
    store = _store(root)
    model = _check_name(model_name)
    numbers = (_parse_ref(store, model, a), _parse_ref(store, model, b))
    configs, metrics = [], []
    for number in numbers:
        configs.append(_flatten(_read_json(store, f"{model}/versions/{number}/config.json", {})))
        metrics.append(_numeric_metrics(store, f"{model}/versions/{number}"))
    config_diff = {key: [configs[0].get(key), configs[1].get(key)]
                   for key in sorted(set(configs[0]) | set(configs[1])) if configs[0].get(key) != configs[1].get(key)}
    metric_table = {key: [metrics[0].get(key), metrics[1].get(key)]
                    for key in sorted(set(metrics[0]) | set(metrics[1]))}
    return {"model": model, "a": {"ref": str(a), "version": numbers[0]}, "b": {"ref": str(b), "version": numbers[1]},
            "config": config_diff, "metrics": metric_table}


def gc(root: str | Path | RegistryStore, model_name: str, older_than_s: float = GC_AFTER_S) -> list[int]:
    """Remove version slots claimed more than `older_than_s` ago whose upload never committed.

    Such slots are already invisible and never block a publish (the next number is taken); this
    only reclaims their space. The age threshold keeps a slow publisher's slot out of reach.
    """
    store = _store(root)
    model = _check_name(model_name)
    committed = set(_committed(store, model))
    removed = []
    for name in store.list(f"{model}/versions"):
        key = f"{model}/versions/{name}"
        stale_tmp = name.startswith(".tmp-")
        if not (_is_number(name) and int(name) not in committed) and not stale_tmp:
            continue
        age = store.claim_age(key)
        if age is not None and age < older_than_s:
            continue
        if store.exists(f"{key}/{COMMITTED}"):  # committed meanwhile
            continue
        store.delete_tree(key)
        if _is_number(name):
            removed.append(int(name))
    return sorted(removed)
