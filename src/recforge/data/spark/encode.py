"""Stage 2 on Spark: dense keys, the split, vocabularies fit on train, numeric scaling, encoded rows.

Every rule is the local engine's: keys number users and items by first appearance (data.prepare's
_dense_key), the time split cuts at the exact ranks of prepare.cut_ranks (per-user splits count with
prepare.per_user_counts' arithmetic), vocabularies come from
Vocab.from_counts (the same keep and order rule as Vocab.fit) and rows are encoded by Vocab.encode
inside the tasks, with the vocabularies broadcast.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from recforge.config import SchemaConfig, SplitConfig, VocabConfig
from recforge.data.prepare import cut_ranks, make_labels
from recforge.data.schema import SPLIT_NAMES
from recforge.data.spark.keys import dense_index, kth_smallest
from recforge.data.vocab import Vocab, check_hash_fields

# The encoded rows' column -> the keyed rows' internal column it comes from.
_INTERNAL = {"timestamp": "_time", "user_key": "_user_key", "item_key": "_item_key", "split": "_split"}


def with_keys(clean: Any, schema: SchemaConfig, partitions: int) -> tuple[Any, int, int]:
    """`clean` with _user_key and _item_key (dense, by first appearance), and the numbers of each.

    Columns recforge adds start with '_' so they cannot meet a log's own column names.
    """
    from pyspark.sql import functions as F

    counts = []
    for column, key in ((schema.user, "_user_key"), (schema.item, "_item_key")):
        first = clean.groupBy(column).agg(F.min("_order").alias("_first"))
        keyed = dense_index(first, ["_first"], key, partitions).select(column, key)
        counts.append(keyed.count())
        clean = clean.join(keyed, on=column)
    return clean, counts[0], counts[1]


def with_split(keyed: Any, cfg: SplitConfig, split_column: str | None) -> Any:
    """0 = train, 1 = valid, 2 = test, by prepare.assign_splits' rules."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if cfg.method == "column":  # validated: every kept row holds one of SPLIT_NAMES
        code = F.when(F.col(split_column) == SPLIT_NAMES[0], 0).when(F.col(split_column) == SPLIT_NAMES[1], 1)
        return keyed.withColumn("_split", code.otherwise(2).cast("byte"))
    if cfg.method == "time":
        test_rank, valid_rank = cut_ranks(keyed.count(), cfg)
        ranks = [rank for rank in (test_rank, valid_rank) if rank is not None]
        cuts = dict(zip(ranks, kth_smallest(keyed, "_time", ranks), strict=True)) if ranks else {}
        split = F.lit(0)
        if valid_rank is not None:
            split = F.when(F.col("_time") >= cuts[valid_rank], 1).otherwise(split)
        if test_rank is not None:
            split = F.when(F.col("_time") >= cuts[test_rank], 2).otherwise(split)
        return keyed.withColumn("_split", split.cast("byte"))
    size = F.count(F.lit(1)).over(Window.partitionBy("_user_key"))
    from_end = F.row_number().over(Window.partitionBy("_user_key").orderBy(F.desc("_time"), F.desc("_order"))) - 1
    if cfg.method == "leave_last_out":
        eligible = F.when(size >= 3, 1).otherwise(0)
        test, valid = eligible * int(cfg.test_fraction > 0), eligible * int(cfg.valid_fraction > 0)
    else:  # per_user_fraction: prepare.per_user_counts in the same float64 arithmetic
        test = F.floor(size.cast("double") * F.lit(cfg.test_fraction) + F.lit(1e-9)).cast("long")
        valid = F.least(F.floor(size.cast("double") * F.lit(cfg.valid_fraction) + F.lit(1e-9)).cast("long"),
                        size - 1 - test)
    split = F.when(from_end < test, 2).when(from_end < test + valid, 1).otherwise(0)
    return keyed.withColumn("_split", split.cast("byte"))


def fit_vocabs(train: Any, fields: list[str], cfg: VocabConfig) -> dict[str, Vocab]:
    """Counted by Spark, kept and ordered by Vocab.from_counts; only keys with min_count reach the driver."""
    from pyspark.sql import functions as F

    check_hash_fields(fields, cfg)
    vocabs = {}
    for field in fields:
        if field in cfg.hash_buckets:
            vocabs[field] = Vocab(field=field, keys=None, hash_buckets=int(cfg.hash_buckets[field]), min_count=1)
            continue
        counted = train.filter(F.col(field).isNotNull()).groupBy(field).count() \
            .filter(F.col("count") >= cfg.min_count).toArrow()
        vocabs[field] = Vocab.from_counts(field, counted.column(field), counted.column("count"), cfg.min_count)
    return vocabs


def numeric_scaling(train: Any, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Training mean and population std of each numeric column (a constant column keeps std 1)."""
    from pyspark.sql import functions as F

    if not columns:
        return np.zeros(0), np.zeros(0)
    row = train.agg(*[F.avg(c).alias(f"m{i}") for i, c in enumerate(columns)],
                    *[F.stddev_pop(c).alias(f"s{i}") for i, c in enumerate(columns)]).collect()[0]
    mean = np.array([row[f"m{i}"] for i in range(len(columns))], dtype=np.float64)
    std = np.array([row[f"s{i}"] for i in range(len(columns))], dtype=np.float64)
    return mean, np.where(std > 0, std, 1.0)


def encoded_schema(fields: list[str], numeric: list[str]) -> str:
    parts = [f"c{i} long" for i in range(len(fields))] + [f"n{i} float" for i in range(len(numeric))]
    return ", ".join([*parts, "label float", "timestamp long", "user_key long", "item_key long", "split byte",
                      "_order long"])


def encode(keyed: Any, schema: SchemaConfig, vocabs: dict[str, Vocab], mean: np.ndarray, std: np.ndarray) -> Any:
    """Rows as model inputs: c<i> = field i's vocabulary index, n<i> = standardized numeric i, label 0/1."""
    spark = keyed.sparkSession
    shared = spark.sparkContext.broadcast(vocabs)
    fields, numeric = schema.categorical, schema.numeric

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        held = shared.value
        for batch in batches:
            table = pa.Table.from_batches([batch])
            columns = {f"c{i}": pa.array(held[f].encode(table.column(f))) for i, f in enumerate(fields)}
            for i, c in enumerate(numeric):
                raw = table.column(c).to_numpy().astype(np.float64)
                columns[f"n{i}"] = pa.array(((raw - mean[i]) / std[i]).astype(np.float32))
            columns["label"] = pa.array(make_labels(table, schema))
            for name in ("timestamp", "user_key", "item_key", "split", "_order"):
                columns[name] = table.column(_INTERNAL.get(name, name)).combine_chunks()
            yield pa.RecordBatch.from_pydict(columns)

    return keyed.mapInArrow(run, encoded_schema(fields, numeric))


def item_tables(encoded: Any, item_column: int, feature_columns: list[int], item_size: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per item index: training count, features of its latest training event, largest item key (any split).

    "Latest" breaks ties by input order, as prepare._item_feature_table does.
    """
    from pyspark.sql import functions as F

    item = f"c{item_column}"
    counts = np.zeros(item_size, dtype=np.int64)
    features = np.zeros((item_size, len(feature_columns)), dtype=np.int64)
    train = encoded.filter(F.col("split") == 0)
    latest = F.struct("timestamp", "_order")
    aggregates = [F.count(F.lit(1)).alias("count")]
    if feature_columns:
        aggregates.append(F.max_by(F.array(*[f"c{i}" for i in feature_columns]), latest).alias("features"))
    for row in train.groupBy(item).agg(*aggregates).collect():
        counts[row[item]] = row["count"]
        if feature_columns:
            features[row[item]] = row["features"]
    key_of_index = np.full(item_size, -1, dtype=np.int64)
    for row in encoded.groupBy(item).agg(F.max("item_key").alias("key")).collect():
        key_of_index[row[item]] = row["key"]
    return counts, features, key_of_index
