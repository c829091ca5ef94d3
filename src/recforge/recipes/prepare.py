"""`recforge data validate` and `recforge data prepare`: a configured log, validated, then prepared."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc

from recforge.config import Config
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


def validate_source(cfg: Config, out_dir: Path | None = None) -> ValidationOutcome:
    """Read the configured log and split it into clean rows and quarantined rows with reasons."""
    schema = cfg.data.schema_
    table = read_events(cfg.resolved_source, cfg.data.format, schema)
    result = validate(table, schema)
    files = write_outputs(result, out_dir or validation_dir(cfg))
    return ValidationOutcome(result, files)


def prepare_data(cfg: Config) -> tuple[PreparedInfo, ValidationResult]:
    """Validate, then split/encode into the prepared directory (quarantine and report go with it)."""
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
            history_length=cfg.data.history_length, seed=cfg.seed, shard_rows=cfg.data.shard_rows,
            user_bucket_rows=cfg.data.user_bucket_rows,
            source={"path": str(source), "format": cfg.data.format, "files": files_read,
                    "validation": result.report()},
            extra_files={Path(p).name: Path(p) for p in files.values()},
        ),
    )
    return info, result
