"""The shared stream into the lake, exactly once through a crash at every step, and the labelled export from
the lake equal to the export from a server's own SQLite store of the same events."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recforge.serve.events import EventStore, encode_event, export_report
from recforge.serve.redis_state import RedisPlane, RedisSettings, event_body
from recforge.serve.stream_lake import LeaseHeld, StreamIngest, export_lake, lake_files
from recforge.serve.telemetry import ServeMetrics

pytestmark = pytest.mark.slow  # starts redis-server

T0 = 1_767_225_600.0  # 2026-01-01


def _plane(url: str) -> RedisPlane:
    return RedisPlane(RedisSettings(url=url, prefix="t", seen_per_user=5, event_id_ttl_s=600, wait_replicas=0,
                                    wait_timeout_ms=100, user_ttl_s=0, options={}), ServeMetrics())


def _batches(n_batches: int = 6) -> list[list]:
    """Impressions and some clicks (a click's label joins its impression), ids on every event."""
    out = []
    for b in range(n_batches):
        batch = []
        for i in range(8):
            ts = T0 + b * 3600 + i
            batch.append(encode_event("impression", f"r{b}", b % 3, 100 + i, i, ts, {"device": "ios"}, {"e": "a"},
                                      "1/1", {"category": i % 2}, f"imp-{b}-{i}"))
        batch.append(encode_event("click", f"r{b}", b % 3, 100 + b % 8, b % 8, T0 + b * 3600 + 30, {}, {}, "1/1",
                                  None, f"clk-{b}"))
        out.append(batch)
    return out


def _lake_event_ids(lake: Path) -> list[str]:
    return [e for path in lake_files(lake) for e in pq.read_table(path).column("event_id").to_pylist()]


def _add_on_days(client, days: list[str]) -> list[str]:
    """Entries with explicit stream ids on given arrival days (the server's ids are Redis's clock: today)."""
    from datetime import UTC, datetime

    ids = []
    for n, day in enumerate(days):
        ms = int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() * 1000) + n
        event = encode_event("impression", f"d{n}", 1, 7, 0, ms / 1000, {}, {}, None, {}, f"day-{n}")
        ids.append(client.xadd("t:events", {"event": event_body(event, ms / 1000)}, id=f"{ms}-0"))
    return ids


def test_the_lake_export_equals_the_export_of_a_sqlite_store_of_the_same_events(redis_factory, tmp_path) -> None:
    server = redis_factory()
    plane, store = _plane(server.url), EventStore(tmp_path / "events")
    for batch in _batches():
        plane.events.append(batch + batch[:2])  # a retried pair within the batch: stored once by both
        store.append(batch + batch[:2])
    report = StreamIngest(server.client(), tmp_path / "lake", prefix="t", batch=20).run()
    assert report.written == 54 and report.already_in_lake == 0 and len(report.files) >= 3
    assert server.client().xlen("t:events") == 0  # trimmed: the lake holds all of it
    from_lake = export_lake(tmp_path / "lake", tmp_path / "out-lake")
    from_store = export_report(tmp_path / "events", tmp_path / "out-store")
    assert from_lake.days == from_store.days and from_lake.exported_rows == 48
    assert from_lake.clicks == from_store.clicks == 6
    for day in from_store.days:
        lake_table = pq.read_table(tmp_path / "out-lake" / f"{day}.parquet")
        store_table = pq.read_table(tmp_path / "out-store" / f"{day}.parquet")
        assert lake_table.equals(store_table), day
    assert sum(pq.read_table(tmp_path / "out-lake" / f"{d}.parquet").column("label").to_pylist().count(1)
               for d in from_lake.days) == 6


class Crash(BaseException):
    """Stands for kill -9: nothing after it runs (no except clause of the ingest catches a BaseException)."""


@pytest.mark.parametrize("step,nth", [("read", 1), ("file", 1), ("file", 2), ("ack", 1), ("trim", 1), ("read", 3)])
def test_a_crash_at_any_step_leaves_each_event_in_the_lake_exactly_once(redis_factory, tmp_path, step, nth) -> None:
    server = redis_factory()
    client, plane, lake = server.client(), _plane(server.url), tmp_path / "lake"
    expected = _add_on_days(client, ["2026-01-01", "2026-01-01", "2026-01-02", "2026-01-03"])
    expected = [f"day-{n}" for n in range(len(expected))]
    for batch in _batches(3):
        plane.events.append(batch)
        expected += [e.event_id for e in batch]
    seen = {"count": 0}

    def crash_on(name: str) -> None:
        if name == step:
            seen["count"] += 1
            if seen["count"] == nth:
                raise Crash(name)

    with pytest.raises(Crash):
        StreamIngest(client, lake, prefix="t", batch=10, lease_s=0.5).run(on_step=crash_on)
    client.delete("t:lake:lease")  # the dead run's lease, which would lapse by itself
    more = _batches(4)[3]
    plane.events.append(more)  # the servers kept taking events meanwhile
    expected += [e.event_id for e in more]
    report = StreamIngest(client, lake, prefix="t", batch=10).run()
    ids = _lake_event_ids(lake)
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids)), (step, nth, report)
    assert client.xlen("t:events") == 0 and client.xpending("t:events", "lake")["pending"] == 0
    days = sorted(p.parent.name for p in map(Path, lake_files(lake)))
    assert days[:3] == ["day=2026-01-01", "day=2026-01-02", "day=2026-01-03"]


def test_the_stream_keeps_what_the_lake_does_not_hold_and_one_ingest_runs_at_a_time(redis_factory, tmp_path) -> None:
    server = redis_factory()
    client, plane = server.client(), _plane(server.url)
    plane.events.append(_batches(1)[0])
    first = StreamIngest(client, tmp_path / "lake", prefix="t", batch=100, lease_s=30)
    first._take_lease()
    with pytest.raises(LeaseHeld, match="another `recforge events ingest`"):
        StreamIngest(client, tmp_path / "lake", prefix="t").run()
    first._release_lease()
    StreamIngest(client, tmp_path / "lake", prefix="t").run()
    plane.events.append(_batches(2)[1])
    assert client.xlen("t:events") == 9  # new events wait in the stream for the next ingest
    entries = client.xrange("t:events")
    assert json.loads(entries[0][1]["event"])["event_id"] == "imp-1-0"
