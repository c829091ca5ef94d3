"""What the pipeline did and why: a run log per invocation, and a done-marker per cycle step.

Run log: `<state>/runs/<run id>/log.jsonl` (one JSON object per event) and `summary.json` (written
at the end). Both are rewritten whole through a temporary file and a rename, so a reader (or a
crash) never sees a torn line. Markers: `<cycle>/steps/<step>.json`, written when a step has
finished, holding its outputs; a step whose marker exists is never run again, which is what makes
re-running a killed pipeline safe.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recforge.storage import read_json, write_json, write_text


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class RunLog:
    """Events of one `recforge pipeline run` invocation."""

    def __init__(self, state_dir: Path, step: str | None = None) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        self.run_id = f"{stamp}-{os.getpid()}" + (f"-{step}" if step else "")
        self.dir = Path(state_dir) / "runs" / self.run_id
        self.events: list[dict[str, Any]] = []
        self.started = time.time()

    def event(self, step: str, status: str, **fields: Any) -> dict[str, Any]:
        record = {"time": _now(), "run": self.run_id, "step": step, "status": status, **fields}
        self.events.append(record)
        write_text(self.dir / "log.jsonl", "".join(json.dumps(e, sort_keys=True, default=str) + "\n"
                                                   for e in self.events))
        return record

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        full = {"run": self.run_id, "started": datetime.fromtimestamp(self.started, UTC).isoformat(),
                "seconds": round(time.time() - self.started, 3), **summary,
                "steps": [{k: e[k] for k in ("step", "status")} for e in self.events]}
        write_json(self.dir / "summary.json", json.loads(json.dumps(full, default=str)))
        return full


def marker_path(cycle_dir: Path, step: str) -> Path:
    return Path(cycle_dir) / "steps" / f"{step}.json"


def read_marker(cycle_dir: Path, step: str) -> dict[str, Any] | None:
    path = marker_path(cycle_dir, step)
    return read_json(path) if path.is_file() else None


def write_marker(cycle_dir: Path, step: str, outputs: dict[str, Any]) -> dict[str, Any]:
    record = {"step": step, "finished": _now(), **outputs}
    write_json(marker_path(cycle_dir, step), json.loads(json.dumps(record, default=str)))
    return record
