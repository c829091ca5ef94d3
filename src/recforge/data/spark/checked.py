"""Stage 1 on Spark: every file read and checked by recforge's own readers and row rules, files packed into tasks.

A task runs `sources.read_file` and `validate.check_rows` on its file, exactly as the local engine
does, so row numbers, parsing, time units and quarantine reasons are identical by construction;
what crosses files (duplicate events, the counts) is computed by Spark afterwards. A file that
cannot be read comes back as an error row naming it: the job finishes, and the preparation fails
with every unreadable file listed, instead of an executor traceback.

Each row carries `_order` = file index << 40 | row number: the log's input order as one integer,
the order every later stage sorts by.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recforge.config import SchemaConfig
from recforge.data.attributes import Attributes
from recforge.data.schema import DataError, column_roles, required_columns
from recforge.data.sources import list_files, read_file
from recforge.data.validate import REASONS, TIME_UNITS, check_rows, quarantine_rows, unit_counts
from recforge.storage import atomic_open, write_json

ORDER_BITS = 40  # rows per file below 2**40; files below 2**23
_KEPT = -1
_BATCH_ROWS = 65536
_SHOWN_ERRORS = 5
_TASK_BYTES = 128 << 20  # as spark.sql.files.maxPartitionBytes: a task reads about this much
_TASKS_PER_CORE = 2


def pack_files(sizes: list[int], parallelism: int) -> list[list[int]]:
    """Consecutive file indices grouped into tasks of about equal bytes (a large file is a task alone).

    One task per file costs a task's start-up per file, which dominates a log of many small files;
    the target is the smaller of _TASK_BYTES and an even share over the cluster's cores, so a small
    log still keeps every core busy.
    """
    total = sum(sizes)
    target = max(1, min(_TASK_BYTES, total // max(1, parallelism * _TASKS_PER_CORE)))
    groups: list[list[int]] = [[]]
    filled = 0
    for index, size in enumerate(sizes):
        if groups[-1] and filled + size > target:
            groups.append([])
            filled = 0
        groups[-1].append(index)
        filled += size
    return groups if groups[0] else []


def clean_types(schema: SchemaConfig) -> dict[str, pa.DataType]:
    """The type of each required column after validation."""
    kinds = {"time": pa.int64(), "label": pa.float64(), "numeric": pa.float64()}
    return {name: kinds.get(role, pa.string()) for name, role in column_roles(schema).items()}


def checked_schema(schema: SchemaConfig) -> pa.Schema:
    fields = [pa.field(name, kind) for name, kind in clean_types(schema).items()]
    fields += [pa.field("_file", pa.string()), pa.field("_row", pa.int64()), pa.field("_order", pa.int64()),
               pa.field("_reason", pa.int8()), pa.field("_unit", pa.int8()), pa.field("_error", pa.string())]
    fields += [pa.field(f"_raw_{name}", pa.string()) for name in required_columns(schema)]
    return pa.schema(fields)


def _batches(columns: dict[str, Any], target: pa.Schema) -> Iterator[pa.RecordBatch]:
    n = len(next(iter(columns.values())))
    arrays = [columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in target]
    table = pa.Table.from_arrays([pa.chunked_array([a]) if isinstance(a, pa.Array) else a for a in arrays],
                                 schema=target)
    yield from table.to_batches(max_chunksize=_BATCH_ROWS)


def _checked_rows(index: int, path: str, name: str, fmt: str, schema: SchemaConfig, target: pa.Schema,
                  attributes: Attributes) -> Iterator[pa.RecordBatch]:
    try:
        table = read_file(path, name, fmt, attributes.file_schema(schema), attributes.columns)  # type: ignore[arg-type]
        checks = check_rows(attributes.join(table), schema)
    except DataError as exc:
        yield from _batches({"_file": pa.array([name]), "_error": pa.array([str(exc)])}, target)
        return
    rows = np.asarray(checks.table.column("_row").to_numpy(), dtype=np.int64)
    order = (np.int64(index) << ORDER_BITS) | rows
    kept = np.flatnonzero(checks.reason == _KEPT)
    take = pa.array(kept)
    columns: dict[str, Any] = {column: checks.clean[column].take(take) for column in clean_types(schema)}
    columns.update({"_file": pa.repeat(name, len(kept)), "_row": pa.array(rows[kept]),
                    "_order": pa.array(order[kept]), "_reason": pa.array(checks.reason[kept]),
                    "_unit": pa.array(checks.unit[kept])})
    yield from _batches(columns, target)
    bad = np.flatnonzero(checks.reason != _KEPT)
    if len(bad):
        quarantined = quarantine_rows(checks.table, schema, checks.reason)
        columns = {f"_raw_{column}": quarantined.column(column) for column in required_columns(schema)}
        columns.update({"_file": pa.repeat(name, len(bad)), "_row": pa.array(rows[bad]),
                        "_order": pa.array(order[bad]), "_reason": pa.array(checks.reason[bad]),
                        "_unit": pa.array(checks.unit[bad])})
        yield from _batches(columns, target)


def check_files(spark: Any, source: str | Path, fmt: str, schema: SchemaConfig,
                attributes: Attributes = Attributes()) -> Any:
    """A DataFrame of every row of every file: clean columns, reason, unit, order, raw text if rejected
    (each file joined with the attribute tables, broadcast once to the executors)."""
    files = list_files(source, fmt)  # type: ignore[arg-type]
    if len(files) >= 1 << (63 - ORDER_BITS):
        raise DataError(f"{source}: {len(files):,} files; at most {1 << (63 - ORDER_BITS):,} can be ordered")
    target = checked_schema(schema)
    listing = pa.table({"index": pa.array(range(len(files)), pa.int64()),
                        "path": [str(file.location) for file in files], "name": [file.name for file in files],
                        "format": [file.format for file in files]})

    shared = spark.sparkContext.broadcast(attributes)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for index, path, name, file_fmt in zip(*(batch.column(i).to_pylist() for i in range(4)), strict=True):
                yield from _checked_rows(index, path, name, file_fmt, schema, target, shared.value)

    rows = listing.to_pylist()
    groups = pack_files([file.size for file in files], spark.sparkContext.defaultParallelism)
    tasks = spark.sparkContext.parallelize([[rows[i] for i in group] for group in groups], max(1, len(groups)))
    listed = spark.createDataFrame(tasks.flatMap(lambda group: group),
                                   "index long, path string, name string, format string")
    from pyspark.sql.pandas.types import from_arrow_schema

    return listed.mapInArrow(run, from_arrow_schema(target))


def raise_unreadable(checked: Any) -> None:
    """Fail, naming the files, when any file could not be read (the local engine fails on the first)."""
    errors = checked.filter(checked["_error"].isNotNull()).select("_file", "_error").orderBy("_file")
    count = errors.count()
    if count:
        shown = "; ".join(row["_error"] for row in errors.limit(_SHOWN_ERRORS).collect())
        more = f" (and {count - _SHOWN_ERRORS} more)" if count > _SHOWN_ERRORS else ""
        raise DataError(f"{count} file(s) could not be read: {shown}{more}")


def mark_duplicates(checked: Any, schema: SchemaConfig) -> Any:
    """duplicate_event on every kept row whose (user, item, time) an earlier kept row already has."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    first = Window.partitionBy(schema.user, schema.item, schema.time).orderBy("_order")
    duplicate = F.lit(REASONS.index("duplicate_event")).cast("byte")
    ranked = F.when(F.col("_reason") == _KEPT, F.row_number().over(first))
    return checked.withColumn("_reason", F.when(ranked > 1, duplicate).otherwise(F.col("_reason")))


@dataclass(frozen=True)
class SparkValidation:
    """What validation kept and rejected, as counts (the rows stay in Spark); ValidationResult's report()."""

    counts: dict[str, int]
    rows_read: int
    rows_kept: int
    null_context: dict[str, int]
    time_units: dict[str, int]

    @property
    def rows_quarantined(self) -> int:
        return self.rows_read - self.rows_kept

    def report(self) -> dict[str, Any]:
        from recforge.data.validate import REPORT_VERSION

        return {"version": REPORT_VERSION, "rows_read": self.rows_read, "rows_kept": self.rows_kept,
                "rows_quarantined": self.rows_quarantined, "by_reason": dict(self.counts),
                "null_context": dict(self.null_context), "time_units": dict(self.time_units)}


def summarize(checked: Any, schema: SchemaConfig) -> SparkValidation:
    """The report's numbers in one aggregation over reason and unit, one over the kept rows' nulls."""
    from pyspark.sql import functions as F

    by = {(row["_reason"], row["_unit"]): row["count"]
          for row in checked.groupBy("_reason", "_unit").count().collect()}
    reasons = np.zeros(len(REASONS), dtype=np.int64)
    units = np.zeros(len(TIME_UNITS), dtype=np.int64)
    for (reason, unit), count in by.items():
        if reason >= 0:
            reasons[reason] += count
        if unit >= 0:
            units[unit] += count
    kept = checked.filter(F.col("_reason") == _KEPT)
    context = [*schema.context, *schema.item_features]
    nulls = kept.agg(*[F.sum(F.col(c).isNull().cast("long")).alias(c) for c in context]).collect()[0] \
        if context else {}
    return SparkValidation(
        counts={name: int(count) for name, count in zip(REASONS, reasons, strict=True)},
        rows_read=int(sum(by.values())), rows_kept=int(sum(c for (r, _), c in by.items() if r == _KEPT)),
        null_context={c: int(nulls[c] or 0) for c in context}, time_units=unit_counts(units, schema.time))


def write_quarantine(checked: Any, schema: SchemaConfig, staging: Path, out: Path) -> None:
    """The rejected rows in input order as one quarantine.parquet (merged part by part: bounded memory).

    Duplicates carry their normalized values (the kept row's): those are what made them duplicates.
    """
    from pyspark.sql import functions as F

    reasons = F.element_at(F.array(*[F.lit(r) for r in REASONS]), F.col("_reason").cast("int") + 1)
    duplicate = F.col("_reason") == REASONS.index("duplicate_event")
    columns = [F.col("_file"), F.col("_row"), reasons.alias("_reason")]
    columns += [F.when(duplicate, F.col(c).cast("string")).otherwise(F.col(f"_raw_{c}")).alias(c)
                for c in required_columns(schema)]
    parts = staging / "quarantine"
    checked.filter(F.col("_reason") != _KEPT).orderBy("_order").select(*columns) \
        .write.mode("overwrite").parquet(str(parts))
    target = pa.schema([pa.field("_file", pa.string()), pa.field("_row", pa.int64()),
                        pa.field("_reason", pa.string()),
                        *[pa.field(c, pa.string()) for c in required_columns(schema)]])
    with atomic_open(out, "wb") as handle, pq.ParquetWriter(handle, target) as writer:
        for part in sorted(parts.glob("part-*.parquet")):
            for batch in pq.ParquetFile(part).iter_batches():
                writer.write_batch(pa.RecordBatch.from_arrays(
                    [batch.column(f.name).cast(f.type) for f in target], schema=target))


def write_report(validation: SparkValidation, out: Path) -> None:
    write_json(out, validation.report())
