"""Side tables of item and user attributes (data.items, data.users), joined onto every event by id.

A real log carries ids; a movie's genres or a user's age group live in a table keyed by that id.
The join happens as each log file is read, before validation, so a joined column is treated exactly
like one the log carried: the same validation, vocabulary and item feature table, on both engines (a
Spark task joins the file it reads). The schema names attribute columns in its roles as usual: item
attributes in `schema.item_features` (the item catalog that bundles carry to serving), user attributes
in `schema.context` (a request supplies them at serving). Attributes are categorical. An event whose id has no
row gets nulls, which the report counts (null_context) and the vocabulary maps to the unknown index;
a table with a repeated or missing id, or a column the log also has, is an error that names it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from recforge.config import AttributeSource, DataConfig, SchemaConfig
from recforge.data.schema import DataError
from recforge.data.sources import read_header
from recforge.data.validate import as_text
from recforge.storage import get_file, is_remote

# Which schema roles each table may feed: item attributes must reach the item catalog. Categorical only:
# an id without a row has no value, which a category maps to the unknown index but a number cannot
# take without the event being quarantined (bucket a numeric attribute into a category instead).
_ROLES = {"items": ("item_features",), "users": ("context",)}


@dataclass(frozen=True)
class AttributeTable:
    """One side table, read once: unique text ids and the attribute columns the schema uses."""

    name: str  # items | users
    path: str
    key: str  # the events' column it joins on (schema.item / schema.user)
    ids: pa.Array  # text ids, unique, as the validator normalizes them
    columns: dict[str, pa.Array]  # attribute column -> values, aligned with ids

    def join(self, events: pa.Table) -> pa.Table:
        at = pc.index_in(as_text(events.column(self.key), self.key), value_set=self.ids)
        for name, values in self.columns.items():
            events = events.append_column(name, values.take(at))
        return events


@dataclass(frozen=True)
class Attributes:
    """The configured side tables (none, items, users or both)."""

    tables: tuple[AttributeTable, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(c for table in self.tables for c in table.columns)

    def file_schema(self, schema: SchemaConfig) -> SchemaConfig:
        """The schema a log file itself must satisfy: without the columns the side tables bring."""
        joined = set(self.columns)
        if not joined:
            return schema
        return schema.model_copy(update={role: [c for c in getattr(schema, role) if c not in joined]
                                         for role in {r for roles in _ROLES.values() for r in roles}})

    def join(self, events: pa.Table) -> pa.Table:
        """`events` (read with file_schema(), `columns` passed as the reader's `joined`) with the attributes."""
        for table in self.tables:
            events = table.join(events)
        return events

    def describe(self) -> dict[str, Any]:
        """For meta.json: where each table came from and what it brought."""
        return {t.name: {"path": t.path, "rows": len(t.ids), "key": t.key, "columns": list(t.columns)}
                for t in self.tables}


def load_attributes(data: DataConfig) -> Attributes:
    """Read data.items / data.users (if set), keeping the attribute columns the schema names."""
    schema = data.schema_
    tables = []
    for name, source, key in (("items", data.items, schema.item), ("users", data.users, schema.user)):
        if source is not None:
            tables.append(_load(name, source, key, schema))
    return Attributes(tuple(tables))


def _load(name: str, source: AttributeSource, key: str, schema: SchemaConfig) -> AttributeTable:
    table = _read(source)
    file_key = source.key or key
    if file_key not in table.column_names:
        raise DataError(f"{source.path}: no id column '{file_key}' (data.{name}.key); found columns: "
                        f"{', '.join(table.column_names)}")
    wanted = {c: role for role in ("context", "item_features", "numeric") for c in getattr(schema, role)}
    columns = [c for c in table.column_names if c != file_key and c in wanted]
    if not columns:
        raise DataError(f"{source.path}: none of its columns ({', '.join(table.column_names)}) is named by the "
                        f"schema's {' / '.join(_ROLES[name])}, so data.{name} would add nothing")
    misplaced = [c for c in columns if wanted[c] not in _ROLES[name]]
    if misplaced:
        roles = " or ".join(f"schema.{role}" for role in _ROLES[name])
        raise DataError(f"data.{name} ({source.path}) brings {misplaced}, which the schema lists as "
                        f"{wanted[misplaced[0]]}; {name[:-1]} attributes go in {roles}")
    ids = as_text(table.column(file_key), file_key).combine_chunks()
    missing = ids.null_count
    if missing:
        raise DataError(f"{source.path}: {missing:,} row(s) without an id in column '{file_key}'")
    tally = pc.value_counts(ids)
    repeated = tally.filter(pc.greater(tally.field("counts"), 1))
    if len(repeated):
        first = repeated[0].as_py()
        raise DataError(f"{source.path}: id '{first['values']}' has {first['counts']} rows in column "
                        f"'{file_key}' ({len(repeated):,} id(s) repeated); data.{name} needs one row per id")
    return AttributeTable(name, source.path, key, ids,
                          {c: table.column(c).combine_chunks() for c in columns})


def _read(source: AttributeSource) -> pa.Table:
    """The whole table, values as the file has them (CSV as text, like log files)."""
    if is_remote(source.path):
        with tempfile.TemporaryDirectory(prefix="recforge-attributes-") as tmp:
            local = get_file(source.path, Path(tmp) / Path(source.path).name)
            return _read_local(local, source)
    return _read_local(Path(source.path), source)


def _read_local(path: Path, source: AttributeSource) -> pa.Table:
    if not path.is_file():
        raise DataError(f"{source.path}: no such file (data attribute table)")
    fmt = source.format
    if fmt == "auto":
        with open(path, "rb") as handle:
            fmt = "parquet" if handle.read(4) == b"PAR1" else "csv"
    try:
        if fmt == "parquet":
            return pq.read_table(path)
        header = read_header(path)
        return pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(
            column_types={c: pa.string() for c in header}, strings_can_be_null=False))
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {source.path} as {fmt}: {str(exc).splitlines()[0]}") from exc

