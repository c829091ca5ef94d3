"""`recforge data validate` and `recforge data prepare`: a configured log, validated, then prepared."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc

from recforge.config import Config
from recforge.data.attributes import load_attributes
from recforge.data.prepare import PreparedInfo, PrepareOptions, prepare
from recforge.data.sources import read_events
from recforge.data.validate import ValidationResult, validate, write_outputs


def validation_dir(cfg: Config) -> Path:
    """Where the quarantine file and validation report of the configured source go."""
    return cfg.resolved_prepared_dir.parent / "validation"


@dataclass(frozen=True)
class ValidationOutcome:
    result: ValidationResult
    files: dict[str, Path]
    attributes: dict  # the side tables joined in (Attributes.describe()), recorded in meta.json


def _spark_job(cfg: Config):  # noqa: ANN202 - SparkJob, imported only for this engine
    from recforge.data.spark.engine import SparkJob

    data = cfg.data
    return SparkJob(source=cfg.resolved_source, format=data.format, schema=data.schema_, split=data.split,
                    vocab=data.vocab, negatives=data.negatives, spark=data.spark, attributes=load_attributes(data))


def validate_source(cfg: Config, out_dir: Path | None = None) -> ValidationOutcome:
    """Read the configured log and split it into clean rows and quarantined rows with reasons."""
    if cfg.data.engine == "spark":
        from recforge.data.spark.engine import validate_on_spark

        job = _spark_job(cfg)
        summary, files = validate_on_spark(job, out_dir or validation_dir(cfg))
        return ValidationOutcome(summary, files, job.attributes.describe())  # type: ignore[arg-type]
    schema = cfg.data.schema_
    attributes = load_attributes(cfg.data)
    table = read_events(cfg.resolved_source, cfg.data.format, attributes.file_schema(schema), attributes.columns)
    result = validate(attributes.join(table), schema)
    files = write_outputs(result, out_dir or validation_dir(cfg))
    return ValidationOutcome(result, files, attributes.describe())


def prepare_data(cfg: Config) -> tuple[PreparedInfo, ValidationResult]:
    """Validate, then split/encode into the prepared directory (quarantine and report go with it)."""
    if cfg.data.engine == "spark":
        return _prepare_on_spark(cfg)
    outcome = validate_source(cfg)
    result, files = outcome.result, outcome.files
    schema = cfg.data.schema_
    source = cfg.resolved_source
    files_read = sorted({name for part in (result.clean, result.quarantine) if "_file" in part.column_names
                         for name in pc.unique(part.column("_file")).to_pylist()})
    info = prepare(
        result.clean,
        schema,
        cfg.data.split,
        cfg.data.vocab,
        cfg.data.negatives,
        cfg.resolved_prepared_dir,
        PrepareOptions(
            history_length=cfg.data.history_length, history_from=cfg.data.history_from, seed=cfg.seed,
            shard_rows=cfg.data.shard_rows,
            user_bucket_rows=cfg.data.user_bucket_rows,
            source={"path": str(source), "format": cfg.data.format, "files": files_read,
                    "validation": result.report(), "attributes": outcome.attributes},
            extra_files={Path(p).name: Path(p) for p in files.values()},
        ),
    )
    return info, result


def _prepare_on_spark(cfg: Config) -> tuple[PreparedInfo, ValidationResult]:
    from recforge.data.spark.engine import prepare_on_spark

    source = cfg.resolved_source
    job = _spark_job(cfg)
    info, summary, _ = prepare_on_spark(
        job, cfg.resolved_prepared_dir, validation_dir(cfg),
        PrepareOptions(history_length=cfg.data.history_length, history_from=cfg.data.history_from, seed=cfg.seed,
                       shard_rows=cfg.data.shard_rows,
                       user_bucket_rows=cfg.data.user_bucket_rows,
                       source={"path": str(source), "format": cfg.data.format,
                               "attributes": job.attributes.describe()}))
    return info, summary  # type: ignore[return-value] - the same report() and counts as a ValidationResult
