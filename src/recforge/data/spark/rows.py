"""Stage 3 on Spark: negatives and histories per user bucket, then the shards, written by the tasks.

A user bucket (data/buckets.py) goes to one task, which runs `process_bucket`, the local engine's
own function, on it: the same seeded generator per bucket gives the same negatives. Shards are the
canonical order of each split cut every `shard_rows` rows; a task writes the shards that hash to it
straight into the dataset's temporary directory, and returns their manifest entries, so no row
passes through the driver.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from recforge.data.buckets import NegativePlan, process_bucket, user_bucket
from recforge.data.shards import COLUMNS, shard_name, write_shard
from recforge.data.spark.keys import dense_index

_OUT_ROWS = 65536


def _columns(table: pa.Table, fields: int, numeric: int) -> dict[str, np.ndarray]:
    def get(name: str) -> np.ndarray:
        return table.column(name).to_numpy()

    n = table.num_rows
    categorical = np.stack([get(f"c{i}") for i in range(fields)], axis=1) if fields else np.zeros((n, 0), np.int64)
    numbers = np.stack([get(f"n{i}") for i in range(numeric)], axis=1).astype(np.float32) if numeric \
        else np.zeros((n, 0), np.float32)
    out = {"categorical": categorical.astype(np.int64), "numeric": numbers, "label": get("label"),
           "timestamp": get("timestamp"), "user_key": get("user_key"), "split": get("split").astype(np.int8),
           "order": get("_order")}
    if "item_key" in table.column_names:  # until negatives are drawn (they exclude by key)
        out["item_key"] = get("item_key")
    return out


def _as_batch(rows: dict[str, np.ndarray], fields: int, numeric: int, with_history: bool) -> pa.RecordBatch:
    columns: dict[str, Any] = {f"c{i}": rows["categorical"][:, i] for i in range(fields)}
    columns.update({f"n{i}": rows["numeric"][:, i] for i in range(numeric)})
    columns.update({"label": rows["label"], "timestamp": rows["timestamp"], "user_key": rows["user_key"],
                    "split": rows["split"], "_order": rows["order"], "slot": rows["slot"]})
    batch = {name: pa.array(values) for name, values in columns.items()}
    if with_history:
        batch["history"] = pa.ListArray.from_arrays(pa.array(rows["history_offsets"].astype(np.int32)),
                                                    pa.array(rows["history_values"]))
    return pa.RecordBatch.from_pydict(batch)


def rows_schema(fields: int, numeric: int, with_history: bool) -> str:
    parts = [f"c{i} long" for i in range(fields)] + [f"n{i} float" for i in range(numeric)]
    parts += ["label float", "timestamp long", "user_key long", "split byte", "_order long", "slot long"]
    return ", ".join(parts + (["history array<long>"] if with_history else []))


def bucket_rows(encoded: Any, plan: NegativePlan | None, *, buckets: int, fields: int, numeric: int,
                history_length: int, history_from: str, item_column: int) -> Any:
    """Every row with its negatives (slot > 0) and history, one user bucket per task."""
    from pyspark.sql import functions as F

    shared = encoded.sparkSession.sparkContext.broadcast(plan)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        batches = list(batches)
        if not batches:
            return
        rows = _columns(pa.Table.from_batches(batches), fields, numeric)
        of_bucket = user_bucket(rows["user_key"], buckets)
        for bucket in np.unique(of_bucket).tolist():
            take = np.flatnonzero(of_bucket == bucket)
            part = {name: values[take] for name, values in rows.items()}
            part = {name: values[np.argsort(part["order"], kind="stable")] for name, values in part.items()}
            done, _ = process_bucket(part, bucket, shared.value, history_length=history_length,
                                     history_from=history_from, item_column=item_column)
            for start in range(0, len(done["label"]), _OUT_ROWS):
                yield _as_batch(_slice(done, start, start + _OUT_ROWS), fields, numeric, history_length > 0)

    spread = encoded.repartition(buckets, F.col("user_key") % buckets)
    return spread.mapInArrow(run, rows_schema(fields, numeric, history_length > 0))


def _slice(rows: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
    out = {name: values[lo:hi] for name, values in rows.items() if not name.startswith("history")}
    if "history_offsets" in rows:
        offsets = rows["history_offsets"][lo:min(hi, len(rows["label"])) + 1]
        out["history_values"] = rows["history_values"][offsets[0]:offsets[-1]]
        out["history_offsets"] = offsets - offsets[0]
    return out


def write_split_shards(rows: Any, split: int, name: str, root: Path, *, shard_rows: int, fields: int,
                       numeric: int, with_history: bool, partitions: int) -> list[dict[str, Any]]:
    """The split's rows in canonical order, cut into shards written under root/name; their manifest entries."""
    from pyspark.sql import functions as F

    part = rows.filter(F.col("split") == split)
    total = part.count()
    if total == 0:
        columns = _shard_columns(pa.Table.from_pylist([], schema=_arrow_rows_schema(part)), fields, numeric,
                                 with_history)
        return [write_shard(root / name / shard_name(0), columns)]
    shards = -(-total // shard_rows)
    positioned = dense_index(part, ["_order", "slot"], "_position", partitions)
    positioned = positioned.withColumn("_shard", (F.col("_position") / F.lit(shard_rows)).cast("long"))

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        batches = list(batches)
        if not batches:
            return
        table = pa.Table.from_batches(batches)
        shard_of = table.column("_shard").to_numpy()
        for shard in np.unique(shard_of).tolist():
            members = table.take(pa.array(np.flatnonzero(shard_of == shard)))
            members = members.take(pa.array(np.argsort(members.column("_position").to_numpy(), kind="stable")))
            entry = write_shard(root / name / shard_name(shard), _shard_columns(members, fields, numeric,
                                                                                with_history))
            yield pa.RecordBatch.from_pydict({"shard": [shard], "entry": [json.dumps(entry)]})

    written = positioned.repartition(shards, "_shard").mapInArrow(run, "shard long, entry string").collect()
    entries = {row["shard"]: json.loads(row["entry"]) for row in written}
    if sorted(entries) != list(range(shards)):
        raise RuntimeError(f"split {name}: shards {sorted(entries)} written, expected 0..{shards - 1}")
    return [entries[i] for i in range(shards)]


def _arrow_rows_schema(df: Any) -> pa.Schema:
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(df.schema)


def _shard_columns(table: pa.Table, fields: int, numeric: int, with_history: bool) -> dict[str, np.ndarray]:
    rows = _columns(table, fields, numeric)
    columns = {name: rows[name] for name in COLUMNS}
    if with_history:
        history = table.column("history").combine_chunks()
        offsets = history.offsets.to_numpy().astype(np.int64)
        columns["history_values"] = history.flatten().to_numpy().astype(np.int64)
        columns["history_offsets"] = offsets - offsets[0]
    return columns
