"""`recforge serve --workers 2`: two processes on one port that share the events store and the experiments file.

Every request here opens a fresh connection, so requests land on either worker; what one worker accepted (events,
an experiments change) must hold whichever worker answers next.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _serve_world import TOKEN, Server, World, serve_world, start_server

pytestmark = pytest.mark.slow

EXPERIMENTS = {"experiments": [{"name": "exp", "salt": "workers-salt", "variants": [
    {"name": "a", "weight": 1}, {"name": "b", "weight": 1}]}]}
POLL_S = 0.5


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return serve_world(tmp_path_factory)


@pytest.fixture(scope="module")
def server(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("serve-workers")
    (base / "experiments.json").write_text(json.dumps(EXPERIMENTS))
    srv = start_server(world.registry_copy(base / "registry"), base / "events", base / "server.log", "--workers", "2",
                       "--experiments", str(base / "experiments.json"), "--poll-interval-s", str(POLL_S))
    yield srv
    srv.stop()


def _fresh(server: Server, method: str, path: str, **kwargs: object) -> httpx.Response:
    """One request on a new connection (the kernel hands each new connection to whichever worker accepts it)."""
    with httpx.Client(base_url=server.url, timeout=30.0, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        return client.request(method, path, **kwargs)  # type: ignore[arg-type]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _wait_ready(server: Server) -> None:
    """Both workers load the models; /readyz answers from whichever accepts, so ask until several say ready."""
    deadline = time.monotonic() + 60
    ready = 0
    while ready < 6 and time.monotonic() < deadline:
        ready = ready + 1 if _fresh(server, "GET", "/readyz").status_code == 200 else 0
        time.sleep(0.05)
    assert ready >= 6, server.output()


def _workers(server: Server) -> list[int]:
    found = []
    for pid in _children(server.proc.pid):
        try:
            if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text():
                found.append(pid)
        except OSError:
            continue  # exited meanwhile
    return sorted(found)


def test_two_worker_processes_serve_one_port(server: Server) -> None:
    _wait_ready(server)
    workers = _workers(server)
    assert len(workers) == 2, server.output()


def test_events_from_any_worker_land_in_one_store_and_in_every_workers_memory(server: Server, world: World) -> None:
    _wait_ready(server)
    user = world.known_users[2]
    first = [i["item_id"] for i in _fresh(server, "POST", "/v1/recommend", json={"user_id": user, "k": 6}).json()[
        "items"]]
    totals = []
    for position, item in enumerate(first):  # one event per connection: both workers store some of them
        r = _fresh(server, "POST", "/v1/events", json={"events": [
            {"type": "impression", "request_id": "w-1", "user_id": user, "item_id": item, "position": position}]})
        assert r.status_code == 200, r.text
        totals.append(r.json()["stored_total"])
    # stored_total counts every worker's events: it grows by one per accepted event, whoever took it.
    assert sorted(totals) == list(range(totals[0], totals[0] + len(first)))
    time.sleep(0.6)  # workers read each other's events every 0.2 s
    for _ in range(8):
        after = [i["item_id"] for i in _fresh(server, "POST", "/v1/recommend", json={"user_id": user, "k": 6}).json()[
            "items"]]
        assert not set(after) & set(first)


def test_an_experiments_change_through_one_worker_reaches_all(server: Server) -> None:
    _wait_ready(server)
    changed = {"experiments": [{"name": "exp2", "salt": "s2", "variants": [{"name": "only", "weight": 1}]}]}
    r = _fresh(server, "PUT", "/admin/experiments", json=changed)
    assert r.status_code == 200, r.text
    time.sleep(POLL_S * 3)
    for _ in range(8):
        body = _fresh(server, "POST", "/v1/recommend", json={"user_id": 1, "k": 2}).json()
        assert body["assignments"] == {"exp2": "only"}, body


def test_a_killed_worker_is_replaced_without_any_request_answered_503(server: Server, world: World) -> None:
    """Last here: it kills a worker. Two clients keep sending requests, each on a new connection, while one worker
    is SIGKILLed and restarted by the supervisor. The replacement loads its models before it takes connections, so
    no request is answered 503; only a request the killed worker held may fail on its connection (one per client)."""
    _wait_ready(server)
    before = _workers(server)
    assert len(before) == 2, server.output()
    statuses: Counter[int] = Counter()
    failed: list[str] = []
    lost: list[str] = []
    stop = threading.Event()

    def send(user: int) -> None:
        for _ in range(5000):  # bounded; stopped long before
            if stop.is_set():
                return
            try:
                r = _fresh(server, "POST", "/v1/recommend", json={"user_id": user, "k": 3})
            except httpx.TransportError as exc:
                lost.append(repr(exc))
                continue
            statuses[r.status_code] += 1
            if r.status_code != 200:
                failed.append(f"{r.status_code} {r.text[:200]}")

    clients = [threading.Thread(target=send, args=(u,), daemon=True) for u in world.known_users[:6]]
    for thread in clients:
        thread.start()
    try:
        time.sleep(0.5)
        os.kill(before[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        replaced: dict[str, object] = {}
        while time.monotonic() < deadline and not replaced:
            time.sleep(0.2)
            detail = _fresh(server, "GET", "/readyz").json()  # the admin detail: every worker's state
            new = [w for w in detail.get("workers") or [] if w["pid"] not in before]
            if new and new[0]["accepting"] and len(detail["workers"]) == 2:
                replaced = new[0]
        assert replaced, server.output()
        assert replaced["models"], replaced  # it accepted only with its models loaded
        time.sleep(1.5)  # the replacement takes its share of the traffic
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=60)
    assert not failed, (failed[:5], server.output()[-3000:])
    assert statuses[200] > 20 and len(lost) <= len(clients), (statuses, lost)
