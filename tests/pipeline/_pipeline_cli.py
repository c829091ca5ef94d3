"""A tiny synthetic world, split into day files that 'arrive' one at a time, and the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

TRAIN = {
    "seed": 1,
    "data": {"format": "parquet", "generate": {"users": 2000, "items": 500, "events": 40000, "days": 6, "seed": 3}},
    "model": {"name": "dnn", "embedding_dim": 8, "hidden": [32], "dropout": 0.0},
    "train": {"epochs": 1, "batch_size": 1024, "lr": 0.01, "progress": False, "threads": 1,
              "eval_batch_size": 8192},
}


def recforge(*args: str, cwd: Path, check: bool = True, env: dict[str, str] | None = None,
             timeout: int = 300) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("recforge")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "recforge.cli"]
    full_env = {**os.environ, "COLUMNS": "120", "RECFORGE_DEBUG": "", **(env or {})}
    proc = subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"recforge {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def last_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    return json.loads(proc.stdout.strip().splitlines()[-1])


class World:
    """Six generated day files; `arrive(n)` copies the first n into the watched events directory."""

    def __init__(self, root: Path, world_days: Path) -> None:
        self.root = root
        self.days = sorted(world_days.glob("*.parquet"))
        self.events = root / "events"
        self.events.mkdir(parents=True, exist_ok=True)
        (root / "train.yaml").write_text(yaml.safe_dump(TRAIN))
        self.config = root / "pipeline.yaml"
        self.config.write_text(yaml.safe_dump({
            "events_dir": str(self.events), "state_dir": str(root / "state"), "registry": str(root / "registry"),
            "model_name": "ranker", "window_days": 14,
            "training": {"config": str(root / "train.yaml")},
            "gate": {"calibration_tolerance": 0.5, "bootstrap_samples": 500, "min_users": 30},
            "canary_min_age_s": 3600,
        }))

    def arrive(self, n: int) -> None:
        for day in self.days[:n]:
            if not (self.events / day.name).exists():
                shutil.copy(day, self.events / day.name)

    def pipeline(self, *args: str, check: bool = True, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess[str]:
        return recforge("pipeline", "run", "--config", str(self.config), *args, cwd=self.root, check=check, env=env)

    def registry(self, *args: str) -> Any:
        return json.loads(recforge("registry", *args, "--registry", str(self.root / "registry"), cwd=self.root)
                          .stdout.strip().splitlines()[-1])

    def versions(self) -> list[int]:
        path = self.root / "registry" / "ranker" / "versions"
        return sorted(int(p.name) for p in path.iterdir() if (p / "COMMITTED").exists()) if path.is_dir() else []

    def aliases(self) -> dict[str, int]:
        path = self.root / "registry" / "ranker" / "aliases.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def history(self) -> list[dict[str, Any]]:
        path = self.root / "registry" / "ranker" / "history.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def run_logs(self) -> list[Path]:
        return sorted((self.root / "state" / "runs").iterdir())

