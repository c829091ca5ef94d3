"""Partitions, watermark and cycles: what counts as new data, and that nothing is lost or retaken."""

from __future__ import annotations

import json

from recforge.pipeline.ingest import (
    abandon_cycle,
    close_cycle,
    current_cycle,
    list_partitions,
    open_cycle,
    window,
)


def _day(events, name: str, text: str = "x") -> None:
    path = events / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_window_keeps_the_newest_days_and_undated_files():
    found = {f"2026-01-0{d}.parquet": {"size": 1, "day": f"2026-01-0{d}"} for d in range(1, 8)}
    found["static.csv"] = {"size": 1, "day": None}
    assert window(found, 3) == ["2026-01-05.parquet", "2026-01-06.parquet", "2026-01-07.parquet", "static.csv"]


def test_partitions_skip_files_being_written(tmp_path):
    events = tmp_path / "events"
    _day(events, "2026-01-01.parquet")
    _day(events, "date=2026-01-02/part-0.parquet")
    _day(events, ".tmp-2026-01-03.parquet")
    _day(events, "_SUCCESS")
    _day(events, "notes.txt")
    assert list(list_partitions(events)) == ["2026-01-01.parquet", "date=2026-01-02/part-0.parquet"]
    assert list_partitions(events)["date=2026-01-02/part-0.parquet"]["day"] == "2026-01-02"


def test_a_cycle_stays_open_until_closed_and_then_only_new_data_opens_another(tmp_path):
    events, state = tmp_path / "events", tmp_path / "state"
    _day(events, "2026-01-01.parquet")
    _day(events, "2026-01-02.parquet")
    first = open_cycle(events, state, window_days=7)
    assert first is not None and first["new"] == ["2026-01-01.parquet", "2026-01-02.parquet"]
    assert (state / "cycles" / first["cycle"] / "input" / "2026-01-02.parquet").read_text() == "x"
    _day(events, "2026-01-03.parquet")  # arrives mid-cycle: belongs to the next cycle
    again = open_cycle(events, state, window_days=7)
    assert again["cycle"] == first["cycle"] and again["resumed"] is True  # a killed run resumes, loses nothing
    close_cycle(state, first, "canary")
    close_cycle(state, first, "canary")  # closing twice changes nothing
    assert current_cycle(state) is None
    watermark = json.loads((state / "watermark.json").read_text())
    assert watermark["last_day"] == "2026-01-02" and watermark["cycles"] == 1
    second = open_cycle(events, state, window_days=7)
    assert second["new"] == ["2026-01-03.parquet"] and second["cycle"].startswith("0002-")
    close_cycle(state, second, "refuse")
    assert open_cycle(events, state, window_days=7) is None  # no new data
    _day(events, "2026-01-02.parquet", "rewritten")  # a day rewritten with more rows is new again
    third = open_cycle(events, state, window_days=7)
    assert third["new"] == ["2026-01-02.parquet"]


def test_a_far_future_or_impossible_day_neither_anchors_the_window_nor_is_consumed(tmp_path):
    events, state = tmp_path / "events", tmp_path / "state"
    _day(events, "2026-01-01.parquet")
    _day(events, "2026-01-02.parquet")
    _day(events, "2100-01-01.parquet")  # a client clock 74 years ahead
    _day(events, "2026-13-45.parquet")  # not a date: an undated partition
    assert list_partitions(events)["2026-13-45.parquet"]["day"] is None
    cycle = open_cycle(events, state, window_days=1)
    assert cycle["window"] == ["2026-01-02.parquet", "2026-13-45.parquet"] and cycle["future"] == [
        "2100-01-01.parquet"]
    assert "2100-01-01.parquet" not in cycle["new"]
    close_cycle(state, cycle, "canary")
    assert "2100-01-01.parquet" not in json.loads((state / "watermark.json").read_text())["files"]
    assert open_cycle(events, state, window_days=1) is None  # the future day waits for its day


def test_a_stuck_cycle_is_counted_and_can_be_abandoned(tmp_path):
    events, state = tmp_path / "events", tmp_path / "state"
    _day(events, "2026-01-01.parquet")
    first = open_cycle(events, state, window_days=7)
    assert [open_cycle(events, state, window_days=7)["resumes"] for _ in range(3)] == [1, 2, 3]
    abandoned = abandon_cycle(state)
    assert abandoned["cycle"] == first["cycle"] and abandoned["status"] == "abandoned"
    assert current_cycle(state) is None and abandon_cycle(state) is None
    retry = open_cycle(events, state, window_days=7)  # its data is retried, in a cycle of its own
    assert retry["new"] == ["2026-01-01.parquet"] and retry["resumed"] is False
    assert retry["cycle"].startswith("0002-") and retry["dir"] != first["dir"]
    abandon_cycle(state, consume=True)
    assert open_cycle(events, state, window_days=7) is None  # consumed: not retried


def test_pipeline_reports_a_stuck_cycle_and_the_abandon_command_closes_it(tmp_path):
    from typer.testing import CliRunner

    from recforge.cli import app
    from recforge.pipeline import load_pipeline, run

    events, state = tmp_path / "events", tmp_path / "state"
    _day(events, "2026-01-01.parquet")
    _day(events, "2100-01-01.parquet")
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"events_dir: {events}\nstate_dir: {state}\nregistry: {tmp_path / 'registry'}\n")
    cfg = load_pipeline(config)
    lines: list[str] = []
    for _ in range(4):
        run(cfg, "ingest", lines.append)
    assert "ignoring 1 partition(s) dated after today (UTC) until their day comes: 2100-01-01.parquet" in lines[0]
    assert any("resumed 3 times without finishing" in line and "recforge pipeline abandon" in line for line in lines)
    result = CliRunner().invoke(app, ["pipeline", "abandon", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["decision"] == "abandoned"
    assert current_cycle(state) is None
