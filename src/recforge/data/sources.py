"""Readers for event logs: parquet, CSV and the MovieLens ratings files.

Every reader returns the same shape: the columns the schema needs, as they are in the file, plus
`_file` and `_row` so that a bad row found later can be traced back to the line a person can open.
CSV values come back as text on purpose: type inference would turn a stray "n/a" in a numeric
column into a whole-file failure (or silently into a string column), whereas the validator can
quarantine exactly the rows that do not parse. Likewise a row that cannot be split into the
header's columns (a ragged CSV line, a ratings.dat line without four fields) does not fail its file:
it comes back as a row of nulls flagged in `_malformed`, numbered like every other row, and the
validator quarantines it as malformed_row.
"""

from __future__ import annotations

import csv
import logging
import tempfile
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from recforge.config import SchemaConfig
from recforge.data.schema import (
    MALFORMED_COLUMN,
    MOVIELENS_COLUMNS,
    DataError,
    check_columns,
    required_columns,
)
from recforge.storage import StorageError, get_file, is_remote, list_tree, read_head

Format = Literal["auto", "parquet", "csv", "movielens"]
FileFormat = Literal["parquet", "csv", "movielens"]

_FORMATS = ("auto", "parquet", "csv", "movielens")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_PARQUET_MAGIC = b"PAR1"
_MOVIELENS_CSV_HEADER = ["userId", "movieId", "rating", "timestamp"]
_MOVIELENS_DAT_SEPARATOR = "::"
# Enough for any sane header line; a "header" longer than this is not a CSV header.
_HEADER_LIMIT = 1 << 20
_UTF8_BOM = b"\xef\xbb\xbf"
# Arrow parses CSV in blocks and a row may not span two of them, so a file with a longer line is
# read again with blocks that fit its longest line, up to this limit (memory grows with the block).
_BLOCK_LIMIT = 1 << 30
_MALFORMED_EXAMPLES = 3
_LOG = logging.getLogger(__name__)

# Data-row number (same numbering as `_row`) -> why that row could not be parsed.
Malformed = dict[int, str]


class SourceFile(NamedTuple):
    """One data file of a log: where it is (a local Path, or an s3:// / s3a:// URI), its name, format, size."""

    location: Path | str
    name: str
    format: FileFormat
    size: int


def read_events(path: str | Path, fmt: Format, schema: SchemaConfig, joined: tuple[str, ...] = ()) -> pa.Table:
    """Read one log file, or every data file of a directory (sorted by name) into one table.

    Columns: those `required_columns(schema)` names, then `_file` (name relative to `path`) and
    `_row` (1-based data-row number within that file: header and blank lines are not counted, so
    in a CSV without blank lines row N is line N + 1). If some file had rows that could not be
    parsed, `_malformed` follows: True on those rows, whose values are null. Columns are checked
    against the schema from the parquet footer or the CSV header before any row is read, so a wrong
    file fails fast; a file that has one of the `joined` columns (those an attribute table brings)
    fails too, rather than one of the two values being dropped unseen.
    """
    files = list_files(path, fmt)
    tables = [read_file(file.location, file.name, file.format, schema, joined) for file in files]
    return _concat(tables, [file.name for file in files], path)


def list_files(path: str | Path, fmt: Format) -> list[SourceFile]:
    """The data files `read_events` reads, in its order (by name relative to `path`)."""
    if fmt not in _FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected one of {', '.join(_FORMATS)}")
    if is_remote(path):
        return _list_remote(str(path), fmt)
    scheme = str(path).split("://", 1)[0] if "://" in str(path) else "file"
    if scheme != "file":
        raise DataError(f"{path}: {scheme}:// sources are not read; use a local or mounted path, s3:// or s3a://")
    root = Path(str(path).removeprefix("file://"))
    if not root.exists():
        raise DataError(f"no such file or directory: {root}")
    if root.is_dir():
        files = _data_files(root)
        formats = [detect_format(file) if fmt == "auto" else fmt for file, _ in files]
        if fmt == "auto":
            _check_one_format(root, [name for _, name in files], formats)
    else:
        files = [(root, root.name)]
        formats = [detect_format(root) if fmt == "auto" else fmt]
    return [SourceFile(file, name, file_fmt, file.stat().st_size)
            for (file, name), file_fmt in zip(files, formats, strict=True)]


def _list_remote(uri: str, fmt: Format) -> list[SourceFile]:
    """A log on an object store: the same hidden-name and suffix rules as a local directory."""
    try:
        listed = list_tree(uri)
    except StorageError as exc:
        raise DataError(f"cannot list {uri}: {_one_line(exc)}") from exc
    if not listed:
        raise DataError(f"no such file or prefix: {uri}")
    single = len(listed) == 1 and uri.rstrip("/").endswith("/" + listed[0][0])
    # One object named explicitly is read whatever its name, as a local file is.
    kept = listed if single else [(name, size) for name, size in listed if _listed_data_file(name)]
    if not kept:
        raise DataError(f"{uri} holds no data files (.parquet, .pq, .csv, .dat or u.data; "
                        "names starting with '.' or '_' are ignored)")
    base = uri.rstrip("/")
    locations = [base if single else f"{base}/{name}" for name, _ in kept]
    formats: list[FileFormat] = [_remote_format(location) if fmt == "auto" else fmt for location in locations]
    if fmt == "auto" and not single:
        _check_one_format(Path(uri), [name for name, _ in kept], formats)
    return [SourceFile(location, name, file_fmt, size)
            for location, (name, size), file_fmt in zip(locations, kept, formats, strict=True)]


def _listed_data_file(name: str) -> bool:
    """The rule of _data_files for a name relative to the listed prefix."""
    return _is_data_file(name.rsplit("/", 1)[-1]) and not any(part.startswith((".", "_")) for part in name.split("/"))


def _remote_format(uri: str) -> FileFormat:
    lower = uri.rsplit("/", 1)[-1].lower()
    if lower.endswith(".csv"):
        head = read_head(uri, _HEADER_LIMIT).split(b"\n", 1)[0]
        return "movielens" if _header_fields(head, uri) == _MOVIELENS_CSV_HEADER else "csv"
    return detect_format(uri)


def detect_format(path: str | Path) -> FileFormat:
    """Pick the reader from the file name; a .csv is MovieLens only if its header says so."""
    file = Path(path)
    lower = file.name.lower()
    if lower == "u.data" or lower.endswith(".dat"):
        return "movielens"
    if lower.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(".csv"):
        _check_not_empty(file)
        return "movielens" if read_header(file) == _MOVIELENS_CSV_HEADER else "csv"
    raise DataError(
        f"cannot tell the format of {file} from its name (expected .parquet, .pq, .csv, .dat or u.data); "
        "set the data format to parquet, csv or movielens"
    )


def _is_data_file(name: str) -> bool:
    lower = name.lower()
    return lower == "u.data" or lower.endswith((*_PARQUET_SUFFIXES, ".csv", ".dat"))


def _data_files(root: Path) -> list[tuple[Path, str]]:
    """Data files under `root` (recursively, for partition folders), hidden ones skipped.

    Names starting with '.' or '_' are what writers leave behind (_SUCCESS, .crc, temp files of an
    atomic write in progress), so reading them would mix half-written or non-data files in.
    """
    found: list[tuple[Path, str]] = []
    for file in root.rglob("*"):
        rel = file.relative_to(root)
        if any(part.startswith((".", "_")) for part in rel.parts):
            continue
        if file.is_file() and _is_data_file(file.name):
            found.append((file, rel.as_posix()))
    if not found:
        raise DataError(
            f"directory {root} holds no data files (.parquet, .pq, .csv, .dat or u.data; "
            "names starting with '.' or '_' are ignored)"
        )
    return sorted(found, key=lambda pair: pair[1])


def _check_one_format(root: Path, names: list[str], formats: list[FileFormat]) -> None:
    first: dict[str, str] = {}
    for name, file_fmt in zip(names, formats, strict=True):
        first.setdefault(file_fmt, name)
    if len(first) > 1:
        listed = ", ".join(f"{name} ({file_fmt})" for file_fmt, name in first.items())
        raise DataError(f"directory {root} mixes formats: {listed}; keep one format per directory")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _check_not_empty(file: Path) -> None:
    if file.stat().st_size == 0:
        raise DataError(f"{file} is empty: no data rows")


def read_file(file: Path | str, name: str, fmt: FileFormat, schema: SchemaConfig, joined: tuple[str, ...] = ()
              ) -> pa.Table:
    """One data file with `_file` = `name` and `_row` numbers (see read_events).

    A file on an object store is copied to local disk first (one file at a time, removed after):
    the readers need random access (parquet footers, a second pass for long CSV lines), and errors
    name the URI, not the copy.
    """
    if is_remote(file):
        return _read_remote(str(file), name, fmt, schema, joined)
    file = Path(file)
    _check_not_empty(file)
    with open(file, "rb") as handle:
        is_parquet = handle.read(len(_PARQUET_MAGIC)) == _PARQUET_MAGIC
    if fmt == "parquet" and not is_parquet:
        raise DataError(
            f"{file} is not a parquet file (no parquet magic bytes); use format csv, movielens or auto"
        )
    if fmt != "parquet" and is_parquet:
        raise DataError(f"{file} is a parquet file, not {fmt}; use format parquet or auto")
    malformed: Malformed = {}
    try:
        if fmt == "parquet":
            table = _read_parquet(file, schema, joined)
        elif fmt == "csv":
            table, malformed = _read_csv(file, schema, joined)
        else:
            table, malformed = _read_movielens(file, schema, joined)
    except DataError:
        raise
    except (pa.ArrowException, OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cannot read {file} as {fmt}: {_one_line(exc)}") from exc
    if table.num_rows == 0 and not malformed:
        raise DataError(f"{file} is empty: no data rows")
    return _number_rows(table, name, malformed, file)


def _read_remote(uri: str, name: str, fmt: FileFormat, schema: SchemaConfig, joined: tuple[str, ...]) -> pa.Table:
    with tempfile.TemporaryDirectory(prefix="recforge-source-") as scratch:
        local = Path(scratch) / uri.rsplit("/", 1)[-1]
        try:
            get_file(uri, local)
        except (StorageError, FileNotFoundError) as exc:
            raise DataError(f"cannot download {uri}: {_one_line(exc)}") from exc
        try:
            return read_file(local, name, fmt, schema, joined)
        except DataError as exc:
            raise DataError(str(exc).replace(str(local), uri)) from exc


def _number_rows(table: pa.Table, name: str, malformed: Malformed, file: Path) -> pa.Table:
    """Add `_file` and `_row`; put malformed rows back, as nulls, at their own row numbers.

    The good rows are numbered by what is left of 1..total once the malformed rows' numbers are
    taken, so every `_row` still points at the row a person finds in the file.
    """
    if not malformed:
        rows = pa.array(np.arange(1, table.num_rows + 1, dtype=np.int64))
        return table.append_column("_file", pa.repeat(name, table.num_rows)).append_column("_row", rows)
    total = table.num_rows + len(malformed)
    bad = np.array(sorted(malformed), dtype=np.int64)
    if bad[0] < 1 or bad[-1] > total:
        raise DataError(f"cannot read {file}: malformed row numbers {bad[0]}..{bad[-1]} outside 1..{total}")
    good = np.setdiff1d(np.arange(1, total + 1, dtype=np.int64), bad, assume_unique=True)
    nulls = pa.table({field.name: pa.nulls(bad.size, field.type) for field in table.schema})
    both = pa.concat_tables([table, nulls])
    rows = np.concatenate([good, bad])
    flags = np.concatenate([np.zeros(good.size, dtype=bool), np.ones(bad.size, dtype=bool)])
    both = both.append_column("_file", pa.repeat(name, total)).append_column("_row", pa.array(rows))
    both = both.append_column(MALFORMED_COLUMN, pa.array(flags))
    examples = "; ".join(f"row {row}: {malformed[row]}" for row in bad[:_MALFORMED_EXAMPLES].tolist())
    _LOG.warning("%s: %d row(s) could not be parsed and go to the quarantine as malformed_row (%s%s)",
                 file, bad.size, examples, "; ..." if bad.size > _MALFORMED_EXAMPLES else "")
    # `rows` is a permutation of 1..total: invert it (O(n)) rather than sort it (O(n log n)).
    order = np.empty(total, dtype=np.int64)
    order[rows - 1] = np.arange(total, dtype=np.int64)
    return both.take(pa.array(order))


def _read_parquet(file: Path, schema: SchemaConfig, joined: tuple[str, ...]) -> pa.Table:
    parquet = pq.ParquetFile(file)
    check_columns(parquet.schema_arrow.names, schema, str(file), joined)
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{file} is empty: no data rows")
    return parquet.read(columns=required_columns(schema))


def read_header(file: Path) -> list[str]:
    """The first line of a delimited file, parsed with CSV quoting rules."""
    with open(file, "rb") as handle:
        head = handle.readline(_HEADER_LIMIT)
    return _header_fields(head, file)


def _header_fields(head: bytes, file: Path | str) -> list[str]:
    if head.startswith(_UTF8_BOM):
        head = head[len(_UTF8_BOM) :]
    try:
        line = head.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: the header line is not UTF-8 text ({_one_line(exc)})") from exc
    return next(csv.reader([line]), [])


def _text_options(columns: list[str]) -> pcsv.ConvertOptions:
    # Only empty cells are missing: "NA" or "null" might be a real id, so they stay text and the
    # validator decides what they mean for each column.
    return pcsv.ConvertOptions(
        column_types={name: pa.string() for name in columns},
        include_columns=columns,
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
        null_values=[""],
    )


def _read_csv(file: Path, schema: SchemaConfig, joined: tuple[str, ...]) -> tuple[pa.Table, Malformed]:
    header = read_header(file)
    check_columns(header, schema, str(file), joined)
    columns = required_columns(schema)
    repeated = [name for name in columns if header.count(name) > 1]
    if repeated:
        raise DataError(f"{file}: column(s) {', '.join(repeated)} appear more than once in the header")
    return _read_delimited(file, {}, {}, _text_options(columns), header_rows=1)


def _read_delimited(
    file: Path, read: dict, parse: dict, convert: pcsv.ConvertOptions, header_rows: int
) -> tuple[pa.Table, Malformed]:
    """Arrow's CSV reader, skipping (and returning) rows whose field count is wrong.

    Arrow numbers invalid rows only when parsing on one thread, so a file that has any is read
    again that way; so is a file with a line longer than a block, with blocks that fit it.
    Arrow counts the header and skips blank lines like `_row` does, so a row's number minus the
    header lines is its `_row`.
    """
    found: list[tuple[int | None, str]] = []

    def on_invalid(row: pcsv.InvalidRow) -> str:
        found.append((row.number, f"expected {row.expected_columns} columns, got {row.actual_columns}"))
        return "skip"

    def attempt(use_threads: bool, block_size: int | None) -> pa.Table:
        found.clear()
        sized = {"block_size": block_size} if block_size else {}
        options = pcsv.ReadOptions(use_threads=use_threads, **sized, **read)
        parse_options = pcsv.ParseOptions(invalid_row_handler=on_invalid, **parse)
        return pcsv.read_csv(file, read_options=options, parse_options=parse_options, convert_options=convert)

    block_size = None
    try:
        table = attempt(True, None)
    except pa.ArrowInvalid as exc:
        if "straddl" not in str(exc):
            raise
        block_size = _block_for_longest_line(file)
        table = attempt(False, block_size)
    if any(number is None for number, _ in found):
        table = attempt(False, block_size)
    return table, {int(number) - header_rows: why for number, why in found if number is not None}


def _block_for_longest_line(file: Path) -> int:
    """A block size that holds the file's longest line, scanned in bounded chunks."""
    longest = current = 0
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 24):
            ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == ord("\n"))
            if ends.size == 0:
                current += len(chunk)
                continue
            longest = max(longest, current + int(ends[0]) + 1)
            if ends.size > 1:
                longest = max(longest, int(np.diff(ends).max()))
            current = len(chunk) - int(ends[-1]) - 1
    longest = max(longest, current)
    if longest + (1 << 20) > _BLOCK_LIMIT:
        raise DataError(
            f"cannot read {file}: a line is {longest:,} bytes long, more than the "
            f"{_BLOCK_LIMIT:,}-byte limit for one row; split or remove that line"
        )
    mib = 1 << 20
    return (longest // mib + 2) * mib


def _read_movielens(file: Path, schema: SchemaConfig, joined: tuple[str, ...]) -> tuple[pa.Table, Malformed]:
    lower = file.name.lower()
    check_columns(list(MOVIELENS_COLUMNS), schema, str(file), joined)
    columns = required_columns(schema)
    if lower.endswith(".dat"):
        table, malformed = _read_double_colon(file)
        return table.select(columns), malformed
    names = list(MOVIELENS_COLUMNS)
    if lower.endswith(".csv"):
        header = read_header(file)
        if header != _MOVIELENS_CSV_HEADER:
            raise DataError(
                f"{file}: header {','.join(header)} is not the MovieLens ratings.csv header "
                f"{','.join(_MOVIELENS_CSV_HEADER)}; use format csv for other CSV files"
            )
        read = {"column_names": names, "skip_rows": 1}
        parse: dict = {"delimiter": ","}
        header_rows = 1
    else:
        # u.data (and the u1.base/u1.test splits): tab separated, no header.
        read = {"column_names": names}
        parse = {"delimiter": "\t", "quote_char": False}
        header_rows = 0
    return _read_delimited(file, read, parse, _text_options(columns), header_rows)


def _read_double_colon(file: Path) -> tuple[pa.Table, Malformed]:
    """ratings.dat: `user::item::rating::timestamp` lines, no header.

    Arrow's CSV reader takes one-character delimiters only, so lines are cut out of the raw bytes
    with numpy (one string array over the file buffer, no copy per line) and split with
    `split_pattern`. Lines without exactly four fields are left out and returned as malformed.
    """
    data = file.read_bytes()
    start = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n"))
    offsets = np.concatenate(([start], newlines[newlines >= start] + 1, [len(data)])).astype(np.int64)
    lines = pa.Array.from_buffers(
        pa.large_string(), len(offsets) - 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )
    lines.validate(full=True)  # rejects bytes that are not UTF-8
    lines = pc.utf8_rtrim(lines, characters="\r\n")
    lines = lines.filter(pc.not_equal(pc.utf8_length(lines), 0))
    if len(lines) == 0:
        return pa.table({name: pa.array([], pa.string()) for name in MOVIELENS_COLUMNS}), {}
    fields = pc.split_pattern(lines, _MOVIELENS_DAT_SEPARATOR)
    counts = pc.list_value_length(fields).to_numpy(zero_copy_only=False)
    wrong = counts != len(MOVIELENS_COLUMNS)
    malformed = {
        int(row) + 1: f"has {int(counts[row])} fields, expected 4 separated by '::' (user::item::rating::timestamp)"
        for row in np.flatnonzero(wrong)
    }
    if malformed:
        fields = fields.filter(pa.array(~wrong))
    columns = {}
    for index, name in enumerate(MOVIELENS_COLUMNS):
        values = pc.cast(pc.list_element(fields, index), pa.string())
        columns[name] = pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)
    return pa.table(columns), malformed


def _concat(tables: list[pa.Table], names: list[str], root: Path | str) -> pa.Table:
    """Stack per-file tables; columns whose types disagree between files fall back to text.

    Partitions written at different times often differ in width (int32 vs int64) or time unit;
    Arrow promotes those. What it cannot promote (int in one file, string in another) becomes text,
    which the validator parses per row instead of failing the whole read.
    """
    if len(tables) == 1:
        return tables[0]
    if any(MALFORMED_COLUMN in table.column_names for table in tables):
        tables = [
            table if MALFORMED_COLUMN in table.column_names
            else table.append_column(MALFORMED_COLUMN, pa.repeat(False, table.num_rows))
            for table in tables
        ]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        pass
    columns = tables[0].column_names
    mixed = [c for c in columns if len({str(t.schema.field(c).type) for t in tables}) > 1]
    fixed = []
    for table, name in zip(tables, names, strict=True):
        for column in mixed:
            index = table.schema.get_field_index(column)
            try:
                text = pc.cast(table.column(column), pa.string())
            except pa.ArrowException as exc:
                raise DataError(
                    f"{root}: column '{column}' of {name} has type {table.schema.field(column).type}, "
                    f"which other files do not share and which cannot be read as text ({_one_line(exc)})"
                ) from exc
            table = table.set_column(index, column, text)
        fixed.append(table)
    return pa.concat_tables(fixed)
