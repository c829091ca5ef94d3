"""`recforge simulate --scenario loop` end to end: served days feed the real pipeline, which gates and promotes."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from _sim_cli import simulate

pytestmark = pytest.mark.slow


def test_the_closed_loop_records_every_day_and_loses_no_event(tmp_path):
    result, _ = simulate(tmp_path, "loop", "requests_per_day=400")
    days = result["days"]
    assert len(days) == 2 and len(result["ctr_per_day"]) == 2
    assert all(0.0 < c < 1.0 for c in result["ctr_per_day"])
    # A week (loop.start_gap_days) after the 4-day offline log of 2026-01-01..04.
    assert [d["date"] for d in days] == ["2026-01-12", "2026-01-13"]
    # The injected weak challenger of day 1 is refused by the pipeline's gate, with reasons on record.
    weak = days[1]
    assert weak["injected_weak"] and weak["gate"]["decision"] == "refuse"
    assert any("user_auc" in r for r in weak["gate"]["reasons"])
    assert any(r["day"] == 1 and r["reasons"] for r in result["refused"])
    cycle = Path(result["workdir"]) / "pipeline-state" / "cycles" / weak["gate"]["cycle"]
    assert json.loads((cycle / "gate.json").read_text())["decision"] == "refuse"
    # Everything the server accepted reached the prepared training data of that day's cycle.
    assert result["events_accepted"] == result["events_in_training"] == [4000, 4000]
    assert result["clicks_accepted"] == result["clicks_in_training"]
    assert result["all_events_in_training"] is True
    # Each day's events landed in that day's partition of the pipeline's events directory.
    served = Path(result["workdir"]) / "events" / "served"
    assert [pq.read_metadata(served / f"{d['date']}.parquet").num_rows for d in days] == [4000, 4000]
    # The pipeline really served its models: the first ranker went to production before day 0.
    assert result["initial"]["promote"]["status"] == "promoted"
    assert days[0]["production"] == result["initial"]["version"]
    assert Path(result["plot"]).is_file()
