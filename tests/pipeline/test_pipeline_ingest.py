"""Partitions, watermark and cycles: what counts as new data, and that nothing is lost or retaken."""

from __future__ import annotations

import json

from recforge.pipeline.ingest import close_cycle, current_cycle, list_partitions, open_cycle, window


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
