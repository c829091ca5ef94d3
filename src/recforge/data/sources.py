"""Readers for event logs: parquet, CSV and the MovieLens ratings files.

Every reader returns the same shape: the columns the schema needs, as they are in the file, plus
`_file` and `_row` so that a bad row found later can be traced back to the line a person can open.
CSV values come back as text on purpose: type inference would turn a stray "n/a" in a numeric
column into a whole-file failure (or silently into a string column), whereas the validator can
quarantine exactly the rows that do not parse.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from recforge.config import SchemaConfig
from recforge.data.schema import MOVIELENS_COLUMNS, DataError, check_columns, required_columns

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


def read_events(path: str | Path, fmt: Format, schema: SchemaConfig) -> pa.Table:
    """Read one log file, or every data file of a directory (sorted by name) into one table.

    Columns: those `required_columns(schema)` names, then `_file` (name relative to `path`) and
    `_row` (1-based data-row number within that file). Columns are checked against the schema
    from the parquet footer or the CSV header before any row is read, so a wrong file fails fast.
    """
    if fmt not in _FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected one of {', '.join(_FORMATS)}")
    root = Path(path)
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
    tables = [
        _read_file(file, name, file_fmt, schema)
        for (file, name), file_fmt in zip(files, formats, strict=True)
    ]
    return _concat(tables, [name for _, name in files], root)


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
        return "movielens" if _read_header(file) == _MOVIELENS_CSV_HEADER else "csv"
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


def _read_file(file: Path, name: str, fmt: FileFormat, schema: SchemaConfig) -> pa.Table:
    _check_not_empty(file)
    with open(file, "rb") as handle:
        is_parquet = handle.read(len(_PARQUET_MAGIC)) == _PARQUET_MAGIC
    if fmt == "parquet" and not is_parquet:
        raise DataError(
            f"{file} is not a parquet file (no parquet magic bytes); use format csv, movielens or auto"
        )
    if fmt != "parquet" and is_parquet:
        raise DataError(f"{file} is a parquet file, not {fmt}; use format parquet or auto")
    try:
        if fmt == "parquet":
            table = _read_parquet(file, schema)
        elif fmt == "csv":
            table = _read_csv(file, schema)
        else:
            table = _read_movielens(file, schema)
    except DataError:
        raise
    except (pa.ArrowException, OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cannot read {file} as {fmt}: {_one_line(exc)}") from exc
    if table.num_rows == 0:
        raise DataError(f"{file} is empty: no data rows")
    rows = pa.array(np.arange(1, table.num_rows + 1, dtype=np.int64))
    return table.append_column("_file", pa.repeat(name, table.num_rows)).append_column("_row", rows)


def _read_parquet(file: Path, schema: SchemaConfig) -> pa.Table:
    parquet = pq.ParquetFile(file)
    check_columns(parquet.schema_arrow.names, schema, str(file))
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{file} is empty: no data rows")
    return parquet.read(columns=required_columns(schema))


def _read_header(file: Path) -> list[str]:
    """The first line of a delimited file, parsed with CSV quoting rules."""
    with open(file, "rb") as handle:
        head = handle.readline(_HEADER_LIMIT)
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


def _read_csv(file: Path, schema: SchemaConfig) -> pa.Table:
    header = _read_header(file)
    check_columns(header, schema, str(file))
    columns = required_columns(schema)
    repeated = [name for name in columns if header.count(name) > 1]
    if repeated:
        raise DataError(f"{file}: column(s) {', '.join(repeated)} appear more than once in the header")
    return pcsv.read_csv(file, convert_options=_text_options(columns))


def _read_movielens(file: Path, schema: SchemaConfig) -> pa.Table:
    lower = file.name.lower()
    check_columns(list(MOVIELENS_COLUMNS), schema, str(file))
    columns = required_columns(schema)
    if lower.endswith(".dat"):
        return _read_double_colon(file).select(columns)
    names = list(MOVIELENS_COLUMNS)
    if lower.endswith(".csv"):
        header = _read_header(file)
        if header != _MOVIELENS_CSV_HEADER:
            raise DataError(
                f"{file}: header {','.join(header)} is not the MovieLens ratings.csv header "
                f"{','.join(_MOVIELENS_CSV_HEADER)}; use format csv for other CSV files"
            )
        read = pcsv.ReadOptions(column_names=names, skip_rows=1)
        parse = pcsv.ParseOptions(delimiter=",")
    else:
        # u.data (and the u1.base/u1.test splits): tab separated, no header.
        read = pcsv.ReadOptions(column_names=names)
        parse = pcsv.ParseOptions(delimiter="\t", quote_char=False)
    return pcsv.read_csv(file, read_options=read, parse_options=parse, convert_options=_text_options(columns))


def _read_double_colon(file: Path) -> pa.Table:
    """ratings.dat: `user::item::rating::timestamp` lines, no header.

    Arrow's CSV reader takes one-character delimiters only, so lines are cut out of the raw bytes
    with numpy (one string array over the file buffer, no copy per line) and split with
    `split_pattern`.
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
        return pa.table({name: pa.array([], pa.string()) for name in MOVIELENS_COLUMNS})
    fields = pc.split_pattern(lines, _MOVIELENS_DAT_SEPARATOR)
    counts = pc.list_value_length(fields).to_numpy(zero_copy_only=False)
    wrong = np.flatnonzero(counts != len(MOVIELENS_COLUMNS))
    if wrong.size:
        raise DataError(
            f"cannot read {file} as movielens: data row {int(wrong[0]) + 1} "
            f"has {int(counts[wrong[0]])} fields, "
            f"expected 4 separated by '::' (user::item::rating::timestamp); {wrong.size} such row(s)"
        )
    columns = {}
    for index, name in enumerate(MOVIELENS_COLUMNS):
        values = pc.cast(pc.list_element(fields, index), pa.string())
        columns[name] = pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)
    return pa.table(columns)


def _concat(tables: list[pa.Table], names: list[str], root: Path) -> pa.Table:
    """Stack per-file tables; columns whose types disagree between files fall back to text.

    Partitions written at different times often differ in width (int32 vs int64) or time unit;
    Arrow promotes those. What it cannot promote (int in one file, string in another) becomes text,
    which the validator parses per row instead of failing the whole read.
    """
    if len(tables) == 1:
        return tables[0]
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
