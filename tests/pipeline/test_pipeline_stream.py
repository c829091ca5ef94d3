"""The pipeline on the servers' shared Redis (`online:` in its config): each run first moves the event
stream into the lake and exports the lake's recent days into events_dir, so a cycle opens on the events
every replica accepted. A real Redis; the events are appended by the servers' own sink."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pyarrow.parquet as pq
import pytest

from recforge.pipeline import load_pipeline, run
from recforge.serve.events import encode_event
from recforge.serve.redis_state import RedisPlane, RedisSettings
from recforge.serve.telemetry import ServeMetrics

pytestmark = pytest.mark.slow  # starts redis-server


def test_a_pipeline_run_opens_its_cycle_on_the_streams_events(redis_factory, tmp_path) -> None:
    server = redis_factory()
    plane = RedisPlane(RedisSettings(url=server.url, prefix="pl", seen_per_user=10, event_id_ttl_s=60,
                                     wait_replicas=0, wait_timeout_ms=100, user_ttl_s=0, options={}), ServeMetrics())
    now = time.time()
    events = []
    for i in range(30):
        events.append(encode_event("impression", f"r{i // 3}", i % 7, 100 + i, i % 3, now - 60 + i, None, None,
                                   None, None))
        if i % 4 == 0:
            events.append(encode_event("click", f"r{i // 3}", i % 7, 100 + i, i % 3, now - 60 + i, None, None,
                                       None, None))
    plane.events.append(events)
    lake, events_dir, state = tmp_path / "lake", tmp_path / "events", tmp_path / "state"
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"events_dir: {events_dir}\nstate_dir: {state}\nregistry: {tmp_path / 'registry'}\n"
                      f"online:\n  state: {server.url}\n  lake: {lake}\n  prefix: pl\n")
    lines: list[str] = []
    summary = run(load_pipeline(config), "ingest", lines.append)
    day = datetime.fromtimestamp(now - 60, tz=UTC).date().isoformat()
    table = pq.read_table(events_dir / f"{day}.parquet")
    assert table.num_rows == 30 and table.column("label").to_pylist().count(1) == 8
    assert any(line.startswith("stream: 38 new event(s)") for line in lines), lines
    assert summary["cycle"] is not None and server.client().xlen("pl:events") == 0  # in the lake, then trimmed
    assert len(list(lake.rglob("part-*.parquet"))) == 1


def test_the_features_step_seeds_users_histories_from_the_cycles_log_before_train(redis_factory, tmp_path) -> None:
    server = redis_factory()
    plane = RedisPlane(RedisSettings(url=server.url, prefix="pf", seen_per_user=10, event_id_ttl_s=60,
                                     wait_replicas=0, wait_timeout_ms=100, user_ttl_s=0, options={}), ServeMetrics())
    now = time.time()
    events = []
    for i in range(40):
        user, at = i % 5, now - 120 + i
        context, features = {"hour": i % 24, "device": "ios"}, {"category": i % 4}  # the default schema's columns
        events.append(encode_event("impression", f"r{i}", user, 200 + i, 0, at, context, None, None, features))
        if i % 3 == 0:
            events.append(encode_event("click", f"r{i}", user, 200 + i, 0, at, context, None, None, features))
    plane.events.append(events)
    client = server.client()
    for user in range(5):  # what the stream's own appends left: replaced by the log's histories
        client.delete(f"pf:u:{user}:clicked", f"pf:u:{user}:shown")
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"events_dir: {tmp_path / 'events'}\nstate_dir: {tmp_path / 'state'}\n"
                      f"registry: {tmp_path / 'registry'}\n"
                      f"online:\n  state: {server.url}\n  lake: {tmp_path / 'lake'}\n  prefix: pf\n")
    cfg = load_pipeline(config)
    run(cfg, "ingest", lambda _: None)
    with pytest.raises(RuntimeError, match="needs step 'prepare' first"):
        run(cfg, "train", lambda _: None)  # the first missing step is named
    run(cfg, "prepare", lambda _: None)
    with pytest.raises(RuntimeError, match="needs step 'features' first"):
        run(cfg, "train", lambda _: None)
    summary = run(cfg, "features", lambda _: None)
    assert summary["outputs"]["users"] == 5
    for user in range(5):
        clicks = [str(200 + i) for i in range(40) if i % 5 == user and i % 3 == 0]
        assert client.lrange(f"pf:u:{user}:clicked", 0, -1) == clicks[-10:]
    again = run(cfg, "features", lambda _: None)  # done-marker: reused, not redone
    assert again["outputs"]["users"] == 5

