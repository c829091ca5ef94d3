"""A tiny simulate config and the real `recforge simulate` executable, for the scenario tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

TINY = {
    "seed": 0,
    "training": {
        "seed": 1,
        "data": {"format": "parquet", "generate": {"users": 1000, "items": 300, "events": 30000, "days": 4, "seed": 3}},
        "model": {"name": "dnn", "embedding_dim": 8, "hidden": [32], "dropout": 0.0},
        "train": {"epochs": 2, "batch_size": 1024, "lr": 0.01, "progress": False, "threads": 2,
                  "eval_batch_size": 8192},
    },
    "requests_per_day": 600,
    "concurrency": 8,
    "ab": {"predict_requests": 600},
    "loop": {"days": 2, "weak_day": 1,
             "gate": {"bootstrap_samples": 500, "min_users": 30, "calibration_tolerance": 0.5}},
}


def simulate(tmp: Path, scenario: str, *overrides: str, timeout: int = 240) -> tuple[dict[str, Any], str]:
    """Run `recforge simulate --scenario S --json` on the tiny config; returns (result JSON, stderr)."""
    config = tmp / "simulate.yaml"
    config.write_text(yaml.safe_dump(TINY))
    script = Path(sys.executable).with_name("recforge")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "recforge.cli"]
    args = [*command, "simulate", "--scenario", scenario, "--config", str(config), "--json",
            "workdir=work", *overrides]  # relative to the command's directory, as a user would write it
    env = {**os.environ, "COLUMNS": "120", "RECFORGE_DEBUG": ""}
    proc = subprocess.run(args, cwd=tmp, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"recforge simulate exited {proc.returncode}\n{proc.stdout[-2000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr
