"""The online simulator's default scenarios, timed end to end: `recforge simulate --scenario ab|loop`.

Each scenario runs once with configs/simulate/synthetic.yaml in a fresh work directory under
.bench/simulate/, through the real CLI (world, training, `recforge serve`, `recforge pipeline run`,
the A/B report), and the wall time of the whole command is recorded next to its figures. The
1-minute load average is recorded too: other work on the machine shows up in these times.

    .venv/bin/python bench/simulate_bench.py                 # both scenarios, a summary
    .venv/bin/python bench/simulate_bench.py --scenario ab   # one
    .venv/bin/python bench/simulate_bench.py --json          # one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "simulate" / "synthetic.yaml"


def run(scenario: str, out: Path, extra: list[str]) -> dict:
    workdir = out / scenario
    shutil.rmtree(workdir, ignore_errors=True)
    command = [sys.executable, "-m", "recforge.cli", "simulate", "--scenario", scenario, "--config", str(CONFIG),
               "--json", f"workdir={workdir}", *extra]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{scenario} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.pop("report", None)
    return {"scenario": scenario, "wall_s": round(wall, 1), "load_before": load_before,
            "load_after": os.getloadavg()[0], "cpus": os.cpu_count(), "result": result}


def summary(entry: dict) -> str:
    r = entry["result"]
    load = f"load {entry['load_before']:.1f}->{entry['load_after']:.1f}"
    head = f"{entry['scenario']}: {entry['wall_s']:.0f}s wall ({load})"
    if entry["scenario"] == "ab":
        lo, hi = r["ci"]
        return (f"{head}; winner {r['winner']}, p {r['p_value']:.2g}, measured lift {100 * r['measured_lift']:+.1f}% "
                f"[{100 * lo:+.1f}, {100 * hi:+.1f}], expected {100 * r['expected_lift']:+.1f}%")
    days = " ".join(f"{c:.4f}" for c in r["ctr_per_day"])
    return (f"{head}; truth CTR per day {days}; decisions {r['decisions']}; "
            f"all events in training: {r['all_events_in_training']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=["ab", "loop"], action="append")
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "simulate")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the simulate config")
    args = parser.parse_args()
    entries = [run(s, args.out, args.overrides) for s in (args.scenario or ["ab", "loop"])]
    if args.json:
        print(json.dumps(entries))
        return
    for entry in entries:
        print(summary(entry))


if __name__ == "__main__":
    main()
