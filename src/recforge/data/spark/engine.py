"""prepare on Spark: checked files -> duplicates -> keys and split -> vocabularies -> encoded rows ->
negatives and histories per user bucket -> shards, then the same finishing files as the local engine.

Each stage's result is written to the staging directory and read back before the next: a stage
that depends on row order or random draws is computed once, so every later pass (and a retried
task) sees the same rows, and Spark never has to hold a stage in memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from recforge.config import NegativesConfig, SchemaConfig, SparkConfig, SplitConfig, VocabConfig
from recforge.data.attributes import Attributes
from recforge.data.buckets import bucket_count
from recforge.data.prepare import (
    SPLITS,
    PreparedInfo,
    PrepareOptions,
    check_split_counts,
    finish_prepared,
    negative_plan,
    negatives_meta,
    prepared_meta,
)
from recforge.data.schema import DataError, required_columns
from recforge.data.spark.checked import (
    SparkValidation,
    check_files,
    mark_duplicates,
    raise_unreadable,
    summarize,
    write_quarantine,
    write_report,
)
from recforge.data.spark.encode import encode, fit_vocabs, item_tables, numeric_scaling, with_keys, with_split
from recforge.data.spark.rows import bucket_rows, write_split_shards
from recforge.data.spark.session import spark_session


@dataclass(frozen=True)
class SparkJob:
    """What the Spark preparation reads and how (the local engine takes an in-memory table instead)."""

    source: str | Path
    format: str
    schema: SchemaConfig
    split: SplitConfig
    vocab: VocabConfig
    negatives: NegativesConfig
    spark: SparkConfig
    attributes: Attributes = Attributes()  # data.items / data.users, joined as each file is read


class _Staging:
    """Where each stage is written and read back; removed when the preparation ends."""

    def __init__(self, spark: Any, root: Path) -> None:
        self.spark, self.root = spark, root

    def keep(self, df: Any, name: str) -> Any:
        path = str(self.root / name)
        df.write.mode("overwrite").parquet(path)
        return self.spark.read.parquet(path)


def prepare_on_spark(job: SparkJob, out_dir: str | Path, validation_dir: Path, options: PrepareOptions
                     ) -> tuple[PreparedInfo, SparkValidation, dict[str, Path]]:
    """Prepare `job.source` into `out_dir` with Spark; the quarantine and report go to `validation_dir`."""
    started = time.time()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(job.spark.staging_dir) if job.spark.staging_dir else \
        out.parent / f".spark-staging-{out.name}-{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    with spark_session(job.spark) as spark:
        try:
            stages = _Staging(spark, staging)
            validation, files, clean = _validated(stages, job, validation_dir)
            read = sorted(row["_file"] for row in stages.spark.read.parquet(str(staging / "validated"))
                          .select("_file").distinct().collect())
            source = {**(options.source or {}), "files": read, "validation": validation.report()}
            info = _prepared(stages, job, clean, validation, tmp, out, started,
                             options=replace(options, extra_files=files, source=source))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            spark.catalog.clearCache()
            shutil.rmtree(staging, ignore_errors=True)
    return info, validation, files


def validate_on_spark(job: SparkJob, validation_dir: Path) -> tuple[SparkValidation, dict[str, Path]]:
    """Only the validation stage (`recforge data validate` with data.engine: spark)."""
    staging = Path(job.spark.staging_dir) if job.spark.staging_dir else \
        validation_dir.parent / f".spark-staging-validate-{os.getpid()}"
    with spark_session(job.spark) as spark:
        try:
            validation, files, _ = _validated(_Staging(spark, staging), job, validation_dir, require_rows=False)
        finally:
            spark.catalog.clearCache()
            shutil.rmtree(staging, ignore_errors=True)
    return validation, files


def _validated(stages: _Staging, job: SparkJob, validation_dir: Path, require_rows: bool = True
               ) -> tuple[SparkValidation, dict[str, Path], Any]:
    from pyspark.sql import functions as F

    # One pass: reading a file is deterministic, so the duplicate window runs on the tasks' output directly
    # (error rows carry no reason and pass through it untouched).
    checked = stages.keep(mark_duplicates(check_files(stages.spark, job.source, job.format, job.schema,
                                                      job.attributes), job.schema), "validated")
    raise_unreadable(checked)
    checked = checked.filter(F.col("_error").isNull())
    validation = summarize(checked, job.schema)
    validation_dir.mkdir(parents=True, exist_ok=True)
    files = {"quarantine": validation_dir / "quarantine.parquet", "report": validation_dir / "validation_report.json"}
    write_quarantine(checked, job.schema, stages.root, files["quarantine"])
    write_report(validation, files["report"])
    if require_rows and validation.rows_kept == 0:
        raise DataError("no valid events to prepare: every row was quarantined (see the validation report)")
    clean = checked.filter(F.col("_reason") == -1).select(*required_columns(job.schema), "_order")
    return validation, files, clean.withColumnRenamed(job.schema.time, "_time")


def _prepared(stages: _Staging, job: SparkJob, clean: Any, validation: SparkValidation, tmp: Path, out: Path,
              started: float, options: PrepareOptions) -> PreparedInfo:
    from pyspark.sql import functions as F

    schema, partitions = job.schema, int(stages.spark.conf.get("spark.sql.shuffle.partitions"))
    keyed, users, items = with_keys(clean, schema, partitions)
    keyed = stages.keep(with_split(keyed, job.split, job.schema.split), "keyed")
    split_rows = {row["_split"]: row["count"] for row in keyed.groupBy("_split").count().collect()}
    check_split_counts(np.array([split_rows.get(code, 0) for code in range(3)]), job.split)
    train = keyed.filter(F.col("_split") == 0)
    fields = schema.categorical
    vocabs = fit_vocabs(train, fields, job.vocab)
    mean, std = numeric_scaling(train, schema.numeric)
    encoded = stages.keep(encode(keyed, schema, vocabs, mean, std), "encoded")
    item_column = fields.index(schema.item)
    feature_columns = [fields.index(f) for f in schema.item_features]
    counts, item_features, key_of_index = item_tables(encoded, item_column, feature_columns, vocabs[schema.item].size)
    plan = negative_plan(counts, key_of_index, item_features, item_key_space=items, item_column=item_column,
                         item_feature_columns=feature_columns, cfg=job.negatives, seed=options.seed) \
        if schema.label.kind == "implicit" else None
    rows = stages.keep(bucket_rows(encoded, plan, buckets=bucket_count(validation.rows_kept, options.user_bucket_rows),
                                   fields=len(fields), numeric=len(schema.numeric),
                                   history_length=options.history_length, history_from=options.history_from,
                                   item_column=item_column), "rows")
    shards = {name: write_split_shards(rows, code, name, tmp, shard_rows=options.shard_rows, fields=len(fields),
                                       numeric=len(schema.numeric), with_history=options.history_length > 0,
                                       partitions=partitions)
              for code, name in enumerate(SPLITS)}
    stats = {row["split"]: row for row in rows.groupBy("split").agg(
        F.count(F.lit(1)).alias("rows"), F.min("timestamp").alias("time_min"), F.max("timestamp").alias("time_max"),
        F.sum("label").alias("positives"), F.sum((F.col("slot") > 0).cast("long")).alias("negatives")).collect()}
    split_stats = {name: {"rows": int(stats[code]["rows"]) if code in stats else 0,
                          "time_min": stats[code]["time_min"] if code in stats else None,
                          "time_max": stats[code]["time_max"] if code in stats else None}
                   for code, name in enumerate(SPLITS)}
    sampled = sum(int(row["negatives"]) for row in stats.values())
    meta = prepared_meta(
        schema, vocabs, mean, std, job.split, split_stats=split_stats,
        positives={name: int(stats[code]["positives"]) if code in stats else 0 for code, name in enumerate(SPLITS)},
        totals={"users": users, "items": items, "events": validation.rows_kept,
                "rows": sum(int(row["rows"]) for row in stats.values())},
        negatives=negatives_meta(job.negatives, plan, sampled, validation.rows_kept * job.negatives.per_positive
                                 - sampled) if plan else None,
        options=options)
    finish_prepared(tmp, out, vocabs=vocabs, item_features=item_features, train_item_counts=counts, meta=meta,
                    shards=shards, options=options, engine="spark", started=started)
    return PreparedInfo(out, meta)
