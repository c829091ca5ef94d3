"""How `recforge data prepare` grows with the log, on both engines, and what the streaming trainer costs.

For each size (events) a click log is generated here, chunk by chunk (bounded memory), as parquet
part files of at most --file-rows rows under .bench/data_scale/<size>/log/: users and items Zipf-like,
a device context, an item category, a numeric feature, 14 days of timestamps and a 0/1 click.
Then, for each engine, `recforge data prepare` runs in a fresh process while a sampler reads /proc
every 0.2 s and keeps the peak resident memory of each part of the job:

  driver      the recforge process itself (for engine=local: everything)
  jvm         Spark's JVM (local[N]: the driver and the executors share it)
  workers     Spark's Python workers (the tasks running recforge's row rules), summed over the
              workers alive at one instant

and, with --train, `recforge train` (data_loading=stream) on each engine's output: samples/s from its
metrics, its peak RSS and its peak anonymous RSS (without file-backed pages: the memory-mapped shards'
pages are page cache that the kernel reclaims, and they count in RSS as the trainer reads through them).
Results are printed as a table and, with --json, as JSON; the fitted
per-event cost is the least-squares slope of wall time over events.

    .venv/bin/python bench/data_scale.py --sizes 1000000,10000000 --engines local,spark
    .venv/bin/python bench/data_scale.py --sizes 50000000 --engines spark --spark-conf spark.driver.memory=4g
    .venv/bin/python bench/data_scale.py --sizes 2000000 --hot-user-events 1000000   # one user, 1M events
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _machine import cpu

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".bench" / "data_scale"
_PAGE = os.sysconf("SC_PAGE_SIZE")
_START = 1_767_225_600  # 2026-01-01
_RECFORGE = [str(Path(sys.executable).with_name("recforge"))]


def generate(events: int, out: Path, file_rows: int, seed: int = 0, hot_user_events: int = 0) -> Path:
    """A synthetic click log of `events` rows as parquet parts; reused if already complete.

    With `hot_user_events`, one extra user (id -1, a crawler or a shared device) owns that many of the
    rows, spread over every file: the skew that puts a whole bucket, window and history on one task.
    """
    done = out / "_COMPLETE"
    if done.is_file() and done.read_text() == f"{events}:{hot_user_events}":
        return out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.parquet"):
        old.unlink()
    rng = np.random.default_rng(seed)
    users, items = max(1000, events // 50), max(1000, events // 100)
    span = 14 * 86400
    files = -(-events // file_rows)
    for f in range(files):
        n = min(file_rows, events - f * file_rows)
        user = (rng.pareto(1.2, n) * users / 20).astype(np.int64) % users
        if hot_user_events:
            user[rng.random(n) < hot_user_events / events] = -1
        item = (rng.pareto(1.1, n) * items / 50).astype(np.int64) % items
        lo, hi = f * span // files, (f + 1) * span // files
        time_ = _START + np.sort(rng.integers(lo, max(lo + 1, hi), n))
        table = pa.table({
            "user_id": user, "item_id": item, "timestamp": time_,
            "device": pa.array(np.array(["ios", "android", "web", "tv"])[rng.integers(0, 4, n)]),
            "category": item % 300, "position": rng.integers(0, 20, n).astype(np.float64),
            "label": (rng.random(n) < 0.05 + 0.1 * (item % 7 == 0)).astype(np.int64),
        })
        pq.write_table(table, out / f"part-{f:05d}.parquet")
    done.write_text(f"{events}:{hot_user_events}")
    return out


def _rss(pid: int, anonymous: bool = False) -> int:
    """Resident bytes of a process; `anonymous`: without its file-backed pages (statm resident - shared), i.e.
    without the pages of memory-mapped shards, which are page cache the kernel drops under pressure."""
    try:
        with open(f"/proc/{pid}/statm") as handle:
            fields = handle.read().split()
    except OSError:
        return 0
    return (int(fields[1]) - (int(fields[2]) if anonymous else 0)) * _PAGE


def _children(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as handle:
                kids = [int(k) for k in handle.read().split()]
        except OSError:
            kids = []
        found += kids
        stack += kids
    return found


def _kind(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmd = handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    if "java" in cmd.split(" ")[0]:
        return "jvm"
    return "workers" if "pyspark" in cmd or "daemon" in cmd else "other"


def run_measured(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run `cmd`; its wall time and the peak RSS of driver / jvm / workers (sampled every 0.2 s)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"driver": 0, "driver_anon": 0, "jvm": 0, "workers": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            now = {"driver": _rss(proc.pid), "driver_anon": _rss(proc.pid, anonymous=True), "jvm": 0, "workers": 0,
                   "other": 0, "gone": 0}
            for child in _children(proc.pid):
                now[_kind(child)] += _rss(child)
            for key in peaks:
                peaks[key] = max(peaks[key], now[key])
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-4000:]}")
    return {"seconds": round(wall, 1), **{f"{k}_peak_mb": round(v / 2**20) for k, v in peaks.items()},
            "stdout": out}


def _config(log: Path, work: Path, engine: str, spark_conf: list[str]) -> Path:
    """The run's config file (spark settings hold dots, so they go in YAML, not in key=value overrides)."""
    config = {
        "workdir": str(work),
        "data": {"source": str(log), "format": "parquet", "engine": engine,
                 "schema": {"context": ["device"], "item_features": ["category"], "numeric": ["position"],
                            "label": {"kind": "click", "column": "label"}},
                 "spark": {"conf": dict(item.split("=", 1) for item in spark_conf)}},
        "train": {"epochs": 1, "progress": False, "threads": 2, "data_loading": "stream"},
        "model": {"name": "dnn"},
    }
    work.mkdir(parents=True, exist_ok=True)
    path = work / "config.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(config))
    return path


def prepare(log: Path, work: Path, engine: str, spark_conf: list[str], reuse: bool = False) -> dict[str, Any]:
    config = _config(log, work, engine, spark_conf)
    if reuse and (work / "prepared" / "manifest.json").exists():
        result: dict[str, Any] = {"reused": True, "seconds": None, "stdout": ""}
    else:
        result = run_measured([*_RECFORGE, "data", "prepare", "--config", str(config)], dict(os.environ))
    meta = json.loads((work / "prepared" / "meta.json").read_text())
    result.update(rows=meta["rows"], shards=sum(len(s["shards"]) for s in json.loads(
        (work / "prepared" / "manifest.json").read_text())["splits"].values()))
    result.pop("stdout")
    return result


def train(work: Path, batch_size: int) -> dict[str, Any]:
    run_dir = work / "run-stream"
    cmd = [*_RECFORGE, "train", "--config", str(work / "config.json"), f"run_dir={run_dir}",
           f"train.batch_size={batch_size}"]
    result = run_measured(cmd, dict(os.environ))
    result.pop("stdout")
    result["samples_per_s"] = round(json.loads((run_dir / "train_summary.json").read_text())["samples_per_s"])
    return result


def fitted_cost(points: list[tuple[int, float]]) -> float | None:
    """Seconds per million events: the least-squares slope of wall time over events."""
    if len(points) < 2:
        return None
    x = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    return float(np.polyfit(x, y, 1)[0] * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--engines", default="local,spark")
    parser.add_argument("--file-rows", type=int, default=1_000_000)
    parser.add_argument("--spark-conf", action="append", default=[], help="KEY=VALUE, e.g. spark.driver.memory=4g")
    parser.add_argument("--train", action="store_true", help="also train (stream) on each engine's output")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--hot-user-events", type=int, default=0,
                        help="one user owns this many of the events (skew), e.g. 1000000 of 10000000")
    parser.add_argument("--reuse-prepared", action="store_true",
                        help="keep a size/engine's prepared output from an earlier run (no prepare row: --train only)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[str, Any] = {"cpu": cpu(), "runs": []}
    print(f"# {results['cpu']}", file=sys.stderr)
    for size in [int(s) for s in args.sizes.split(",")]:
        name = f"{size}-hot{args.hot_user_events}" if args.hot_user_events else str(size)
        log = generate(size, WORK / name / "log", args.file_rows, hot_user_events=args.hot_user_events)
        for engine in args.engines.split(","):
            work = WORK / name / engine
            run = {"events": size, "engine": engine, "hot_user_events": args.hot_user_events,
                   **prepare(log, work, engine, args.spark_conf, args.reuse_prepared)}
            if args.train:
                run["train"] = train(work, args.batch_size)
            results["runs"].append(run)
            print(json.dumps(run), file=sys.stderr)
    for engine in args.engines.split(","):
        points = [(r["events"], r["seconds"]) for r in results["runs"] if r["engine"] == engine and r["seconds"]]
        results[f"{engine}_s_per_million_events"] = fitted_cost(points)
    print("| events | engine | wall s | driver MB | JVM MB | workers MB | rows | shards |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results["runs"]:
        if not r.get("reused"):
            print(f"| {r['events']:,} | {r['engine']} | {r['seconds']} | {r['driver_peak_mb']} | {r['jvm_peak_mb']} | "
                  f"{r['workers_peak_mb']} | {r['rows']:,} | {r['shards']} |")
    if args.train:
        print("| events | engine | train s | peak MB | anonymous peak MB | samples/s |")
        print("|---:|---|---:|---:|---:|---:|")
        for r in results["runs"]:
            t = r["train"]
            print(f"| {r['events']:,} | {r['engine']} | {t['seconds']} | {t['driver_peak_mb']} | "
                  f"{t['driver_anon_peak_mb']} | {t['samples_per_s']:,} |")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
