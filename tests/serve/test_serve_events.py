"""Event storage is durable and atomic per batch; the export writes the training log schema, one file per
UTC day, labels impressions by their clicks, and is idempotent."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recforge.serve.events import (
    DB_FILE,
    EXPORT_REPORT,
    EventStore,
    EventStoreFull,
    encode_event,
    export_log,
    export_report,
)

DAY = 86_400
T0 = 1_767_225_600  # 2026-01-01 00:00:00 UTC


def _event(type_: str, request: str, user: int | str, item: int | str, ts: float, position: int = 0,
           category: int | None = 7) -> object:
    return encode_event(type_, request, user, item, position, ts, {"hour": 3, "device": "web"}, {"exp": "b"},
                        "retrieval:1,ranker:2", {"category": category} if type_ == "impression" else None)


def test_store_is_wal_durable_and_reopens_with_every_event(tmp_path: Path) -> None:
    store = EventStore(tmp_path)
    assert store.append([_event("impression", "r1", 1, 10, T0), _event("click", "r1", 1, 10, T0 + 1)]) == [0, 1]
    store.close()
    db = sqlite3.connect(tmp_path / DB_FILE)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened = EventStore(tmp_path)
    assert reopened.count() == 2
    assert reopened.recent(10) == [("impression", 1, 10), ("click", 1, 10)]


def test_a_batch_is_stored_whole_or_not_at_all(tmp_path: Path) -> None:
    store = EventStore(tmp_path)
    good = _event("impression", "r1", 1, 10, T0)
    bad = good._replace(request_id=None)  # violates NOT NULL
    with pytest.raises(sqlite3.IntegrityError):
        store.append([good, bad])
    assert store.count() == 0


def test_export_writes_one_labelled_file_per_utc_day_and_is_idempotent(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events")
    store.append([
        _event("impression", "r1", 1, 10, T0 + 10, position=0),
        _event("impression", "r1", 1, 11, T0 + 11, position=1),
        _event("impression", "r1", 1, 11, T0 + 12, position=1),  # a client retry: exported once
        _event("click", "r1", 1, 11, T0 + 30),
        _event("impression", "r2", 2, 10, T0 + DAY + 5, category=None),
        _event("click", "r9", 2, 10, T0 + DAY + 6),  # a click of another request labels nothing
    ])
    out = tmp_path / "log"
    report = export_report(tmp_path / "events", out)
    assert report.days == {"2026-01-01": 2, "2026-01-02": 1} and report.exported_rows == 3
    assert report.impressions == 4 and report.clicks == 2 and report.events_total == 6
    day1 = pq.read_table(out / "2026-01-01.parquet")
    assert day1.column_names == ["user_id", "item_id", "timestamp", "category", "device", "hour", "position", "label",
                                 "request_id", "assignments", "model_version", "served_history"]
    rows = day1.to_pylist()
    assert [r["served_history"] for r in rows] == [None, None]  # stored without a served record
    assert [(r["item_id"], r["label"], r["position"]) for r in rows] == [(10, 0, 0), (11, 1, 1)]
    assert rows[0]["timestamp"] == T0 + 10 and rows[0]["hour"] == 3 and rows[0]["device"] == "web"
    assert json.loads(rows[0]["assignments"]) == {"exp": "b"} and rows[0]["model_version"] == "retrieval:1,ranker:2"
    assert str(day1.schema.field("user_id").type) == "int64" and str(day1.schema.field("category").type) == "int64"
    assert pq.read_table(out / "2026-01-02.parquet").column("category").to_pylist() == [None]
    assert json.loads((out / EXPORT_REPORT).read_text())["exported_rows"] == 3
    # Re-running rewrites each day whole: no duplicated rows, no temporary files left.
    assert export_log(tmp_path / "events", out) == [out / "2026-01-01.parquet", out / "2026-01-02.parquet"]
    assert pq.read_table(out / "2026-01-01.parquet").num_rows == 2
    assert not list(out.glob(".tmp-*"))


def test_export_since_until_selects_days_and_string_ids_stay_strings(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events")
    store.append([_event("impression", f"r{d}", f"u{d}", f"i{d}", T0 + d * DAY) for d in range(4)])
    files = export_log(tmp_path / "events", tmp_path / "log", since="2026-01-02", until="2026-01-03")
    assert [f.name for f in files] == ["2026-01-02.parquet", "2026-01-03.parquet"]
    table = pq.read_table(files[0])
    assert table.column("user_id").to_pylist() == ["u1"] and str(table.schema.field("item_id").type) == "string"


def test_export_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no event store"):
        export_log(tmp_path / "missing", tmp_path / "out")
    EventStore(tmp_path / "events").close()
    with pytest.raises(ValueError, match="--since '2026/01/01' is not a date"):
        export_log(tmp_path / "events", tmp_path / "out", since="2026/01/01")
    assert export_log(tmp_path / "events", tmp_path / "out") == []


def test_a_far_future_timestamp_is_exported_on_the_day_the_server_received_it(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events")
    before = time.time()
    store.append([_event("impression", "r1", 1, 10, 4_102_444_800), _event("impression", "r2", 1, 11, T0)])
    report = export_report(tmp_path / "events", tmp_path / "log")
    received_day = datetime.fromtimestamp(before, UTC).date().isoformat()
    assert report.days == {"2026-01-01": 1, received_day: 1}
    assert not (tmp_path / "log" / "2100-01-01.parquet").exists()
    (future,) = pq.read_table(tmp_path / "log" / f"{received_day}.parquet").column("timestamp").to_pylist()
    assert before - 1 <= future <= time.time()


def test_export_reads_the_totals_and_the_rows_in_one_snapshot(tmp_path: Path, monkeypatch) -> None:
    """Events committed while the export runs are in neither its counts nor its files."""
    import recforge.serve.events as events

    store = EventStore(tmp_path / "events")
    store.append([_event("impression", "r1", 1, 10, T0), _event("impression", "r2", 2, 10, T0 + DAY)])
    write_table = events._rows_to_table

    def a_write_between_days(rows):
        store.append([_event("impression", f"late{n}", 3, 10, T0 + DAY + n) for n in range(5)])
        return write_table(rows)

    monkeypatch.setattr(events, "_rows_to_table", a_write_between_days)
    report = export_report(tmp_path / "events", tmp_path / "log")
    assert report.events_total == report.impressions == report.exported_rows == 2
    assert pq.read_table(tmp_path / "log" / "2026-01-02.parquet").num_rows == 1
    assert store.count() == 12


def _fill(store: EventStore) -> None:
    """Cap the database at its current size, as a full disk would."""
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count={pages}")


def test_a_full_store_refuses_the_batch_with_the_reason_and_recovers(tmp_path: Path) -> None:
    store = EventStore(tmp_path)
    store.append([_event("impression", "r0", 1, 10, T0)])
    _fill(store)
    batch = [_event("impression", f"r{n}", 1, 10, T0) for n in range(50)]
    with pytest.raises(EventStoreFull, match="database or disk is full"):
        store.append(batch)
    with pytest.raises(EventStoreFull):
        store.probe()
    assert store.count() == 1 and not store._db.in_transaction
    store._db.execute("PRAGMA max_page_count=1073741823")  # space freed
    store.probe()
    assert len(store.append(batch)) == 50 and store.last_id() == store.count() == 51
