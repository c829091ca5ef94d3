"""The pipeline's own configuration: where data and state live, and how strict the gate is.

Strict like the training config (unknown keys are errors that name the key), and it wraps that
config rather than repeating it: `training.config` is an ordinary recforge YAML, and the pipeline
only fills in the per-cycle paths (source, prepared dir, run dir) itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from recforge import config as config_module
from recforge.config import Config, ConfigError, Strict


class TrainingSettings(Strict):
    """The base training config (a recforge YAML; None = the built-in defaults) plus overrides."""

    config: str | None = None
    overrides: list[str] = Field(default_factory=list)
    # Start the challenger from the production model's weights (embedding rows matched by raw id).
    warm_start: bool = False


class GateSettings(Strict):
    """When a challenger may replace the champion.

    Guardrails may not get worse by more than their tolerance (absolute); the primary metric must
    improve significantly by a paired test over the users both models scored.
    """

    primary: Literal["user_auc", "user_ndcg"] = "user_auc"
    test: Literal["bootstrap", "ttest"] = "bootstrap"
    alpha: float = Field(0.05, gt=0.0, lt=1.0)
    # The mean per-user improvement must also exceed this (0: any significant gain).
    min_improvement: float = Field(0.0, ge=0.0)
    bootstrap_samples: int = Field(2000, ge=100)
    seed: int = 0
    # Fewer users with both classes than this and the paired test is not trusted: refuse.
    min_users: int = Field(30, ge=2)
    logloss_tolerance: float = Field(0.005, ge=0.0)
    # Calibration = mean predicted CTR / observed CTR; compared as |calibration - 1|.
    calibration_tolerance: float = Field(0.05, ge=0.0)
    # Coverage = share of holdout rows whose item the model knows (has an embedding row for).
    coverage_tolerance: float = Field(0.01, ge=0.0)


class OnlineSettings(Strict):
    """The servers' shared Redis (docs/online-state.md): each run first moves its event stream into `lake`
    and exports the lake's recent days into events_dir; after a cycle trains, users' histories are
    materialized from the cycle's log into Redis (unless materialize is false)."""

    state: str = Field(pattern=r"^rediss?://")
    lake: str
    prefix: str = "recforge"
    materialize: bool = True


class PipelineConfig(Strict):
    # Directory of event-log partitions (day files such as 2026-01-01.parquet), read recursively.
    events_dir: str
    # The pipeline's own files: watermark, per-cycle data/runs/bundles, step markers, run logs.
    state_dir: str
    registry: str
    model_name: str = "ranker"
    # Train on the newest `window_days` day files (files without a date in the name always count).
    window_days: int = Field(14, ge=1)
    training: TrainingSettings = TrainingSettings()
    gate: GateSettings = GateSettings()
    canary_alias: str = "canary"
    production_alias: str = "production"
    # A canary is promoted to production only once it has been canary this long, not rolled back.
    canary_min_age_s: float = Field(3600.0, ge=0.0)
    # Held-out rows the exported bundle is checked against the eager model on.
    parity_rows: int = Field(2048, ge=1)
    # Serving on --state redis://: the stream is the pipeline's source of events (see OnlineSettings).
    online: OnlineSettings | None = None

    @property
    def state(self) -> Path:
        return Path(self.state_dir)

    def training_config(self, extra: list[str] | None = None) -> Config:
        """The recforge training config with the pipeline's per-cycle overrides applied last."""
        return config_module.load(self.training.config, [*self.training.overrides, *(extra or [])])


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read and validate a pipeline YAML (plus key=value overrides); every problem reported at once.

    Relative paths inside the file are taken relative to the current directory, like every other
    recforge config. The base training config is loaded too, so its errors surface now rather than
    at the train step.
    """
    p = Path(path)
    cfg = config_module.validate_as(PipelineConfig, config_module.read_tree(p, overrides, "pipeline config"), str(p))
    try:
        training = cfg.training_config()
    except ConfigError as exc:
        raise ConfigError(f"{p} training: {exc}") from None
    from recforge.models import MODELS, model_entry  # the model zoo (and torch) only once a file is loaded

    if model_entry(training.model.name).kind != "ranking":
        ranking = [name for name, entry in MODELS.items() if entry.kind == "ranking"]
        raise ConfigError(f"{p} training: the pipeline gates ranking models (per-user AUC/NDCG on labelled "
                          f"impressions); model.name={training.model.name} is not supported, choose "
                          f"{', '.join(ranking[:-1])} or {ranking[-1]}")
    return cfg
