"""Running the real `recforge` executable from tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SMALL_WORLD = ["data.generate.users=1500", "data.generate.items=600", "data.generate.events=60000",
               "data.generate.days=10", "train.batch_size=1024", "train.progress=false"]
MOVIELENS = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-latest-small" / "ratings.csv"
ML_SCHEMA = ["data.format=movielens", "data.schema.label.kind=rating", "data.schema.label.column=rating",
             "data.schema.label.threshold=4", "data.schema.label.min=0.5", "data.schema.label.max=5",
             "data.schema.context=[]", "data.schema.item_features=[]", "data.schema.numeric=[]"]


def _recforge() -> list[str]:
    script = Path(sys.executable).with_name("recforge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "recforge.cli"]


def run(*args: str, cwd: Path, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120", "RECFORGE_DEBUG": ""}
    proc = subprocess.run([*_recforge(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"recforge {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc
