"""Exact order statistics on Spark: dense positions in a sort order, and the k-th smallest value.

Both are exact, not approximate: the local engine numbers users by first appearance and cuts the
time split at exact ranks, and the Spark engine must give the same numbers. Neither collects rows
to the driver: positions come from per-partition counts of a range sort, the k-th value from a
coarse histogram and then one bucket's distinct values.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

# Coarse buckets of 2**16 seconds (~18 h) for the k-th value: a year of log is ~480 buckets, and the
# bucket holding the rank has at most 65,536 distinct seconds.
_COARSE_SHIFT = 16


def dense_index(df: Any, order: list[str], out: str, partitions: int) -> Any:
    """`df` with `out` = 0-based position of each row in ascending `order` (ties must not occur).

    A range sort puts contiguous slices of the order in consecutive partitions; each partition
    numbers its rows, and the partition's offset is the sum of the counts before it. The sorted
    frame is cached so the counting pass and the numbering pass see the same partitions.
    """
    from pyspark import StorageLevel, TaskContext
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType, StructField, StructType

    ranged = df.repartitionByRange(partitions, *order).sortWithinPartitions(*order)
    ranged = ranged.withColumn("_partition", F.spark_partition_id())
    ranged.persist(StorageLevel.MEMORY_AND_DISK)
    counts = {row["_partition"]: row["count"] for row in ranged.groupBy("_partition").count().collect()}
    offsets = np.zeros(partitions + 1, dtype=np.int64)
    for partition, count in counts.items():
        offsets[partition + 1] = count
    offsets = np.cumsum(offsets)
    names = ranged.columns

    def number(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        position = int(offsets[TaskContext.get().partitionId()])
        for batch in batches:
            n = batch.num_rows
            yield pa.RecordBatch.from_arrays(
                [*batch.columns, pa.array(np.arange(position, position + n, dtype=np.int64))], names=[*names, out])
            position += n

    schema = StructType([*ranged.schema.fields, StructField(out, LongType(), False)])  # add() would mutate ranged's
    return ranged.mapInArrow(number, schema).drop("_partition")


def kth_smallest(df: Any, column: str, ranks: list[int]) -> list[int]:
    """The value at each 0-based rank of `column` sorted ascending (an integer column without nulls)."""
    from pyspark.sql import functions as F

    coarse = F.shiftright(F.col(column), _COARSE_SHIFT)
    histogram = sorted((row["_bucket"], row["count"])
                       for row in df.groupBy(coarse.alias("_bucket")).count().collect())
    buckets = np.array([b for b, _ in histogram], dtype=np.int64)
    ends = np.cumsum([c for _, c in histogram])
    values = []
    for rank in ranks:
        at = int(np.searchsorted(ends, rank, side="right"))
        before = int(ends[at - 1]) if at else 0
        fine = sorted((row[column], row["count"]) for row in
                      df.filter(coarse == int(buckets[at])).groupBy(column).count().collect())
        fine_ends = np.cumsum([c for _, c in fine])
        values.append(int(fine[int(np.searchsorted(fine_ends, rank - before, side="right"))][0]))
    return values
