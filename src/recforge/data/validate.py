"""Rows -> a clean, typed table plus a quarantine of the rows that cannot be trusted.

A real log always has some bad rows. Failing the whole run on one of them blocks training; dropping
them silently hides a broken upstream. So every row either lands in `clean` with normalized types
or in `quarantine` with the first reason it failed and its original text, and the per-reason
counts go into a report that the pipeline can gate on.

Everything is columnar: strings are parsed with Arrow compute kernels (regex match, cast of the
rows that match, strptime with error_is_null), never row by row in Python.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recforge.config import SchemaConfig
from recforge.data.schema import MALFORMED_COLUMN, SPLIT_NAMES, DataError, check_columns, required_columns
from recforge.storage import atomic_open, write_json

# Order matters: a row is quarantined for the first reason that applies.
REASONS: tuple[str, ...] = (
    "malformed_row",
    "missing_user",
    "missing_item",
    "bad_timestamp",
    "timestamp_out_of_range",
    "missing_label",
    "bad_label",
    "label_out_of_range",
    "bad_numeric",
    "bad_split",
    "duplicate_event",
)
REPORT_VERSION = 1

_KEPT = -1
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_INTEGER = r"^[+-]?\d{1,19}$"
# A 19-digit integer fits int64 when its digits compare <= these (same length: text order is number order).
_INT64_MAX_DIGITS = str(np.iinfo(np.int64).max)
_ISO = (
    r"^(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[T ](?P<clock>\d{2}:\d{2}(?::\d{2})?)(?P<fraction>\.\d+)?)?"
    r"\s*(?P<zone>Z|[+-]\d{2}:?\d{2})?$"
)
_FAR_YEAR = r"^\+?\d{5,}-\d{2}-\d{2}"  # ISO text with a five-digit year: beyond any time kept
# Largest magnitude at which every float64 is still an exact integer.
_EXACT_FLOAT = float(2**53)
_INT64_MAX = 2**63 - 1
# Timestamps are kept from the epoch up to 2262-04-11T23:47:16Z, the last second that int64
# nanoseconds (and so every unit below) can hold. Earlier or later times in a behaviour log are a
# unit or upstream bug, not events.
TIME_UNITS: tuple[str, ...] = ("s", "ms", "us", "ns")
_PER_SECOND = np.array([1, 10**3, 10**6, 10**9], dtype=np.int64)
_LATEST = np.array([_INT64_MAX // 10 ** (9 - 3 * k) for k in range(4)], dtype=np.int64)
# time_unit=auto reads a number in the one unit whose band holds it. Outside seconds, a band starts
# at 1973-03-03 (1e8 s), so the bands are disjoint: every unit is 1000x the last, and 1973..2262 spans
# less than 100x. Seconds also take 0..1e8 (1970..1973): read in any finer unit those are the first
# day of 1970, no plausible time. A value between bands is no plausible time in any unit.
_AUTO_LOW = np.array([0, 10**11, 10**14, 10**17], dtype=np.int64)
_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationResult:
    """What validation kept, what it rejected and why; rows_read == rows_kept + rows_quarantined."""

    clean: pa.Table
    quarantine: pa.Table
    counts: dict[str, int]
    rows_read: int
    # Categorical column -> nulls kept in `clean` (they map to the unknown index downstream).
    null_context: dict[str, int] = field(default_factory=dict)
    # Unit (s/ms/us/ns) -> rows whose numeric timestamp was read in it (converted to seconds).
    time_units: dict[str, int] = field(default_factory=dict)

    @property
    def rows_kept(self) -> int:
        return self.clean.num_rows

    @property
    def rows_quarantined(self) -> int:
        return self.quarantine.num_rows

    def report(self) -> dict[str, Any]:
        """JSON-able summary; `null_context` counts kept nulls that will map to the unknown index,
        `time_units` the numeric timestamps read in each unit (more than one: a mixed-unit log)."""
        return {
            "version": REPORT_VERSION,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_quarantined": self.rows_quarantined,
            "by_reason": dict(self.counts),
            "null_context": dict(self.null_context),
            "time_units": dict(self.time_units),
        }


@dataclass(frozen=True)
class RowChecks:
    """Every per-row rule applied (all but duplicate_event, which compares rows across the log).

    `clean` holds the normalized columns for every row; `reason` the index into REASONS of each
    row's first failure (-1: kept so far); `unit` the TIME_UNITS index its number was read in (-1:
    not a number). The Spark engine runs this on one file per task and compares rows afterwards.
    """

    table: pa.Table
    clean: dict[str, pa.ChunkedArray]
    reason: np.ndarray
    unit: np.ndarray


def check_rows(table: pa.Table, schema: SchemaConfig) -> RowChecks:
    """Apply every per-row rule to `table` (as returned by `read_events`)."""
    check_columns(table.column_names, schema, "table")
    table = _with_provenance(table)
    n = table.num_rows
    reason = np.full(n, _KEPT, dtype=np.int8)

    def reject(name: str, bad: np.ndarray) -> None:
        reason[(reason == _KEPT) & bad] = REASONS.index(name)

    if MALFORMED_COLUMN in table.column_names:
        reject("malformed_row", _fill(table.column(MALFORMED_COLUMN)))
    clean: dict[str, pa.ChunkedArray] = {}
    for role, name in (("user", schema.user), ("item", schema.item)):
        clean[name] = as_text(_column(table, name), name)
        reject(f"missing_{role}", _is_null(clean[name]))

    seconds, out_of_range, unit = _timestamps(table, schema)
    clean[schema.time] = seconds
    reject("bad_timestamp", _is_null(seconds) & ~out_of_range)
    reject("timestamp_out_of_range", out_of_range)

    label = schema.label
    if label.kind != "implicit" and label.column:
        raw = _column(table, label.column)
        values = _to_float(raw, label.column)
        clean[label.column] = values
        reject("missing_label", _is_blank(raw))
        reject("bad_label", _is_null(values) | _is_nan(values))
        out = _fill(pc.or_(pc.less(values, label.min), pc.greater(values, label.max)))
        if label.kind == "click":
            out |= _fill(pc.and_(pc.not_equal(values, 0.0), pc.not_equal(values, 1.0)))
        reject("label_out_of_range", out)

    for name in [*schema.context, *schema.item_features]:
        clean[name] = as_text(_column(table, name), name)

    for name in schema.numeric:
        values = _to_float(_column(table, name), name)
        clean[name] = values
        reject("bad_numeric", _is_null(values) | ~_fill(pc.is_finite(values)))

    if schema.split:
        names = pc.utf8_lower(as_text(_column(table, schema.split), schema.split))
        clean[schema.split] = names
        reject("bad_split", ~_fill(pc.is_in(names, value_set=pa.array(SPLIT_NAMES))))
    return RowChecks(table, clean, reason, unit)


def unit_counts(counts: np.ndarray, column: str) -> dict[str, int]:
    """Rows read in each timestamp unit (counts per TIME_UNITS); a log mixing units is warned about."""
    units = {name: int(count) for name, count in zip(TIME_UNITS, counts, strict=True) if count}
    if len(units) > 1:
        listed = ", ".join(f"{name} {count:,}" for name, count in units.items())
        _LOG.warning(
            "column '%s' mixes timestamp units (%s); each value was converted to seconds by its magnitude "
            "(schema.time_unit=auto)", column, listed,
        )
    return units


def validate(table: pa.Table, schema: SchemaConfig) -> ValidationResult:
    """Split `table` (as returned by `read_events`) into clean rows and quarantined rows.

    Clean types: user, item, context and item-feature columns -> string (the split column: train,
    valid or test, lower-cased); time -> int64 unix seconds;
    label -> float64; numeric -> float64. A table without `_file`/`_row` (built in memory) gets
    `_file = "<table>"` and row numbers 1..n so quarantined rows stay traceable. Rows a reader
    could not parse (flagged in `_malformed`) are quarantined as malformed_row.
    """
    checks = check_rows(table, schema)
    table, clean, reason = checks.table, checks.clean, checks.reason
    candidates = reason == _KEPT
    reason[_later_duplicates(clean, schema, candidates)] = REASONS.index("duplicate_event")

    kept = pa.array(reason == _KEPT)
    columns = [*required_columns(schema), "_file", "_row"]
    clean_table = pa.table(
        {name: clean[name] if name in clean else table.column(name) for name in columns}
    ).filter(kept)
    quarantine = quarantine_rows(table, schema, reason)
    counts = np.bincount(reason[reason != _KEPT], minlength=len(REASONS))
    null_context = {
        name: int(clean_table.column(name).null_count) for name in [*schema.context, *schema.item_features]
    }
    return ValidationResult(
        clean=clean_table,
        quarantine=quarantine,
        counts={name: int(count) for name, count in zip(REASONS, counts, strict=True)},
        rows_read=table.num_rows,
        null_context=null_context,
        time_units=unit_counts(np.bincount(checks.unit[checks.unit >= 0], minlength=len(TIME_UNITS)),
                               schema.time),
    )


def write_outputs(result: ValidationResult, out_dir: Path) -> dict[str, Path]:
    """Write `quarantine.parquet` and `validation_report.json` atomically; return their paths."""
    out_dir = Path(out_dir)
    paths = {"quarantine": out_dir / "quarantine.parquet", "report": out_dir / "validation_report.json"}
    with atomic_open(paths["quarantine"], "wb") as handle:
        pq.write_table(result.quarantine, handle)
    write_json(paths["report"], result.report())
    return paths


# --- helpers -------------------------------------------------------------------------------------


def _with_provenance(table: pa.Table) -> pa.Table:
    n = table.num_rows
    if "_file" not in table.column_names:
        table = table.append_column("_file", pa.repeat("<table>", n))
    if "_row" not in table.column_names:
        table = table.append_column("_row", pa.array(np.arange(1, n + 1, dtype=np.int64)))
    return table


def _column(table: pa.Table, name: str) -> pa.ChunkedArray:
    """The column with dictionary encoding and large/view string types undone."""
    column = table.column(name)
    kind = column.type
    if pa.types.is_dictionary(kind):
        column = pc.cast(column, kind.value_type)
        kind = column.type
    if pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        column = pc.cast(column, pa.string())
    return column


def _fill(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Arrow boolean (nulls count as False) -> numpy bool."""
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def _is_null(values: pa.ChunkedArray) -> np.ndarray:
    return _fill(pc.is_null(values))


def _is_nan(values: pa.ChunkedArray) -> np.ndarray:
    return _fill(pc.is_nan(values))


def _is_blank(raw: pa.ChunkedArray) -> np.ndarray:
    """Null, or a string that is empty after trimming: the value is absent, not malformed."""
    if pa.types.is_string(raw.type):
        return _fill(pc.or_kleene(pc.is_null(raw), pc.equal(pc.utf8_trim_whitespace(raw), "")))
    return _is_null(raw)


def _null_if(mask: pa.ChunkedArray | pa.Array, values: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.if_else(pc.fill_null(mask, False), pa.scalar(None, values.type), values)


def _type_error(name: str, kind: pa.DataType, expected: str) -> DataError:
    return DataError(f"column '{name}' has type {kind}, which cannot hold {expected}")


def as_text(column: pa.ChunkedArray, name: str) -> pa.ChunkedArray:
    """Ids and categories as trimmed text; whole floats lose the '.0' so 12.0 and 12 are one id.

    Blank strings and NaN become null, i.e. missing.
    """
    kind = column.type
    if pa.types.is_floating(kind):
        column = _null_if(pc.is_nan(column), column)
        whole = pc.and_(pc.equal(pc.floor(column), column), pc.less(pc.abs(column), _EXACT_FLOAT))
        as_int = pc.cast(_null_if(pc.invert(whole), column), pa.int64())
        text = pc.if_else(whole, pc.cast(as_int, pa.string()), pc.cast(column, pa.string()))
    elif pa.types.is_string(kind):
        text = pc.utf8_trim_whitespace(column)
    elif pa.types.is_integer(kind) or pa.types.is_boolean(kind) or pa.types.is_decimal(kind):
        text = pc.cast(column, pa.string())
    else:
        try:
            text = pc.utf8_trim_whitespace(pc.cast(column, pa.string()))
        except pa.ArrowException as exc:
            raise _type_error(name, kind, "ids or categories") from exc
    return _null_if(pc.equal(text, ""), text)


def _parse_numbers(text: pa.ChunkedArray) -> pa.ChunkedArray:
    """float64 of every string that looks like a number; null for the rest (no cast can fail)."""
    trimmed = pc.utf8_trim_whitespace(text)
    ok = pc.match_substring_regex(trimmed, _NUMBER)
    return pc.cast(_null_if(pc.invert(ok), trimmed), pa.float64())


def _to_float(column: pa.ChunkedArray, name: str) -> pa.ChunkedArray:
    """float64; unparseable text becomes null so the caller can tell it from a good value."""
    kind = column.type
    if pa.types.is_string(kind):
        return _parse_numbers(column)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return pc.cast(column, pa.float64())
    if pa.types.is_decimal(kind):
        return pc.cast(column, pa.float64(), safe=False)
    raise _type_error(name, kind, "numbers")


def _timestamps(table: pa.Table, schema: SchemaConfig) -> tuple[pa.ChunkedArray, np.ndarray, np.ndarray]:
    """The time column as seconds, its out-of-range rows and each row's unit code (TIME_UNITS index).

    Conversion is range-checked before any cast, so no value can raise; an Arrow error here is
    still turned into one line naming the column and the files, never a bare overflow message.
    """
    name = schema.time
    try:
        return _to_unix_seconds(_column(table, name), name, schema.time_unit)
    except pa.ArrowException as exc:
        files = ", ".join(str(f) for f in pc.unique(table.column("_file")).to_pylist()[:3])
        raise DataError(f"{files}: column '{name}': cannot read timestamps ({exc})") from exc


def _to_unix_seconds(
    column: pa.ChunkedArray, name: str, unit: str
) -> tuple[pa.ChunkedArray, np.ndarray, np.ndarray]:
    """int64 unix seconds from numbers, numeric text, ISO-8601 text or Arrow temporal types.

    Returns (seconds, out_of_range, unit code per row: index into TIME_UNITS, -1 if not numeric).
    Seconds are null where the value is missing, unparseable or out of range; only numbers take
    `unit`, the other forms say their own.
    """
    kind = column.type
    n = len(column)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return _numbers_to_seconds(column, unit)
    if pa.types.is_timestamp(kind):
        seconds = pc.cast(pc.cast(column, pa.timestamp("s", tz=kind.tz), safe=False), pa.int64())
        return (*_seconds_in_range(seconds, np.zeros(n, dtype=bool)), np.full(n, -1, dtype=np.int8))
    if pa.types.is_date(kind):
        seconds = pc.cast(pc.cast(column, pa.timestamp("s"), safe=False), pa.int64())
        return (*_seconds_in_range(seconds, np.zeros(n, dtype=bool)), np.full(n, -1, dtype=np.int8))
    if not pa.types.is_string(kind):
        raise _type_error(name, kind, "timestamps")
    text = pc.utf8_trim_whitespace(column)
    # Integers are parsed as integers so that large values keep every digit.
    # Every nanosecond time since 2001 has 19 digits: as a float64 it would lose up to ~256 ns and round
    # into the next second, so integer text that fits int64 takes the exact path; larger text goes on as a
    # float, which is far out of range anyway.
    unsigned = pc.replace_substring_regex(text, r"^\+", "")
    digits = pc.replace_substring_regex(unsigned, r"^-", "")
    fits = pc.or_(pc.less(pc.utf8_length(digits), 19), pc.less_equal(digits, _INT64_MAX_DIGITS))
    is_int = pc.and_(pc.match_substring_regex(text, _INTEGER), fits)
    as_int = pc.cast(_null_if(pc.invert(is_int), unsigned), pa.int64())
    int_seconds, int_out, int_code = _numbers_to_seconds(as_int, unit)
    floats = _parse_numbers(_null_if(is_int, text))
    float_seconds, float_out, float_code = _numbers_to_seconds(floats, unit)
    iso_seconds, iso_out = _seconds_in_range(_parse_iso(text), _fill(pc.match_substring_regex(text, _FAR_YEAR)))
    seconds = pc.coalesce(int_seconds, float_seconds, iso_seconds)
    return seconds, int_out | float_out | iso_out, np.maximum(int_code, float_code)


def _seconds_in_range(
    seconds: pa.ChunkedArray | pa.Array, out_of_range: np.ndarray
) -> tuple[pa.ChunkedArray, np.ndarray]:
    """Seconds outside [epoch, 2262-04-11] (or already flagged) become null and are flagged."""
    out = out_of_range | _fill(pc.or_(pc.less(seconds, 0), pc.greater(seconds, int(_LATEST[0]))))
    return pa.chunked_array([_null_if(pa.array(out), pa.array(_combine(seconds)))]), out


def _combine(values: pa.ChunkedArray | pa.Array) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _numbers_to_seconds(
    column: pa.ChunkedArray | pa.Array, unit: str
) -> tuple[pa.ChunkedArray, np.ndarray, np.ndarray]:
    """Numbers in `unit` (or, for auto, in the unit of their magnitude band) -> floored seconds.

    NaN and inf are unparseable (null, not out of range); a finite number that fits no band is out
    of range. Bounds are checked in the number's own type before dividing, so nothing overflows.
    """
    values = _combine(column)
    kind = values.type
    valid = ~_fill(pc.is_null(values))
    if pa.types.is_floating(kind):
        valid &= _fill(pc.is_finite(values))
        raw = np.asarray(pc.fill_null(pc.cast(values, pa.float64()), 0.0).to_numpy(zero_copy_only=False))
    elif pa.types.is_unsigned_integer(kind) and kind.bit_width == 64:
        raw = pc.fill_null(values, 0).to_numpy(zero_copy_only=False)
        too_big = raw > np.uint64(_INT64_MAX)
        raw = np.where(too_big, np.uint64(_INT64_MAX), raw).astype(np.int64)
        raw[too_big] = -1  # below every band: out of range
    else:
        raw = pc.fill_null(pc.cast(values, pa.int64()), 0).to_numpy(zero_copy_only=False)
    code = np.full(len(values), -1, dtype=np.int8)
    if unit == "auto":
        for k in range(len(TIME_UNITS)):
            code[valid & (raw >= _AUTO_LOW[k]) & (raw <= _LATEST[k])] = k
    else:
        k = TIME_UNITS.index(unit)
        code[valid & (raw >= 0) & (raw <= _LATEST[k])] = k
    known = code >= 0
    per = _PER_SECOND[np.maximum(code, 0)]
    if raw.dtype.kind == "f":
        seconds = np.floor(np.where(known, raw, 0.0) / per).astype(np.int64)
    else:
        seconds = np.floor_divide(np.where(known, raw, 0), per)
    return pa.chunked_array([pa.array(seconds, mask=~known)]), valid & ~known, code


def _parse_iso(text: pa.ChunkedArray) -> pa.ChunkedArray:
    """ISO-8601 date or date-time text, optional fraction (dropped) and Z/±HH:MM offset, -> UTC seconds.

    The pieces are pulled apart with one regex, reassembled into a fixed layout and parsed with
    strptime(error_is_null=True), so an impossible date like 2026-13-01 becomes null, not an error.
    """
    parts = pc.extract_regex(text, _ISO)
    date = pc.struct_field(parts, "date")
    clock = pc.struct_field(parts, "clock")
    clock = pc.if_else(pc.equal(clock, ""), "00:00:00", clock)
    short = pc.equal(pc.utf8_length(clock), 5)  # HH:MM
    clock = pc.if_else(short, pc.binary_join_element_wise(clock, "00", ":"), clock)
    stamp = pc.binary_join_element_wise(date, clock, " ")
    local = pc.strptime(stamp, format="%Y-%m-%d %H:%M:%S", unit="s", error_is_null=True)
    seconds = pc.cast(local, pa.int64())
    zone = pc.replace_substring(pc.struct_field(parts, "zone"), ":", "")
    has_offset = pc.greater(pc.utf8_length(zone), 1)
    digits = _null_if(pc.invert(has_offset), zone)
    hours = pc.cast(pc.utf8_slice_codeunits(digits, 1, 3), pa.int64())
    minutes = pc.cast(pc.utf8_slice_codeunits(digits, 3, 5), pa.int64())
    sign = pc.if_else(pc.starts_with(digits, "-"), -1, 1)
    offset = pc.multiply(sign, pc.add(pc.multiply(hours, 3600), pc.multiply(minutes, 60)))
    # Local time minus its UTC offset is UTC; no zone (or Z) means the text is already UTC.
    return pc.subtract(seconds, pc.fill_null(offset, 0))


def _later_duplicates(
    clean: dict[str, pa.ChunkedArray], schema: SchemaConfig, candidates: np.ndarray
) -> np.ndarray:
    """True for a candidate row whose (user, item, time) an earlier candidate row already has."""
    rows = np.flatnonzero(candidates)
    duplicate = np.zeros(len(candidates), dtype=bool)
    if rows.size < 2:
        return duplicate
    take = pa.array(rows)
    user = _codes(clean[schema.user].take(take))
    item = _codes(clean[schema.item].take(take))
    time = clean[schema.time].take(take).to_numpy()
    order = np.lexsort((rows, time, item, user))
    same = (user[order][1:] == user[order][:-1]) & (item[order][1:] == item[order][:-1])
    same &= time[order][1:] == time[order][:-1]
    # Within a group the row numbers ascend, so everything after the group's first row repeats it.
    duplicate[rows[order[1:][same]]] = True
    return duplicate


def _codes(text: pa.ChunkedArray) -> np.ndarray:
    """Integer codes for strings (equal strings, equal codes), so sorting compares ints, not text."""
    encoded = pc.dictionary_encode(text.combine_chunks())
    return encoded.indices.to_numpy(zero_copy_only=False)


def quarantine_rows(table: pa.Table, schema: SchemaConfig, reason: np.ndarray) -> pa.Table:
    """Rejected rows with their reason and the original values as text, for a person to read."""
    bad = np.flatnonzero(reason != _KEPT)
    take = pa.array(bad)
    columns: dict[str, pa.Array | pa.ChunkedArray] = {
        "_file": pc.cast(table.column("_file").take(take), pa.string()),
        "_row": pc.cast(table.column("_row").take(take), pa.int64()),
        "_reason": pc.take(pa.array(REASONS, pa.string()), pa.array(reason[bad])),
    }
    # Every column type that reached this point was already turned into text or numbers above,
    # so this cast cannot fail.
    for name in required_columns(schema):
        columns[name] = pc.cast(_column(table, name).take(take), pa.string())
    return pa.table(columns)
