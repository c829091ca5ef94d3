"""`recforge data generate`: the synthetic world's behaviour log, written where the config says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recforge.config import Config
from recforge.synthetic.logs import generate as generate_world


def generate(cfg: Config) -> dict[str, Any]:
    """Write the synthetic world's behaviour log (and its ground truth) under workdir/raw."""
    return generate_world(cfg.data.generate, Path(cfg.workdir) / "raw")
