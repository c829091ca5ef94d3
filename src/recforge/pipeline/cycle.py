"""One training cycle as the steps see it, kept free of torch so that cheap commands stay cheap.

(`--step ingest`, a run with no new data and the Airflow branch all load this, not the trainer.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recforge.config import Config
from recforge.pipeline.runlog import read_marker
from recforge.pipeline.settings import PipelineConfig

Log = Callable[[str], None]
# Test hook: make the process die at a named point, as a kill would (no cleanup, no marker).
CRASH_ENV = "RECFORGE_PIPELINE_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os._exit(137)


@dataclass(frozen=True)
class Cycle:
    """One training cycle: its record from ingest, its directory, and the pipeline config."""

    cfg: PipelineConfig
    record: dict[str, Any]
    log: Log

    @property
    def id(self) -> str:
        return str(self.record["cycle"])

    @property
    def dir(self) -> Path:
        return Path(self.record["dir"])

    @property
    def bundle_dir(self) -> Path:
        return self.dir / "bundle"

    def training(self) -> Config:
        """The training config of this cycle: the base config with the cycle's own paths."""
        return self.cfg.training_config([f"workdir={self.dir}", f"prepared_dir={self.dir / 'prepared'}",
                                         f"run_dir={self.dir / 'run'}", f"data.source={self.dir / 'input'}"])

    def marker(self, step: str) -> dict[str, Any]:
        found = read_marker(self.dir, step)
        if found is None:
            raise RuntimeError(f"cycle {self.id}: step '{step}' has not run yet; run `--step {step}` first")
        return found
