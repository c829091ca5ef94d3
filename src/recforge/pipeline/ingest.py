"""New event-log partitions since the watermark, and the training cycle they open.

A partition is one data file under the events directory (the synthetic world writes one per
day, `YYYY-MM-DD.parquet`). The watermark (`<state>/watermark.json`) lists every partition a
finished cycle has consumed, with its size, so a partition that appears (or is rewritten) later
is new. The watermark moves only when a cycle closes: a pipeline killed mid-cycle finds the same
open cycle (`<state>/current.json`) on its next run and loses no data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from recforge.storage import read_json, write_json

_DAY = re.compile(r"(\d{4}-\d{2}-\d{2})")
_SUFFIXES = (".parquet", ".pq", ".csv", ".dat")
WATERMARK = "watermark.json"
CURRENT = "current.json"


def list_partitions(events_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Data files under `events_dir` by relative name, with size and day (None if the name has none).

    The same files the event reader would read: hidden names ('.', '_': writers' temp files and
    markers) are skipped, so a partition being written is not taken half-done.
    """
    root = Path(events_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"events directory not found: {root} (set events_dir in the pipeline config)")
    found: dict[str, dict[str, Any]] = {}
    for file in sorted(root.rglob("*")):
        rel = file.relative_to(root)
        if any(part.startswith((".", "_")) for part in rel.parts) or not file.is_file():
            continue
        if not (file.name.lower().endswith(_SUFFIXES) or file.name.lower() == "u.data"):
            continue
        found[rel.as_posix()] = {"size": file.stat().st_size, "day": _day_of(rel.as_posix())}
    return found


def _day_of(name: str) -> str | None:
    """The first real calendar date in a partition's name (`2026-13-45` is none), or None."""
    for match in _DAY.finditer(name):
        try:
            return date.fromisoformat(match.group(1)).isoformat()
        except ValueError:
            continue
    return None


def split_future(found: dict[str, dict[str, Any]], today: date | None = None
                 ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The partitions a cycle may use, and those dated after `today` (UTC; the machine's clock).

    A day that has not happened yet holds no real data (a client clock set ahead, a typo in a name): it
    must not become "the newest day" the window counts back from, nor be marked consumed. It is reported
    and left for the cycle after its day has come.
    """
    last = (today or datetime.now(UTC).date()).isoformat()
    future = sorted(name for name, info in found.items() if info["day"] and info["day"] > last)
    return {name: info for name, info in found.items() if name not in future}, future


def read_watermark(state_dir: Path) -> dict[str, Any]:
    path = Path(state_dir) / WATERMARK
    return read_json(path) if path.is_file() else {"files": {}, "last_day": None, "cycles": 0}


def new_partitions(found: dict[str, dict[str, Any]], watermark: dict[str, Any]) -> list[str]:
    """Partitions not consumed yet, or whose size changed since (a rewritten day)."""
    seen = watermark.get("files", {})
    return [name for name, info in found.items() if seen.get(name, {}).get("size") != info["size"]]


def window(found: dict[str, dict[str, Any]], days: int) -> list[str]:
    """The partitions of the newest `days` days (undated partitions always included)."""
    dated = [info["day"] for info in found.values() if info["day"]]
    if not dated:
        return sorted(found)
    first = (date.fromisoformat(max(dated)) - timedelta(days=days - 1)).isoformat()
    return sorted(name for name, info in found.items() if info["day"] is None or info["day"] >= first)


def fingerprint(found: dict[str, dict[str, Any]], names: list[str]) -> str:
    payload = json.dumps([[n, found[n]["size"]] for n in names], separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def current_cycle(state_dir: Path) -> dict[str, Any] | None:
    """The open cycle, if a previous run left one unfinished (or one is in progress step by step)."""
    path = Path(state_dir) / CURRENT
    if not path.is_file():
        return None
    current = read_json(path)
    return current if current.get("status") == "open" else None


def _link_inputs(events_dir: Path, names: list[str], target: Path) -> None:
    """The window's partitions as links in one directory: what `data.source` of the cycle reads."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        for name in names:
            link = tmp / name
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink((events_dir / name).resolve(), link)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_cycle(events_dir: str | Path, state_dir: str | Path, window_days: int) -> dict[str, Any] | None:
    """Continue the open cycle, or open one for new partitions; None when there is no new data."""
    state = Path(state_dir)
    current = current_cycle(state)
    if current is not None:
        # Counted so that a cycle which fails on every run is visible as stuck (see `recforge pipeline abandon`).
        current = {**current, "resumes": int(current.get("resumes", 0)) + 1}
        write_json(state / CURRENT, current)
        return {**current, "resumed": True}
    found, future = split_future(list_partitions(events_dir))
    watermark = read_watermark(state)
    new = new_partitions(found, watermark)
    if not new:
        return None
    names = window(found, window_days)
    fp = fingerprint(found, names)
    number = int(watermark.get("cycles", 0)) + 1
    cycle_id = f"{number:04d}-{fp[:12]}"
    cycle_dir = state / "cycles" / cycle_id
    _link_inputs(Path(events_dir), names, cycle_dir / "input")
    record = {"cycle": cycle_id, "status": "open", "dir": str(cycle_dir), "number": number, "fingerprint": fp,
              "new": new, "window": names, "window_days": window_days, "seen": found, "future": future,
              "opened": datetime.now(UTC).isoformat(timespec="seconds")}
    write_json(cycle_dir / "input.json", record)
    write_json(state / CURRENT, record)  # last: from now on the cycle exists and will be resumed
    return {**record, "resumed": False}


def close_cycle(state_dir: str | Path, cycle: dict[str, Any], decision: str) -> None:
    """Mark the cycle's partitions consumed (the watermark moves) and the cycle finished."""
    state = Path(state_dir)
    current = read_json(state / CURRENT) if (state / CURRENT).is_file() else {}
    if current.get("cycle") != cycle["cycle"] or current.get("status") != "open":
        return  # already closed: closing twice must not move the watermark twice
    watermark = read_watermark(state)
    files = {**watermark.get("files", {}), **cycle["seen"]}
    days = [info["day"] for info in files.values() if info.get("day")]
    write_json(state / WATERMARK, {"files": files, "last_day": max(days) if days else None,
                                   "cycles": int(cycle["number"]), "last_cycle": cycle["cycle"],
                                   "last_decision": decision})
    write_json(state / CURRENT, {**current, "status": "closed", "decision": decision})


def abandon_cycle(state_dir: str | Path, consume: bool = False) -> dict[str, Any] | None:
    """Close the open cycle without finishing it (one that fails on every run); None when none is open.

    Its partitions stay new (the next cycle retries them, e.g. after the data or the config was fixed) unless
    `consume`, which marks them consumed as a finished cycle would. Either way the cycle number advances, so
    the next cycle gets its own directory and none of the abandoned cycle's step results.
    """
    state = Path(state_dir)
    current = current_cycle(state)
    if current is None:
        return None
    watermark = read_watermark(state)
    files = {**watermark.get("files", {}), **(current["seen"] if consume else {})}
    days = [info["day"] for info in files.values() if info.get("day")]
    write_json(state / WATERMARK, {**watermark, "files": files, "last_day": max(days) if days else None,
                                   "cycles": max(int(watermark.get("cycles", 0)), int(current["number"]))})
    closed = {**current, "status": "abandoned", "decision": "abandoned", "consumed": consume}
    write_json(state / CURRENT, closed)
    return closed
