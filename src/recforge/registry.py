"""A versioned model registry: numbered, immutable bundle versions plus movable aliases.

Layout under a registry root::

    <root>/<model>/versions/<N>/        a verified copy of a bundle, N = 1, 2, 3 ...
    <root>/<model>/versions/<N>/registry.json   when, by whom and why it was published
    <root>/<model>/versions/<N>/COMMITTED       written last: without it the version does not exist
    <root>/<model>/aliases.json          {"production": N, "canary": M}
    <root>/<model>/history.jsonl         one JSON object per alias move (time, alias, from, to, reason, user)

Why it is shaped this way:

* A version number is claimed by creating its slot with an operation that fails if the slot exists
  (``os.mkdir`` locally), so concurrent publishers never share a number; the loser retries with the
  next one. Numbers can therefore have gaps (a crashed publisher's slot stays claimed), never duplicates.
* A version becomes visible only once its ``COMMITTED`` marker exists, and the marker is written after
  every other file, so a half-copied version is never listed, resolved or promoted.
* Alias moves take a lock file created exclusively (with a stale-lock timeout, so a crashed promoter
  does not wedge the registry forever) and replace ``aliases.json`` atomically; every move is
  recorded in the history, which is what ``rollback`` reads.
* Every file access goes through :class:`RegistryStore`, implemented here for local paths, so an
  object-store backend (conditional puts for claims and locks, multi-object upload with the marker
  last) can slot in without touching the registry logic.
"""

from __future__ import annotations

import contextlib
import getpass
import json
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
from typing import Any, Protocol

from recforge.bundle import MANIFEST, BundleError, load_bundle, read_manifest, verify_bundle
from recforge.storage import _fsync_dir, write_bytes

COMMITTED = "COMMITTED"
VERSION_META = "registry.json"
ALIASES = "aliases.json"
HISTORY = "history.jsonl"
LOCK = ".aliases.lock"
DEFAULT_ALIAS = "production"
LOCK_STALE_AFTER_S = 60.0
LOCK_WAIT_S = 30.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
        """A local directory holding `key`'s files, for bundle verification and loading."""
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
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            for name, data in extra.items():
                write_bytes(tmp / name, data)
            write_bytes(tmp / COMMITTED, b"")
            os.rename(tmp, target)
            _fsync_dir(target.parent)
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
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if data is None:
                os.mkdir(path)
                return True
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return True

    def replace(self, key: str, data: bytes) -> None:
        write_bytes(self._path(key), data)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def local_path(self, key: str) -> Path:
        return self._path(key)


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


def _store(root: str | Path | RegistryStore) -> RegistryStore:
    # Local paths only for now; a URI scheme (s3://) would pick another store here.
    return LocalStore(root) if isinstance(root, (str, Path)) else root


def _check_name(model_name: str) -> str:
    # The name becomes a path component: refuse anything that could climb out of the registry root.
    if not _NAME.match(model_name):
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
    numbers = [int(name) for name in store.list(f"{model}/versions") if name.isdigit()]
    return sorted(n for n in numbers if store.exists(f"{model}/versions/{n}/{COMMITTED}"))


def _read_json(store: RegistryStore, key: str, default: Any) -> Any:
    try:
        return json.loads(store.get(key))
    except FileNotFoundError:
        return default


def _aliases(store: RegistryStore, model: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in _read_json(store, f"{model}/{ALIASES}", {}).items()}


def _history(store: RegistryStore, model: str) -> list[dict[str, Any]]:
    try:
        text = store.get(f"{model}/{HISTORY}").decode("utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys, so two configs or metric files compare key by key."""
    if isinstance(obj, Mapping):
        flat: dict[str, Any] = {}
        for key, value in obj.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: obj} if prefix else {"": obj}


def _numeric_metrics(path: Path) -> dict[str, float]:
    file = path / "metrics.json"
    if not file.is_file():
        return {}
    flat = _flatten(json.loads(file.read_text(encoding="utf-8")))
    return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def publish(root: str | Path | RegistryStore, bundle_dir: str | Path, model_name: str, note: str = "") -> int:
    """Verify `bundle_dir`, copy it in as the next version of `model_name`, and return its number.

    The bundle is fully loaded first (checksums, schema version, the model itself), so a bundle that
    could not serve is never stored. The number is claimed with a create-if-absent, so concurrent
    publishers get distinct numbers.
    """
    store = _store(root)
    model = _check_name(model_name)
    loaded = load_bundle(bundle_dir)  # raises BundleError with the bundle's own message
    meta = {"published": _now(), "published_unix": time.time(), "note": note, "user": _user(),
            "source": str(Path(bundle_dir).resolve()), "kind": loaded.kind,
            "bundle_model_name": loaded.manifest.get("model_name")}
    existing = [int(name) for name in store.list(f"{model}/versions") if name.isdigit()]
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
    if digits.isdigit():
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


def _info(store: RegistryStore, model: str, number: int, aliases: Mapping[str, int]) -> VersionInfo:
    path = store.local_path(f"{model}/versions/{number}")
    meta = _read_json(store, f"{model}/versions/{number}/{VERSION_META}", {})
    return VersionInfo(number=number, created=str(meta.get("published", "")), note=str(meta.get("note", "")),
                       kind=str(meta.get("kind", "")), user=str(meta.get("user", "")),
                       metrics=_numeric_metrics(path), aliases=sorted(a for a, n in aliases.items() if n == number),
                       path=str(path))


def list_versions(root: str | Path | RegistryStore, model_name: str) -> list[VersionInfo]:
    """Every committed version, oldest first, with the aliases that point at it."""
    store = _store(root)
    model = _check_name(model_name)
    aliases = _aliases(store, model)
    return [_info(store, model, n, aliases) for n in _committed(store, model)]


def list_models(root: str | Path | RegistryStore) -> list[str]:
    """Model names that have at least one committed version."""
    store = _store(root)
    return [name for name in store.list("") if _NAME.match(name) and _committed(store, name)]


def show(root: str | Path | RegistryStore, model_name: str, version_or_alias: str | int = "latest") -> dict[str, Any]:
    """Everything about one version: registry record, manifest summary, metrics and aliases."""
    store = _store(root)
    model = _check_name(model_name)
    number = _parse_ref(store, model, version_or_alias)
    info = _info(store, model, number, _aliases(store, model))
    manifest = json.loads(store.get(f"{model}/versions/{number}/{MANIFEST}"))
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
            held = json.loads(store.get(key))
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
                                f"{store.local_path(key)}")
        time.sleep(0.02)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError):
            if json.loads(store.get(key)).get("token") == token["token"]:
                store.delete(key)


def _verified(store: RegistryStore, model: str, number: int) -> None:
    """Re-check a stored version's checksums: an alias must never point at bytes that changed on disk."""
    path = store.local_path(f"{model}/versions/{number}")
    try:
        verify_bundle(path, read_manifest(path))
    except (BundleError, FileNotFoundError) as exc:
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
    lines = [json.dumps(r, sort_keys=True) for r in _history(store, model)] + [json.dumps(record, sort_keys=True)]
    store.replace(f"{model}/{HISTORY}", ("\n".join(lines) + "\n").encode("utf-8"))
    if target is None:
        aliases.pop(alias, None)
    else:
        aliases[alias] = target
    store.replace(f"{model}/{ALIASES}", (json.dumps(aliases, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return record


def _check_alias(alias: str) -> str:
    if not _NAME.match(alias) or alias == "latest" or alias.isdigit():
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
            raise RegistryError(f"alias {alias!r} of {model!r} pointed at no version before its first promotion; "
                                "promote another version instead")
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
        path = store.local_path(f"{model}/versions/{number}")
        configs.append(_flatten(_read_json(store, f"{model}/versions/{number}/config.json", {})))
        metrics.append(_numeric_metrics(path))
    config_diff = {key: [configs[0].get(key), configs[1].get(key)]
                   for key in sorted(set(configs[0]) | set(configs[1])) if configs[0].get(key) != configs[1].get(key)}
    metric_table = {key: [metrics[0].get(key), metrics[1].get(key)]
                    for key in sorted(set(metrics[0]) | set(metrics[1]))}
    return {"model": model, "a": {"ref": str(a), "version": numbers[0]}, "b": {"ref": str(b), "version": numbers[1]},
            "config": config_diff, "metrics": metric_table}
