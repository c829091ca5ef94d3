"""The shared online plane against a real redis-server: two planes stand for two server replicas."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import redis

from recforge.data.history import latest_histories
from recforge.serve.canary import CanaryThresholds
from recforge.serve.events import EventStore, encode_event
from recforge.serve.feature_store import UserStateSeeder
from recforge.serve.redis_state import (
    RedisPlane,
    RedisSettings,
    RedisUnavailable,
    connection_options,
)
from recforge.serve.settings import ServeSettings
from recforge.serve.telemetry import ServeMetrics

pytestmark = pytest.mark.slow  # starts redis-server


def _plane(url: str, prefix: str = "t", per_user: int = 3, env: dict[str, str] | None = None) -> RedisPlane:
    settings = RedisSettings(url=url, prefix=prefix, seen_per_user=per_user, event_id_ttl_s=60, wait_replicas=0,
                             wait_timeout_ms=100, user_ttl_s=3600, options=connection_options(url, env or {}))
    return RedisPlane(settings, ServeMetrics())


def _event(type_: str, user: int | str, item: int, event_id: str | None = None, request: str = "r1"):
    return encode_event(type_, request, user, item, 0, 1_700_000_000.0, {"device": "ios"}, {"exp": "a"}, "1/2",
                        {"category": 3}, event_id)


# One event loop for the module, as a server has one: an asyncio client's connections belong to their loop.
_LOOP = asyncio.new_event_loop()


def _history(plane: RedisPlane, user: int | str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return _LOOP.run_until_complete(plane.users.get(user))


def test_an_event_on_one_replica_is_in_the_stream_and_the_other_replicas_user_state(redis_factory) -> None:
    server = redis_factory()
    a, b = _plane(server.url), _plane(server.url)
    fresh = a.events.append([_event("impression", 7, i) for i in range(5)] + [_event("click", 7, 4)])
    assert fresh == list(range(6))
    assert _history(b, 7) == (("3", "4", "4"), ("4",))  # capped at 3 per user, oldest first
    assert _history(b, "7") == _history(b, 7) and _history(b, 8) == ((), ())
    assert b.events.last_id() == 6
    entries = server.client().xrange("t:events")
    assert len(entries) == 6
    first = json.loads(entries[0][1]["event"])
    assert first["type"] == "impression" and json.loads(first["user_id"]) == 7 and first["received"] > 0
    assert json.loads(first["context"]) == {"device": "ios"} and first["model_version"] == "1/2"


def test_a_retried_event_id_is_stored_once_whichever_replica_takes_the_retry(redis_factory) -> None:
    server = redis_factory()
    a, b = _plane(server.url), _plane(server.url)
    assert a.events.append([_event("click", 1, 10, "e-1"), _event("click", 1, 11, "e-2")]) == [0, 1]
    # The client timed out and retried the same batch on another replica, plus one new event.
    assert b.events.append([_event("click", 1, 10, "e-1"), _event("click", 1, 11, "e-2"),
                            _event("click", 1, 12, "e-3")]) == [2]
    # Within one batch too; events without an id are never deduplicated.
    assert a.events.append([_event("click", 2, 1, "e-4"), _event("click", 2, 1, "e-4"),
                            _event("click", 2, 1), _event("click", 2, 1)]) == [0, 2, 3]
    assert server.client().xlen("t:events") == 6 and b.events.last_id() == 6
    assert _history(a, 1)[1] == ("10", "11", "12")


def test_sqlite_store_deduplicates_event_ids_too_and_upgrades_an_old_file(tmp_path: Path) -> None:
    import sqlite3

    old = tmp_path / "old"
    old.mkdir()
    db = sqlite3.connect(old / "events.sqlite")
    db.execute("CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT NOT NULL, request_id TEXT "
               "NOT NULL, user_id TEXT NOT NULL, item_id TEXT NOT NULL, position INTEGER NOT NULL, timestamp REAL "
               "NOT NULL, context TEXT NOT NULL, assignments TEXT NOT NULL, model_version TEXT, item_features TEXT "
               "NOT NULL, received REAL NOT NULL)")
    db.execute("INSERT INTO events VALUES (1, 'click', 'r', '1', '2', 0, 1.0, '{}', '{}', NULL, '{}', 1.0)")
    db.commit()
    db.close()
    store = EventStore(old)
    assert store.append([_event("click", 1, 3, "x"), _event("click", 1, 3, "x"), _event("click", 1, 4)]) == [0, 2]
    assert store.append([_event("click", 1, 3, "x")]) == []
    assert store.count() == 3 and store.last_id() == 3
    store.close()


def test_an_unreachable_redis_refuses_writes_and_reads_loudly_and_acknowledged_events_survive_kill9(
        redis_factory) -> None:
    server = redis_factory()
    plane = _plane(server.url)
    plane.events.append([_event("click", 5, i, f"k{i}") for i in range(4)])
    server.kill()
    with pytest.raises(RedisUnavailable, match="did not store the events"):
        plane.events.append([_event("click", 5, 9)])
    with pytest.raises(RedisUnavailable, match="takes no writes"):
        plane.events.probe()
    with pytest.raises(redis.RedisError):
        _history(plane, 5)
    server.start()  # same port and directory: the append-only file (fsync always) is replayed
    assert server.client().xlen("t:events") == 4
    assert _history(_plane(server.url), 5)[1] == ("1", "2", "3")
    assert plane.events.append([_event("click", 5, 1, "k1")]) == []  # the retry of an acknowledged event
    assert plane.durability() is None


def test_durability_warning_names_the_settings(redis_factory) -> None:
    server = redis_factory()
    server.client().config_set("appendfsync", "everysec")
    warning = _plane(server.url).durability()
    assert warning is not None and "appendfsync=everysec" in warning and "appendfsync always" in warning


def test_credentials_come_from_the_environment_never_the_url(redis_factory, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="show in `ps`"):
        connection_options("redis://user:pw@127.0.0.1:6379/0", {})
    with pytest.raises(ValueError, match="show in `ps`"):
        ServeSettings.load({"registry": "/r", "state": "redis://:pw@127.0.0.1:6379/0"}, environ={})
    with pytest.raises(ValueError, match="use rediss://"):
        connection_options("redis://127.0.0.1:6379/0", {"RECFORGE_REDIS_TLS_CA_FILE": "/ca.pem"})
    with pytest.raises(ValueError, match="must be a number"):
        connection_options("redis://127.0.0.1:6379/events", {})
    with pytest.raises(ValueError, match="expected local or redis://"):
        ServeSettings.load({"registry": "/r", "state": "memcached://x"}, environ={})
    server = redis_factory(password="s3cret-pw")
    with pytest.raises(RedisUnavailable, match="(?i)auth"):
        _plane(server.url).events.append([_event("click", 1, 1)])
    secret = tmp_path / "pw"
    secret.write_text("s3cret-pw\n")
    plane = _plane(server.url, env={"RECFORGE_REDIS_PASSWORD_FILE": str(secret)})
    assert plane.events.append([_event("click", 1, 1)]) == [0]
    assert "s3cret" not in repr(plane.settings.url)


def test_a_canary_breach_on_global_traffic_is_claimed_by_one_replica_and_banned_on_all(redis_factory) -> None:
    server = redis_factory()
    thresholds = CanaryThresholds(window_s=30, min_requests=10, max_error_rate=0.2, max_p99_ms=1000)
    a, b = _plane(server.url), _plane(server.url)
    # Each replica alone sees 6 requests (under min_requests): only the global window can decide.
    for plane in (a, b):
        for i in range(6):
            plane.canary.observe("ranker", 3, ok=i % 2 == 0, latency_s=0.01)
    banned_a, claimed_a = a.canary.sync(thresholds)
    assert claimed_a == [] and banned_a == {}  # b's outcomes are not flushed yet: 6 requests globally
    banned_b, claimed_b = b.canary.sync(thresholds)
    assert [(k, v) for k, v, _ in claimed_b] == [("ranker", 3)] and "error rate 50.0% (6/12" in claimed_b[0][2]
    banned_a, claimed_a = a.canary.sync(thresholds)
    assert claimed_a == [] and set(banned_a) == {("ranker", 3)}  # decided once; a obeys it
    assert a.canary.stats(30)["ranker:3"]["requests"] == 12
    # A healthy canary on the same board is left alone.
    for _ in range(20):
        a.canary.observe("retrieval", 4, ok=True, latency_s=0.005)
    assert a.canary.sync(thresholds)[1] == []


def test_an_impression_stores_what_its_request_was_served_with_whichever_replica_takes_it(redis_factory) -> None:
    server = redis_factory()
    a, b = _plane(server.url), _plane(server.url)
    a.events.append([_event("click", 7, 4), _event("click", 7, 5)])
    shown, clicked = _LOOP.run_until_complete(a.users.get(7, "req-9", 2))  # the read logs what it served
    assert clicked == ("4", "5")
    b.events.append([_event("impression", 7, 1, request="req-9"), _event("click", 7, 1, request="req-9"),
                     _event("impression", 7, 2, request="unknown")])
    entries = [fields for _, fields in server.client().xrange("t:events")][2:]
    assert json.loads(entries[0]["served"]) == {"history": ["4", "5"]}
    assert "served" not in entries[1] and "served" not in entries[2]  # a click, and an unrecorded request
    assert (entries[0]["user"], entries[0]["item"], entries[0]["kind"]) == ("7", "1", "impression")


def test_concurrent_reads_share_one_script_call_and_each_gets_its_own_user_and_served_record(redis_factory) -> None:
    server = redis_factory()
    a = _plane(server.url, per_user=50)
    a.events.append([_event("click", u, 100 + u * 10 + i) for u in range(20) for i in range(u % 4)])
    calls: list[int] = []
    script = a.read_script

    async def counted(keys, args):
        calls.append(int(args[2]))
        return await script(keys=keys, args=args)

    a.read_script = counted

    async def burst():
        return await asyncio.gather(*(a.users.get(u, f"q{u}", 2) for u in range(20)))

    results = _LOOP.run_until_complete(burst())
    assert sum(calls) == 20 and len(calls) < 20  # coalesced: the burst took fewer calls than requests
    for u, (shown, clicked) in enumerate(results):
        expected = tuple(str(100 + u * 10 + i) for i in range(u % 4))
        assert shown == expected and clicked == expected  # never a neighbour's lists
        assert json.loads(server.client().get(f"t:served:q{u}")) == {"history": list(expected[-2:])}
    assert _history(a, 99) == ((), ())  # an unknown user: both lists empty (cjson's {} read as empty)

    a.read_script = _failing

    async def failing_burst():
        return await asyncio.gather(*(a.users.get(u) for u in range(5)), return_exceptions=True)

    failures = _LOOP.run_until_complete(failing_burst())
    assert all(isinstance(f, redis.ConnectionError) for f in failures)  # every waiter hears the failure
    assert a.metrics.redis_errors.labels("user_state")._value.get() == 5
    a.read_script = script
    assert _history(a, 1) == (("110",), ("110",))  # and the next read works again


async def _failing(keys, args):
    raise redis.ConnectionError("Redis went away")


def _seeder(server, log_until: float, cap: int = 3) -> UserStateSeeder:
    return UserStateSeeder(server.client(), "t", cap=cap, ttl_s=0, log_until=log_until, since="0-0")


def test_seeding_replaces_users_lists_and_keeps_the_events_the_log_does_not_hold(redis_factory) -> None:
    server = redis_factory()
    plane = _plane(server.url, per_user=3)
    at = 1_700_000_000.0
    # Already in the log (timed up to log_until) -> replaced; timed after it -> kept on top, in stream order.
    plane.events.append([encode_event("click", "r", 7, 90, 0, at - 5, None, None, None, None),
                         encode_event("click", "r", 7, 91, 0, at + 5, None, None, None, None),
                         encode_event("impression", "r", 8, 92, 0, at + 6, None, None, None, None)])
    seeder = _seeder(server, at)
    seeder.read_stream()  # what the seeder read before the batch
    seeder.read_stream = lambda: None  # an event that arrives after the last read: left to the script's own tail
    plane.events.append([encode_event("click", "r", 7, 93, 0, at + 7, None, None, None, None)])
    seeder.seed(["7", "9"], [["1", "2"], ["3"]], [["2"], []])
    assert _history(plane, 7) == (("2", "91", "93"), ("2", "91", "93"))  # capped at 3, oldest first
    assert _history(plane, 9) == (("3",), ())
    assert _history(plane, 8) == (("92",), ())  # not in the log: left to the server's own appends
    assert seeder.later_events == 2  # 91 and 92 read here; 93 added inside the script
    plane.events.append([encode_event("click", "r", 9, 94, 0, at + 8, None, None, None, None)])
    assert _history(plane, 9) == (("3", "94"), ("94",))


def test_latest_histories_are_build_histories_one_second_after_the_log() -> None:
    rng = np.random.default_rng(0)
    users, times = rng.integers(0, 30, 500), rng.integers(0, 100, 500)
    items, labels = rng.integers(0, 50, 500), rng.integers(0, 2, 500).astype(np.float32)
    who, values, offsets = latest_histories(users, times, items, labels, 4)
    for r, user in enumerate(who):
        mine = np.flatnonzero((users == user) & (labels > 0))
        order = mine[np.lexsort((mine, times[mine]))]
        assert values[offsets[r]:offsets[r + 1]].tolist() == items[order][-4:].tolist()
