"""The simulator's configuration: the world and its models, the traffic, and each scenario's knobs.

Strict like every recforge config (unknown keys are errors naming the key). `training` is an
ordinary recforge config tree: its data.generate section is the synthetic world, and every model
the scenarios train (retrieval, rankers, the pipeline's challengers) starts from it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import Field

from recforge import config as config_module
from recforge.config import Config, ConfigError, Strict

# The world and models when no config names them (the same as configs/simulate/synthetic.yaml): small enough
# for each scenario to finish in minutes on two cores. The offline log is small on purpose, so the first
# ranker starts data-starved and the loop's served days are what it learns from.
DEFAULT_TRAINING: dict[str, Any] = {
    "seed": 1,
    "data": {"format": "parquet", "generate": {"users": 3000, "items": 1000, "events": 15000, "days": 3, "seed": 3}},
    "model": {"name": "dnn", "embedding_dim": 16, "hidden": [64, 32], "dropout": 0.0},
    "train": {"epochs": 3, "batch_size": 1024, "lr": 0.005, "progress": False, "threads": 2,
              "eval_batch_size": 16384},
}


class AbSettings(Strict):
    experiment: str = "sim_ab"
    # The weak arm is the same ranker trained with these overrides (by default: barely trained at all).
    weak_overrides: list[str] = Field(default_factory=lambda: ["train.lr=0.000001"])
    strong_overrides: list[str] = Field(default_factory=list)
    # Fresh requests (same traffic distribution) each arm is forced onto to predict its CTR from the truth.
    predict_requests: int = Field(3000, ge=10)
    alpha: float = Field(0.05, gt=0.0, lt=1.0)


class LoopSettings(Strict):
    days: int = Field(5, ge=1)
    # Online day (0-based) whose challenger is trained with `weak_overrides`: the gate must refuse it.
    # None: no injected challenger (refusals then happen only naturally).
    weak_day: int | None = Field(2, ge=0)
    weak_overrides: list[str] = Field(default_factory=lambda: ["train.lr=0.000001"])
    # Days between the end of the offline log and the first simulated day: tastes drift meanwhile, so the first
    # ranker is stale and what the loop learns from its own traffic shows.
    start_gap_days: int = Field(7, ge=0)
    # Challengers start from the production ranker's weights (the pipeline's training.warm_start).
    warm_start: bool = False
    canary_share: float = Field(0.25, ge=0.0, le=1.0)
    window_days: int = Field(30, ge=1)
    # Passed through to the pipeline config's `gate` section (see recforge.pipeline.settings.GateSettings).
    gate: dict[str, Any] = Field(default_factory=lambda: {"bootstrap_samples": 1000, "min_users": 30,
                                                          "calibration_tolerance": 0.5})


class SimulateConfig(Strict):
    workdir: str = "runs/simulate"
    seed: int = 0
    training: dict[str, Any] = Field(default_factory=lambda: copy.deepcopy(DEFAULT_TRAINING))
    retrieval_overrides: list[str] = Field(default_factory=lambda: ["model.name=two_tower"])
    requests_per_day: int = Field(2000, ge=10)
    k: int = Field(10, ge=1, le=100)
    # Requests in flight at once, and requests per events POST.
    concurrency: int = Field(12, ge=1, le=256)
    batch_requests: int = Field(50, ge=1, le=1000)
    # The world's click model has no fatigue, so re-showing an item costs nothing in truth; excluding seen
    # items would only measure how fast a small catalogue runs out (and make forced predictions differ).
    exclude_seen: bool = False
    ready_timeout_s: float = Field(180.0, gt=0)
    # Extra `recforge serve --set NAME=VALUE` settings.
    server: dict[str, str] = Field(default_factory=dict)
    ab: AbSettings = AbSettings()
    loop: LoopSettings = LoopSettings()

    @property
    def root(self) -> Path:
        """The workdir made absolute: the server and pipeline processes run from other directories."""
        return Path(self.workdir).resolve()

    def train_config(self, extra: list[str] | None = None) -> Config:
        """The recforge training config with the scenario's paths (and `extra` overrides) applied."""
        tree = config_module._merge(dict(self.training), config_module.parse_overrides(
            [f"workdir={self.root}", f"prepared_dir={self.root / 'prepared'}", *(extra or [])]))
        return config_module.from_dict(tree)


def load_simulate(path: str | Path | None, overrides: list[str] | None = None) -> SimulateConfig:
    """Read and validate a simulate YAML (None: the defaults) plus key=value overrides; all errors at once."""
    tree = config_module.read_tree(path, overrides, "simulate config")
    cfg = config_module.validate_as(SimulateConfig, tree, str(path or "simulate config"))
    try:
        cfg.train_config()
    except ConfigError as exc:
        raise ConfigError(f"{path or 'simulate config'} training: {exc}") from None
    return cfg
