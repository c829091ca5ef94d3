"""Maps between categorical values (strings) and embedding-row indices.

A vocabulary is fit on the training split only: an id first seen in validation or test must land
in the out-of-vocabulary row, exactly as an id first seen in production will, or offline metrics
flatter the model. Index 0 is that shared row for unknown, rare and null values.

Fields with huge id spaces can be hashed instead: the index comes from a stable hash of the key
text, so nothing needs storing and new ids still get their own (shared) rows. The hash is
blake2b, not Python's `hash()`, whose per-process salt would scramble indices between the process
that trained a model and the one serving it.

All work is columnar (pyarrow compute); Python touches each distinct key at most once.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recforge.config import VocabConfig
from recforge.storage import read_json, write_json

SCHEMA_VERSION = 1

ArrowStrings = pa.Array | pa.ChunkedArray


def _as_strings(values: ArrowStrings, field: str) -> ArrowStrings:
    """Decode dictionary arrays and refuse non-strings, so keys compare as the same text everywhere."""
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise TypeError(
            f"vocab field '{field}' got values of type {values.type}; categorical values must be "
            "normalized to strings before fitting or encoding"
        )
    return values


def hash_index(keys: ArrowStrings, buckets: int) -> np.ndarray:
    """1 + blake2b-64(key text) % buckets for each value; 0 for nulls.

    Hashes each distinct value once and maps the results back to rows, so the Python cost scales
    with the number of distinct keys, not rows.
    """
    if buckets < 1:
        raise ValueError(f"hash_buckets must be at least 1, got {buckets}")
    unique = pc.drop_null(pc.unique(keys))
    digests = b"".join(
        hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest() for key in unique.to_pylist()
    )
    hashed = np.frombuffer(digests, dtype="<u8") % np.uint64(buckets)
    # The extra 0 at the end is where position -1 (a null row) lands.
    lookup = np.append(hashed.astype(np.int64) + 1, 0)
    positions = pc.fill_null(pc.index_in(keys, value_set=unique), -1)
    return lookup[positions.to_numpy()]


@dataclass(frozen=True, repr=False)
class Vocab:
    """Index i+1 <-> keys[i] for fit fields; hashed fields store only their bucket count.

    Keys are ordered by descending training count (ties by key text), so the order is
    deterministic and frequent ids get small indices.
    """

    field: str
    keys: tuple[str, ...] | None
    hash_buckets: int | None
    min_count: int
    OOV: ClassVar[int] = 0

    def __post_init__(self) -> None:
        if (self.keys is None) == (self.hash_buckets is None):
            raise ValueError(f"vocab '{self.field}' needs exactly one of keys or hash_buckets")
        if self.hash_buckets is not None and self.hash_buckets < 1:
            raise ValueError(
                f"vocab '{self.field}': hash_buckets must be at least 1, got {self.hash_buckets}"
            )
        if self.min_count < 1:
            raise ValueError(f"vocab '{self.field}': min_count must be at least 1, got {self.min_count}")

    def __repr__(self) -> str:
        # The default repr would print every key.
        kind = f"hash_buckets={self.hash_buckets}" if self.keys is None else f"keys={len(self.keys)}"
        return f"Vocab(field={self.field!r}, {kind}, min_count={self.min_count}, size={self.size})"

    @property
    def size(self) -> int:
        """Embedding rows needed, OOV row included."""
        return (len(self.keys) if self.keys is not None else self.hash_buckets) + 1  # type: ignore[operator]

    @property
    def is_hashed(self) -> bool:
        return self.keys is None

    @functools.cached_property
    def _key_array(self) -> pa.Array:
        return pa.array(self.keys, type=pa.string())

    @classmethod
    def fit(
        cls,
        field: str,
        values: ArrowStrings,
        min_count: int = 1,
        hash_buckets: int | None = None,
    ) -> Vocab:
        """Learn the vocabulary of one field from its TRAINING values.

        Nulls are never keys. Keys seen fewer than `min_count` times map to OOV: their embeddings
        would barely train, and sharing one row is better than many noisy ones. Hashed fields keep
        every key (min_count 1), since counting keys needs the vocabulary hashing avoids.
        """
        values = _as_strings(values, field)
        if hash_buckets is not None:
            return cls(field=field, keys=None, hash_buckets=int(hash_buckets), min_count=1)
        if min_count < 1:
            raise ValueError(f"vocab '{field}': min_count must be at least 1, got {min_count}")
        counts = pc.value_counts(pc.drop_null(values))
        return cls.from_counts(field, counts.field("values"), counts.field("counts"), min_count)

    @classmethod
    def from_counts(cls, field: str, keys: ArrowStrings, counts: pa.Array | pa.ChunkedArray, min_count: int = 1
                    ) -> Vocab:
        """The vocabulary of distinct training keys and their counts (however they were counted).

        The one place keys are kept and ordered, so a vocabulary counted by Spark is the one
        pyarrow would have fit, index for index.
        """
        if min_count < 1:
            raise ValueError(f"vocab '{field}': min_count must be at least 1, got {min_count}")
        table = pa.table({"key": _as_strings(keys, field), "count": pc.cast(counts, pa.int64())})
        table = table.filter(pc.greater_equal(table["count"], min_count))
        order = pc.sort_indices(table, sort_keys=[("count", "descending"), ("key", "ascending")])
        keys = table["key"].take(order).cast(pa.string())
        vocab = cls(field=field, keys=tuple(keys.to_pylist()), hash_buckets=None, min_count=int(min_count))
        # Seed the cache with the array we already hold instead of rebuilding it from the tuple.
        vocab.__dict__["_key_array"] = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
        return vocab

    def encode(self, values: ArrowStrings) -> np.ndarray:
        """int64 indices; OOV (0) for nulls and for keys not in the vocabulary."""
        values = _as_strings(values, self.field)
        if self.hash_buckets is not None:
            return hash_index(values, self.hash_buckets)
        value_set = self._key_array
        if value_set.type != values.type:
            value_set = value_set.cast(values.type)
        positions = pc.fill_null(pc.index_in(values, value_set=value_set), -1)
        return positions.to_numpy().astype(np.int64) + 1

    def decode(self, indices: np.ndarray) -> list[str | None]:
        """Keys for indices, None for OOV. Hashed fields cannot be decoded: many keys share a row."""
        if self.keys is None:
            raise ValueError(f"vocab '{self.field}' is hashed; hashed indices cannot be decoded to keys")
        idx = np.asarray(indices)
        if idx.size and (idx.min() < 0 or idx.max() >= self.size):
            raise ValueError(f"vocab '{self.field}': indices must lie in [0, {self.size - 1}]")
        return self._decode_table[idx].tolist()

    @functools.cached_property
    def _decode_table(self) -> np.ndarray:
        table = np.empty(len(self.keys) + 1, dtype=object)  # type: ignore[arg-type]
        table[0] = None
        table[1:] = self.keys
        return table

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "field": self.field,
            "kind": "hashed" if self.keys is None else "vocab",
            "size": self.size,
            "min_count": self.min_count,
            "hash_buckets": self.hash_buckets,
            "keys": None if self.keys is None else list(self.keys),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Vocab:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"vocab '{data.get('field')}' has schema_version {version!r}; this recforge reads version "
                f"{SCHEMA_VERSION}"
            )
        keys = data["keys"]
        vocab = cls(
            field=data["field"],
            keys=None if keys is None else tuple(keys),
            hash_buckets=data["hash_buckets"],
            min_count=data["min_count"],
        )
        if "size" in data and data["size"] != vocab.size:
            raise ValueError(f"vocab '{vocab.field}' says size {data['size']} but holds {vocab.size} rows")
        return vocab

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> Vocab:
        return cls.from_dict(read_json(path))


def check_hash_fields(fields: list[str], cfg: VocabConfig) -> None:
    unknown = sorted(set(cfg.hash_buckets) - set(fields))
    if unknown:
        raise ValueError(
            f"vocab.hash_buckets names field(s) {unknown} that are not categorical fields {sorted(fields)}"
        )


def fit_vocabs(table: pa.Table, fields: list[str], cfg: VocabConfig) -> dict[str, Vocab]:
    """Fit one vocabulary per categorical field; pass the TRAINING table only."""
    check_hash_fields(fields, cfg)
    missing = [f for f in fields if f not in table.column_names]
    if missing:
        raise ValueError(f"cannot fit vocabularies: column(s) {missing} not in the table")
    return {
        field: Vocab.fit(
            field, table.column(field), min_count=cfg.min_count, hash_buckets=cfg.hash_buckets.get(field)
        )
        for field in fields
    }


def _vocab_path(directory: Path, field: str) -> Path:
    if not field or "/" in field or "\\" in field or field.startswith("."):
        raise ValueError(f"field name {field!r} cannot be used as a vocabulary file name")
    return Path(directory) / f"{field}.json"


def save_vocabs(vocabs: Mapping[str, Vocab], directory: Path) -> None:
    """One `<field>.json` per field, each written atomically."""
    for name, vocab in vocabs.items():
        if name != vocab.field:
            raise ValueError(f"vocabs key {name!r} does not match the vocab's field {vocab.field!r}")
        vocab.save(_vocab_path(directory, name))


def load_vocabs(directory: Path) -> dict[str, Vocab]:
    """Every `<field>.json` in `directory`, keyed by field."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"vocabulary directory not found: {directory}")
    vocabs: dict[str, Vocab] = {}
    for path in sorted(directory.glob("*.json")):
        vocab = Vocab.load(path)
        if vocab.field != path.stem:
            raise ValueError(f"{path} holds the vocab of field {vocab.field!r}, not {path.stem!r}")
        vocabs[vocab.field] = vocab
    return vocabs
