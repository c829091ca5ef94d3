"""Two real `recforge serve` replicas on one real Redis (`--state redis://...`): one event stream, one user
state and one canary decision for both, through kill -9 of a replica and of Redis itself."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from _cli import run
from _redis import RedisServer
from _serve_world import TOKEN, Server, World, serve_world, start_server

from recforge import registry as reg

pytestmark = pytest.mark.slow


@dataclass
class Replicas:
    world: World
    base: Path
    registry: Path
    redis: RedisServer
    a: Server
    b: Server

    def stream_event_ids(self) -> list[str]:
        entries = self.redis.client().xrange("rf:events")
        return [json.loads(fields["event"])["event_id"] for _, fields in entries]


def _replica(base: Path, registry: Path, redis: RedisServer, name: str) -> Server:
    return start_server(registry, base / f"events-{name}", base / f"{name}.log", "--state", redis.url,
                        "--poll-interval-s", "0", "--canary-share", "1.0", "--set", "redis_prefix=rf",
                        "--set", "canary_min_requests=10", "--set", "canary_window_s=60")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    world = serve_world(tmp_path_factory)
    base = tmp_path_factory.mktemp("serve-redis")
    redis = RedisServer(base / "redis")
    redis.start()
    registry = world.registry_copy(base / "registry")
    a = _replica(base, registry, redis, "a")
    b = _replica(base, registry, redis, "b")
    yield Replicas(world, base, registry, redis, a, b)
    for server in (a, b):
        server.stop()
    redis.stop()


def _impressions(user: int, items: list[int], prefix: str) -> dict[str, object]:
    return {"events": [{"type": "impression", "request_id": f"{prefix}-req", "user_id": user, "item_id": item,
                        "position": i, "event_id": f"{prefix}-{i}"} for i, item in enumerate(items)]}


def test_events_posted_to_one_replica_change_the_other_replicas_next_answer(replicas: Replicas) -> None:
    user = replicas.world.known_users[5]
    with replicas.a.client() as a, replicas.b.client() as b:
        first = b.post("/v1/recommend", json={"user_id": user, "k": 8, "exclude_seen": True}).json()
        shown = [item["item_id"] for item in first["items"]]
        assert len(shown) == 8 and first["degraded"] is False
        r = a.post("/v1/events", json=_impressions(user, shown, "seen"))
        assert r.status_code == 200 and r.json() == {"accepted": 8, "stored_total": 8}, r.text
        # The very next request, on the other replica, no longer shows what the user was shown on this one.
        after = b.post("/v1/recommend", json={"user_id": user, "k": 8, "exclude_seen": True}).json()
        assert not set(shown) & {item["item_id"] for item in after["items"]}, (shown, after["items"])
        again = a.post("/v1/recommend", json={"user_id": user, "k": 8, "exclude_seen": True}).json()
        assert {i["item_id"] for i in again["items"]} == {i["item_id"] for i in after["items"]}
        # The same batch retried on the other replica (a client timeout) is stored once.
        retry = b.post("/v1/events", json=_impressions(user, shown, "seen"))
        assert retry.status_code == 200 and retry.json()["stored_total"] == 8, retry.text


def test_a_canary_breach_seen_across_two_replicas_is_rolled_back_once_and_both_stop_routing_to_it(
        replicas: Replicas) -> None:
    version = reg.publish(replicas.registry, replicas.world.bundles / "failing", "ranker", note="raises on known users")
    reg.promote(replicas.registry, "ranker", version, alias="canary", reason="try the new ranker")
    servers = (replicas.a, replicas.b)
    for server in servers:
        with server.client(TOKEN) as admin:
            assert admin.post("/admin/reload").json()["models"]["ranker"]["canary"] == version
    # 6 requests per replica: under canary_min_requests=10 for either alone, a breach on the global window.
    users = replicas.world.known_users[:12]
    for i, user in enumerate(users):
        with servers[i % 2].client() as client:
            r = client.post("/v1/recommend", json={"user_id": user, "k": 5})
            assert r.status_code == 200 and r.json()["model_versions"]["ranker"] == 1, r.text
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not [h for h in reg.history(replicas.registry, "ranker")
                                               if h["action"] == "rollback"]:
        time.sleep(0.1)
    time.sleep(1.5)  # three canary syncs more: a second claim would have landed by now
    rollbacks = [h for h in reg.history(replicas.registry, "ranker") if h["action"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["from"] == version, rollbacks
    counted = re.search(r"\((\d+)/(\d+) requests", rollbacks[0]["reason"])
    assert "error rate" in rollbacks[0]["reason"] and counted is not None, rollbacks[0]
    assert int(counted.group(2)) > 6, rollbacks[0]  # more requests than either replica served: the global window
    for server in servers:  # the replica that did not roll back (and polls no registry) obeys the shared ban
        with server.client() as client:
            r = client.post("/v1/recommend", json={"user_id": users[0], "k": 3}).json()
            assert r["canary"] is False and r["model_versions"]["ranker"] == 1, r
    metrics = [s.client(TOKEN).get("/metrics").text for s in servers]
    assert sum('recforge_canary_rollbacks_total{kind="ranker"} 1.0' in m for m in metrics) == 1


def test_kill9_of_a_replica_mid_stream_loses_no_acknowledged_event(replicas: Replicas) -> None:
    victim = _replica(replicas.base, replicas.registry, replicas.redis, "victim")
    user, items = replicas.world.known_users[7], replicas.world.items
    acknowledged: list[str] = []
    stop = threading.Event()

    def post() -> None:
        with httpx.Client(base_url=victim.url, timeout=5.0) as client:
            for batch in range(10_000):
                if stop.is_set():
                    return
                body = {"events": [{"type": "click", "request_id": f"k{batch}", "user_id": user,
                                    "item_id": items[(batch + i) % len(items)], "position": i,
                                    "event_id": f"kill-{batch}-{i}"} for i in range(10)]}
                try:
                    r = client.post("/v1/events", json=body)
                except httpx.HTTPError:
                    return  # the server died with this batch in flight: not acknowledged
                if r.status_code == 200:
                    acknowledged.extend(e["event_id"] for e in body["events"])

    thread = threading.Thread(target=post)
    thread.start()
    deadline = time.monotonic() + 20
    while len(acknowledged) < 300 and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.kill9()
    stop.set()
    thread.join(10)
    assert len(acknowledged) >= 300
    stored = [e for e in replicas.stream_event_ids() if e and e.startswith("kill-")]
    assert len(stored) == len(set(stored))  # exactly once
    assert set(acknowledged) <= set(stored), len(set(acknowledged) - set(stored))
    # ... and the real ingest takes them into the lake exactly once.
    lake = replicas.base / "lake"
    run("events", "ingest", "--state", replicas.redis.url, "--prefix", "rf", "--lake", str(lake), cwd=replicas.base)
    in_lake = [e for path in lake.rglob("part-*.parquet") for e in pq.read_table(path).column("event_id").to_pylist()
               if e and e.startswith("kill-")]
    assert sorted(in_lake) == sorted(stored)


def test_redis_down_degrades_answers_refuses_events_and_after_kill9_restart_nothing_acknowledged_is_lost(
        replicas: Replicas) -> None:
    user = replicas.world.known_users[9]
    with replicas.b.client() as b, replicas.b.client(TOKEN) as admin:
        r = b.post("/v1/events", json=_impressions(user, replicas.world.items[:5], "pre-crash"))
        assert r.status_code == 200, r.text
        replicas.redis.kill()
        ready = admin.get("/readyz")
        assert ready.status_code == 503 and "event store" in ready.json()["detail"], ready.text
        answer = b.post("/v1/recommend", json={"user_id": user, "k": 5})
        assert answer.status_code == 200 and answer.json()["degraded"] is True and len(answer.json()["items"]) == 5
        refused = b.post("/v1/events", json=_impressions(user, replicas.world.items[5:7], "during"))
        assert refused.status_code == 503 and "Redis" in refused.json()["detail"], refused.text
        replicas.redis.start()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and admin.get("/readyz").status_code != 200:
            time.sleep(0.2)
        assert admin.get("/readyz").status_code == 200
        assert b.post("/v1/recommend", json={"user_id": user, "k": 5}).json()["degraded"] is False
        assert 'recforge_degraded_total 1.0' in admin.get("/metrics").text
    ids = set(replicas.stream_event_ids())
    assert {f"pre-crash-{i}" for i in range(5)} <= ids and not {f"during-{i}" for i in range(2)} & ids
