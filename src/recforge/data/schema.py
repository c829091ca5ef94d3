"""The event-log schema: which column plays which role, and the one error type of the data layer.

Readers and the validator both check columns against the same role map, so a log that lacks a
column fails with one message that lists every missing column and what the schema wanted it for,
instead of a KeyError deep inside training.
"""

from __future__ import annotations

from recforge.config import SchemaConfig

# The names the MovieLens reader gives to user/item/rating/timestamp, whatever the file called them.
MOVIELENS_COLUMNS: tuple[str, str, str, str] = ("user_id", "item_id", "rating", "timestamp")

# Provenance columns added by the readers; a schema may not claim them for data.
PROVENANCE_COLUMNS: tuple[str, str] = ("_file", "_row")
# Added by a reader only when some rows of a file could not be parsed (a ragged CSV line, say): True
# on those rows, whose values are all null. The validator quarantines them as malformed_row.
MALFORMED_COLUMN = "_malformed"


# The values a schema.split column may hold (after trimming and lower-casing), in split-code order.
SPLIT_NAMES: tuple[str, str, str] = ("train", "valid", "test")


class DataError(ValueError):
    """Bad input data (missing file, wrong columns, unreadable rows); the message is one line."""


def column_roles(schema: SchemaConfig) -> dict[str, str]:
    """Map each column the schema needs to its role, in the order the columns are returned.

    The label column is absent for implicit feedback: every logged event is a positive there, so a
    log without a label column is complete.
    """
    roles: dict[str, str] = {schema.user: "user", schema.item: "item", schema.time: "time"}
    if schema.label.kind != "implicit" and schema.label.column:
        roles[schema.label.column] = "label"
    for role in ("context", "item_features", "numeric"):
        for name in getattr(schema, role):
            roles[name] = role
    if schema.split:
        roles[schema.split] = "split"
    return roles


def required_columns(schema: SchemaConfig) -> list[str]:
    """Every column a log must have for `schema`: user, item, time, label, context, item features, numeric."""
    return list(column_roles(schema))


def check_columns(found: list[str], schema: SchemaConfig, where: str, joined: tuple[str, ...] = ()) -> None:
    """Raise DataError naming every column `schema` needs that `found` lacks; extra columns are fine.

    All missing columns go in one message so a user fixes the file (or the schema) once, not once
    per column.
    """
    roles = column_roles(schema)
    reserved = (*PROVENANCE_COLUMNS, MALFORMED_COLUMN)
    claimed = [name for name in roles if name in reserved]
    if claimed:
        raise DataError(
            f"{where}: schema uses reserved column name(s) {', '.join(claimed)}; "
            f"{', '.join(reserved)} are added by the reader, rename them in the schema"
        )
    present = set(found)
    clash = [name for name in joined if name in present]
    if clash:
        raise DataError(f"{where}: column(s) {clash} are in the log and in an attribute table (data.items / "
                        "data.users); keep one of them")
    missing = [f"'{name}' (schema role: {role})" for name, role in roles.items() if name not in present]
    if missing:
        noun = "column" if len(missing) == 1 else "columns"
        listed = ", ".join(found) if found else "(none)"
        raise DataError(f"{where}: missing {noun} {', '.join(missing)}; found columns: {listed}")
