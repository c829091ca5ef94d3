"""The feature layout: which categorical columns are the user, the item, context and item features,
which numeric columns there are, how many rows each field's vocabulary has, and how long the user
histories (each row's last clicked items) are.

Prepare writes it beside the arrays (features.json), a run copies it, a model is built from it and
a bundle carries it, so the server reads the same layout the model was trained on instead of
re-deriving it from a config or a meta file. It is a leaf: the server imports it without the data
layer, and every layer reads the same class.

On disk it is the JSON object older recforge versions wrote as features.json (`categorical`,
`cardinalities`, `numeric`, `roles`), now with `history_length` and a `layout_version`. `load` also
reads files written before those existed: a features.json without `layout_version`, `roles` or
`history_length` (0: no histories), and a prepared directory that has only its meta.json.

`vocab_remap` is the one rule for carrying rows between two vocabularies of a field (a champion's
and a challenger's, a retrieval model's and a ranker's): by raw key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recforge.storage import read_json, write_json

LAYOUT_VERSION = 1
FEATURES_FILE = "features.json"
PREPARED_META = "meta.json"
ROLES = ("user", "item", "context", "item_feature")


@dataclass(frozen=True)
class FeatureLayout:
    """What a model needs to know of the prepared data: field names, their roles and their sizes."""

    categorical: tuple[str, ...]
    cardinalities: tuple[int, ...]
    numeric: tuple[str, ...]
    # Role of each categorical field: user, item, context or item_feature. Empty in layouts written
    # before roles were recorded: then field 0 is the user, field 1 the item, the rest context.
    roles: tuple[str, ...] = ()
    # Clicked items per row's history (0: the data carries none). Not part of `identity()`: histories are
    # an input a run was prepared with, already in its data digest, and runs from before it was recorded
    # here must keep resuming.
    history_length: int = 0

    def __post_init__(self) -> None:
        for name in ("categorical", "cardinalities", "numeric", "roles"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.cardinalities) != len(self.categorical):
            raise ValueError(f"feature layout: {len(self.categorical)} categorical fields but "
                             f"{len(self.cardinalities)} cardinalities")
        if self.roles and len(self.roles) != len(self.categorical):
            raise ValueError(f"feature layout: {len(self.categorical)} categorical fields but {len(self.roles)} roles")
        unknown = sorted(set(self.roles) - set(ROLES))
        if unknown:
            raise ValueError(f"feature layout: unknown role(s) {unknown}; a field is one of {', '.join(ROLES)}")

    @property
    def field_roles(self) -> tuple[str, ...]:
        """Each categorical field's role, with the default of layouts that recorded none."""
        return self.roles or ("user", "item", *["context"] * (len(self.categorical) - 2))[:len(self.categorical)]

    def columns(self, *roles: str) -> list[int]:
        """Positions of the fields with these roles, in field order."""
        return [i for i, role in enumerate(self.field_roles) if role in roles]

    def column(self, role: str) -> int:
        """Position of the (first) field with this role; a ValueError when the layout has none."""
        found = self.columns(role)
        if not found:
            raise ValueError(f"feature layout has no {role} field (fields {list(self.categorical)}, "
                             f"roles {list(self.field_roles)})")
        return found[0]

    @property
    def item_column(self) -> int:
        return self.column("item")

    @property
    def item_columns(self) -> list[int]:
        """The item-side columns: the item id, then its item features (an item catalog row's layout)."""
        return self.columns("item", "item_feature")

    def field_name(self, role: str) -> str:
        return self.categorical[self.column(role)]

    def identity(self) -> dict[str, tuple[Any, ...]]:
        """The fields that make two layouts the same model input (part of a run's resume digest)."""
        return {"categorical": self.categorical, "cardinalities": self.cardinalities, "numeric": self.numeric,
                "roles": self.roles}

    def to_dict(self) -> dict[str, Any]:
        """The features.json object."""
        return {"categorical": list(self.categorical), "cardinalities": list(self.cardinalities),
                "numeric": list(self.numeric), "roles": list(self.roles), "history_length": self.history_length,
                "layout_version": LAYOUT_VERSION}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = FEATURES_FILE) -> FeatureLayout:
        """A features.json object, of this version or an older one (no `layout_version`, no `roles`)."""
        version = data.get("layout_version", 1)
        if not isinstance(version, int) or version > LAYOUT_VERSION:
            raise ValueError(f"{where}: feature layout version {version!r} is not one this recforge reads "
                             f"(up to {LAYOUT_VERSION}); upgrade recforge")
        missing = [key for key in ("categorical", "cardinalities", "numeric") if key not in data]
        if missing:
            raise ValueError(f"{where}: not a feature layout, missing {', '.join(missing)}")
        try:
            return cls(tuple(str(c) for c in data["categorical"]), tuple(int(c) for c in data["cardinalities"]),
                       tuple(str(n) for n in data["numeric"]), tuple(str(r) for r in data.get("roles") or ()),
                       int(data.get("history_length") or 0))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    @classmethod
    def from_prepared_meta(cls, meta: Mapping[str, Any], where: str = PREPARED_META) -> FeatureLayout:
        """The layout recorded in a prepared dataset's meta.json (`fields` and `numeric` entries)."""
        try:
            fields, numeric = meta["fields"], meta["numeric"]
            return cls(tuple(str(f["name"]) for f in fields), tuple(int(f["cardinality"]) for f in fields),
                       tuple(str(n["name"]) for n in numeric), tuple(str(f["role"]) for f in fields),
                       int(meta.get("history_length") or 0))
        except KeyError as exc:
            raise ValueError(f"{where}: not a prepared dataset's meta, missing {exc}") from None
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def save(self, path: str | Path) -> None:
        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> FeatureLayout:
        """From a features.json file, or a directory holding one: a run, a bundle, a prepared dataset.

        A prepared dataset written before prepare saved its layout has only meta.json: read from there.
        """
        path = Path(path)
        if path.is_dir():
            path = path / FEATURES_FILE if (path / FEATURES_FILE).is_file() else path / PREPARED_META
        if not path.is_file():
            raise FileNotFoundError(f"no feature layout at {path}")
        data = read_json(path)
        if path.name == PREPARED_META or "fields" in data:
            return cls.from_prepared_meta(data, str(path))
        return cls.from_dict(data, str(path))


def vocab_remap(source_row_keys: Sequence[str | None],
                target_lookup: Callable[[Sequence[str | None]], Sequence[int]]) -> np.ndarray:
    """For each row of a source vocabulary, the target vocabulary's row of the same raw key.

    `source_row_keys[r]` is the raw key of source row r (None for row 0, the unknown row, and for
    any row without a key); `target_lookup` maps raw keys to target rows, 0 for a key it lacks.
    The result (int64, one entry per source row) is a gather index: `mapping[rows]` carries any
    array of source rows over at once, with no per-row Python.
    """
    return np.asarray(target_lookup(list(source_row_keys)), dtype=np.int64)


def row_keys(keys: Sequence[str] | None, size: int) -> list[str | None]:
    """Raw key of each row of a keyed vocabulary (row 0 None); all None for a hashed one (no keys)."""
    return [None, *keys] if keys is not None else [None] * size
