"""The sharded prepared format: each split as N shards of memory-mappable .npy columns + one manifest.

Layout of a prepared directory (both engines write it):

    manifest.json                      written last: the dataset exists once it does
    train/shard-00000/categorical.npy  [n, F] int64      (and numeric [n, K] float32, label [n] float32,
    train/shard-00000/...              timestamp [n] int64, user_key [n] int64, history_values [h] int64,
                                       history_offsets [n + 1] int64 starting at 0 within the shard)

Why .npy and not Parquet: the trainer memory-maps a shard's columns as they are on disk (no decode,
no copy until a batch gathers rows), the dtypes are the model's own, and a shard can be checked
against its manifest by size and sha256 without parsing anything. Parquet would compress better on
object storage, at a decode cost on every epoch.

Rows of a split are in the canonical order (the log's input order: file, then row; a sampled
negative right after its positive) cut into contiguous shards of `shard_rows`, so the same log
prepared by either engine gives the same shards, row for row.

Datasets prepared before shards existed (one folder of arrays per split, no manifest) still load:
`split_shards` presents such a split as one shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recforge.storage import load_array, read_json, save_array, write_json

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "recforge-sharded"
MANIFEST_VERSION = 1
COLUMNS = ("categorical", "numeric", "label", "timestamp", "user_key")
HISTORY_COLUMNS = ("history_values", "history_offsets")
_DTYPES = {"categorical": np.int64, "numeric": np.float32, "label": np.float32, "timestamp": np.int64,
           "user_key": np.int64, "history_values": np.int64, "history_offsets": np.int64}


class ManifestError(ValueError):
    """A prepared directory whose manifest and shards disagree (or that has neither)."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()  # also for a [n, 0] column


def write_shard(directory: Path, columns: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Write one shard's columns into `directory`; return its manifest entry (rows, shapes, sha256)."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = int(len(columns["label"]))
    entry: dict[str, Any] = {"rows": rows, "columns": {}}
    for name, values in columns.items():
        values = np.ascontiguousarray(values, dtype=_DTYPES[name])
        expected = rows + 1 if name == "history_offsets" else None
        if name not in ("history_values", "history_offsets") and len(values) != rows:
            raise ValueError(f"shard column {name} has {len(values)} rows, the shard {rows}")
        if expected is not None and len(values) != expected:
            raise ValueError(f"history_offsets has {len(values)} entries for {rows} rows")
        save_array(directory / f"{name}.npy", values)
        entry["columns"][name] = {"dtype": values.dtype.str, "shape": list(values.shape),
                                  "sha256": _digest(values)}
    return entry


def shard_bounds(rows: int, shard_rows: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard of a split of `rows` rows; an empty split is one empty shard."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be at least 1, got {shard_rows}")
    if rows == 0:
        return [(0, 0)]
    return [(start, min(rows, start + shard_rows)) for start in range(0, rows, shard_rows)]


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest describes it."""

    split: str
    index: int
    path: Path
    rows: int
    columns: Mapping[str, Mapping[str, Any]]

    @property
    def has_history(self) -> bool:
        return "history_values" in self.columns

    def load(self, mmap: bool = True, verify: bool = False) -> dict[str, np.ndarray]:
        """The shard's columns (memory-mapped unless `mmap` is False), checked against the manifest.

        Shapes and dtypes are always checked (from the .npy headers: free); `verify` also hashes
        the bytes, which reads the whole shard once (a pre-shard split has no digests to check).
        """
        out: dict[str, np.ndarray] = {}
        for name, spec in self.columns.items():
            file = self.path / f"{name}.npy"
            if not file.is_file():
                raise ManifestError(f"{file}: missing (the manifest lists it)")
            values = load_array(file, mmap=mmap)
            if list(values.shape) != list(spec["shape"]) or values.dtype.str != spec["dtype"]:
                raise ManifestError(
                    f"{file}: holds {values.dtype.str} {list(values.shape)}, the manifest says "
                    f"{spec['dtype']} {list(spec['shape'])}")
            if verify and spec["sha256"] is not None and _digest(values) != spec["sha256"]:
                raise ManifestError(f"{file}: sha256 differs from the manifest (a corrupt or replaced shard)")
            out[name] = values
        return out


def write_manifest(root: Path, splits: Mapping[str, list[dict[str, Any]]], *, shard_rows: int,
                   features: Mapping[str, Any], engine: str) -> dict[str, Any]:
    """The commit point of a prepared directory: call it after every shard is written."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "engine": engine,
        "shard_rows": shard_rows,
        "features": dict(features),
        "splits": {
            name: {"rows": sum(entry["rows"] for entry in entries),
                   "shards": [{"path": f"{name}/{shard_name(i)}", **entry} for i, entry in enumerate(entries)]}
            for name, entries in splits.items()
        },
    }
    write_json(root / MANIFEST_FILE, manifest)
    return manifest


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    """The manifest of a sharded dataset, None for a dataset from before shards."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        return None
    manifest = read_json(path)
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise ManifestError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; this recforge "
            f"reads {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}")
    return manifest


def split_shards(root: str | Path, split: str) -> list[ShardInfo]:
    """The shards of one split, in order; a pre-shard split is one shard over its folder."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        base = root / split
        if not (base / "label.npy").is_file():
            raise FileNotFoundError(f"prepared split not found: {base} (run `recforge data prepare` first)")
        columns: dict[str, dict[str, Any]] = {}
        for name in (*COLUMNS, *HISTORY_COLUMNS):
            if (base / f"{name}.npy").is_file():
                values = load_array(base / f"{name}.npy")
                columns[name] = {"dtype": values.dtype.str, "shape": list(values.shape), "sha256": None}
        return [ShardInfo(split, 0, base, int(columns["label"]["shape"][0]), columns)]
    if split not in manifest["splits"]:
        raise FileNotFoundError(f"prepared split {split!r} not in {root / MANIFEST_FILE}")
    return [ShardInfo(split, i, root / entry["path"], int(entry["rows"]), entry["columns"])
            for i, entry in enumerate(manifest["splits"][split]["shards"])]


def concat_shards(shards: list[ShardInfo], mmap: bool = True) -> dict[str, np.ndarray]:
    """Every shard of a split as one set of columns (history offsets re-based): the in-memory path."""
    loaded = [shard.load(mmap=mmap) for shard in shards]
    if len(loaded) == 1:
        return loaded[0]
    out = {name: np.concatenate([part[name] for part in loaded]) for name in COLUMNS}
    if shards[0].has_history:
        out["history_values"] = np.concatenate([part["history_values"] for part in loaded])
        offsets = [np.zeros(1, dtype=np.int64)]
        base = 0
        for part in loaded:
            offsets.append(part["history_offsets"][1:] + base)
            base += int(part["history_offsets"][-1])
        out["history_offsets"] = np.concatenate(offsets)
    return out


def split_column(root: str | Path, split: str, column: str) -> np.ndarray:
    """One column of a split over all its shards (histories excepted: their offsets need re-basing)."""
    if column in HISTORY_COLUMNS:
        raise ValueError("read histories with concat_shards, which re-bases their offsets")
    parts = [shard.load()[column] for shard in split_shards(root, split)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
