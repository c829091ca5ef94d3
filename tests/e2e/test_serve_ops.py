"""`recforge serve` operations end to end: hot reload under load, memory over reloads, canary auto-rollback
recorded in the registry, and accepted events surviving kill -9 (with sticky A/B assignment across restarts)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _serve_world import TOKEN, Server, World, serve_world, start_server

from recforge import registry as reg
from recforge.serve.events import EventStore

pytestmark = pytest.mark.slow

EXPERIMENTS = {"experiments": [{"name": "exp", "salt": "ops-salt", "variants": [
    {"name": "control", "weight": 1}, {"name": "treatment", "weight": 1}]}]}


class Ops:
    """The server under test plus what is needed to restart it on the same registry and event store."""

    def __init__(self, world: World, base: Path) -> None:
        self.world = world
        self.base = base
        self.registry = world.registry_copy(base / "registry")
        self.events = base / "events"
        (base / "experiments.json").write_text(json.dumps(EXPERIMENTS))
        self.server = self.start()

    def start(self) -> Server:
        return start_server(self.registry, self.events, self.base / "server.log", "--experiments",
                            str(self.base / "experiments.json"), "--poll-interval-s", "0", "--canary-share", "1.0",
                            "--set", "canary_min_requests=5", "--set", "canary_window_s=60")

    def admin(self) -> httpx.Client:
        return self.server.client(TOKEN)


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    world = serve_world(tmp_path_factory)
    state = Ops(world, tmp_path_factory.mktemp("serve-ops"))
    for model, bundle in (("retrieval", "tt"), ("ranker", "dnn")):
        assert reg.publish(state.registry, world.bundles / bundle, model, note="same weights, new version") == 2
    yield state
    state.server.stop()


def _promote(ops: Ops, version: int) -> None:
    for model in ("retrieval", "ranker"):
        reg.promote(ops.registry, model, version, reason=f"test moves production to {version}")


def test_reload_under_concurrent_load_fails_no_request(ops: Ops) -> None:
    users = ops.world.known_users[:20]
    stop = threading.Event()
    failures: list[str] = []
    versions: set[tuple[int, int]] = set()
    counts = [0]

    def hammer(offset: int) -> None:
        with ops.server.client() as client:
            i = offset
            while not stop.is_set():
                i += 1
                try:
                    r = client.post("/v1/recommend", json={"user_id": users[i % len(users)], "k": 5})
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if r.status_code != 200 or len(r.json()["items"]) != 5:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                else:
                    v = r.json()["model_versions"]
                    versions.add((v["retrieval"], v["ranker"]))
                counts[0] += 1

    threads = [threading.Thread(target=hammer, args=(k * 5,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        with ops.admin() as admin:
            for version in (2, 1, 2, 1):
                time.sleep(0.3)
                _promote(ops, version)
                r = admin.post("/admin/reload")
                assert r.status_code == 200 and r.json()["changed"] is True, r.text
                assert r.json()["models"]["ranker"]["production"] == version
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not failures, failures[:5]
    assert counts[0] > 20 and {(1, 1), (2, 2)} <= versions


def test_memory_stays_bounded_over_repeated_reloads(ops: Ops) -> None:
    with ops.admin() as admin:
        rss = {}
        for n in range(1, 21):
            _promote(ops, 2 if n % 2 else 1)
            assert admin.post("/admin/reload").json()["changed"] is True
            rss[n] = ops.server.rss_kib()
    _promote(ops, 1)
    with ops.admin() as admin:
        admin.post("/admin/reload")
    grown_mib = (rss[20] - rss[2]) / 1024
    assert grown_mib < 24, f"RSS grew {grown_mib:.1f} MiB from reload 2 to reload 20: {rss}"


def _aliases(ops: Ops) -> dict[str, int]:
    return {alias: v.number for v in reg.list_versions(ops.registry, "ranker") for alias in v.aliases}


def test_failing_canary_is_rolled_back_and_the_registry_records_why(ops: Ops) -> None:
    version = reg.publish(ops.registry, ops.world.bundles / "failing", "ranker", note="raises on known users")
    reg.promote(ops.registry, "ranker", version, alias="canary", reason="try the new ranker")
    with ops.admin() as admin:
        assert admin.post("/admin/reload").json()["models"]["ranker"]["canary"] == version
    with ops.server.client() as client:
        for user in ops.world.known_users[:12]:
            r = client.post("/v1/recommend", json={"user_id": user, "k": 5})
            # Users routed to the broken canary are answered by production, never with an error.
            assert r.status_code == 200 and len(r.json()["items"]) == 5, r.text
            assert r.json()["model_versions"]["ranker"] == 1
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "canary" in _aliases(ops):
            time.sleep(0.1)
        last = reg.history(ops.registry, "ranker")[-1]
        # The canary had no earlier version: the rollback withdraws it.
        assert last["alias"] == "canary" and last["from"] == version and last["to"] is None, last
        assert last["action"] == "rollback" and "canary" not in _aliases(ops)
        assert "automatic canary rollback" in last["reason"] and "error rate" in last["reason"], last["reason"]
    with ops.admin() as admin:  # the versions in /readyz and /metrics are for the admin token's bearers
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and admin.get("/readyz").json()["models"]["ranker"]["canary"] is not None:
            time.sleep(0.1)
        assert admin.get("/readyz").json()["models"]["ranker"]["canary"] is None
        assert 'recforge_canary_rollbacks_total{kind="ranker"} 1.0' in admin.get("/metrics").text
    with ops.server.client() as client:
        # Routing no longer reaches the canary.
        r = client.post("/v1/recommend", json={"user_id": ops.world.known_users[0], "k": 3}).json()
        assert r["canary"] is False and r["model_versions"]["ranker"] == 1


def test_accepted_events_survive_kill_9_and_assignments_survive_restart(ops: Ops) -> None:
    users = [f"sticky-{i}" for i in range(50)]
    with ops.server.client() as client:
        before = {u: client.post("/v1/score", json={"user_id": u, "item_ids": []}).json()["assignments"] for u in users}
    accepted = [0]
    errors: list[str] = []
    stop = threading.Event()
    user, item = ops.world.known_users[3], ops.world.items[0]

    def post_forever() -> None:
        with ops.server.client() as client:
            n = 0
            while not stop.is_set():
                n += 1
                batch = [{"type": "impression", "request_id": f"k9-{n}", "user_id": user, "item_id": item,
                          "position": p} for p in range(10)]
                try:
                    r = client.post("/v1/events", json={"events": batch})
                except httpx.HTTPError:
                    return  # the server died mid-request: that batch was never acknowledged
                if r.status_code == 200:
                    accepted[0] += r.json()["accepted"]
                else:
                    errors.append(r.text)

    stored_before = EventStore(ops.events).count()
    thread = threading.Thread(target=post_forever)
    thread.start()
    time.sleep(1.5)
    ops.server.kill9()
    stop.set()
    thread.join(timeout=30)
    assert not errors and accepted[0] >= 50
    stored = EventStore(ops.events).count()
    # Every acknowledged event is on disk; at most the one batch in flight was stored unacknowledged.
    assert accepted[0] <= stored - stored_before <= accepted[0] + 10
    ops.server = ops.start()
    with ops.server.client() as client:
        after = {u: client.post("/v1/score", json={"user_id": u, "item_ids": []}).json()["assignments"] for u in users}
        assert after == before
        r = client.post("/v1/events", json={"events": [{"type": "click", "request_id": "after", "user_id": user,
                                                        "item_id": item, "position": 0}]})
        assert r.json()["stored_total"] == stored + 1
        # The per-user memory is rebuilt from the store: the impressed item stays excluded after the restart.
        rec = client.post("/v1/recommend", json={"user_id": user, "k": 20}).json()
        assert item not in [i["item_id"] for i in rec["items"]]
