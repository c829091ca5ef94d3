"""Workers of one server publish their state to each other (serve/workers.py): a worker started while another
serves loads its models before it takes connections, and /readyz is ready only when every worker that takes
connections has its models. Workers are stood in for by `sleep` children of this test process, so they are
siblings of the app's (fake) worker pid and can be killed like a real one."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from recforge.serve.app import create_app
from recforge.serve.service import Service
from recforge.serve.settings import ServeSettings
from recforge.serve.workers import WorkerBoard

TOKEN = "board-token"
VERSIONS = {"retrieval": {"production": 1, "canary": None}, "ranker": {"production": 1, "canary": None}}


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def _board(root: Path, proc: subprocess.Popen[bytes]) -> WorkerBoard:
    return WorkerBoard(root, pid=proc.pid, parent=os.getpid())


def test_dead_and_foreign_workers_do_not_count(tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
    me, peer = (_board(tmp_path, p) for p in children)
    peer.publish(accepting=True, models=None)
    WorkerBoard(tmp_path, pid=1, parent=os.getpid()).publish(accepting=True, models=None)  # not our sibling
    assert me.others_accepting() == [peer.pid]
    assert not (tmp_path / "1.json").exists()  # the foreign file was removed
    children[1].kill()
    children[1].wait()
    assert me.others_accepting() == [] and not (tmp_path / f"{peer.pid}.json").exists()


class _Loading:
    """Stands in for model loading: the first `failures` calls fail, the next one loads after `seconds`."""

    def __init__(self, service: Service, seconds: float = 0.0, failures: int = 0) -> None:
        self.service, self.seconds, self.failures, self.calls = service, seconds, failures, 0

    def __call__(self, *_: object) -> bool:
        self.calls += 1
        if self.calls <= self.failures:
            raise ValueError("registry unreachable")
        time.sleep(self.seconds)
        changed = self.service.loader.snapshot is None
        self.service.loader.snapshot = SimpleNamespace(versions=lambda: VERSIONS)  # type: ignore[assignment]
        return changed


def _app(tmp_path: Path, board: WorkerBoard, **loading: float) -> tuple[TestClient, _Loading]:
    (tmp_path / "registry").mkdir(exist_ok=True)
    settings = ServeSettings.load({"registry": str(tmp_path / "registry"), "events_dir": str(tmp_path / "events"),
                                   "poll_interval_s": 30}, environ={"RECFORGE_ADMIN_TOKEN": TOKEN})
    service = Service(settings)
    fake = _Loading(service, **loading)  # type: ignore[arg-type]
    service.loader.reload = fake  # type: ignore[method-assign]
    return TestClient(create_app(settings, service, board)), fake


def test_a_worker_joining_serving_workers_loads_before_it_takes_connections(
        tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
    states = tmp_path / "workers"
    states.mkdir()
    me, peer = (_board(states, p) for p in children)
    peer.publish(accepting=True, models=VERSIONS)
    client, fake = _app(tmp_path, me, seconds=0.3, failures=1)
    with client:  # returns once lifespan startup is over: when uvicorn would start accepting
        # The failed attempt and the one that loaded happened before startup ended (the poll may add one).
        assert client.app.state.service.loader.snapshot is not None and fake.calls >= 2
        assert {s.pid: s.accepting for s in me.states()} == {me.pid: True, peer.pid: True}
        assert client.get("/readyz").json() == {"status": "ready"}


def test_with_no_worker_serving_a_worker_accepts_at_once_and_is_not_ready(
        tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
    states = tmp_path / "workers"
    states.mkdir()
    client, fake = _app(tmp_path, _board(states, children[0]), failures=1000)
    with client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503


def test_readyz_speaks_for_every_worker_that_takes_connections(
        tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
    states = tmp_path / "workers"
    states.mkdir()
    me, peer = (_board(states, p) for p in children)
    client, _ = _app(tmp_path, me)
    admin = {"Authorization": f"Bearer {TOKEN}"}
    with client:
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        peer.publish(accepting=True, models=None)  # a worker that accepts but has no models yet
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json() == {"detail": "not ready: models not loaded in every worker"}
        assert f"worker(s) {peer.pid} take connections" in client.get("/readyz", headers=admin).json()["detail"]
        peer.publish(accepting=False, models=None)  # loading before it accepts: no request can reach it
        assert client.get("/readyz").status_code == 200
        peer.publish(accepting=True, models=VERSIONS)
        detail = client.get("/readyz", headers=admin).json()
        assert detail["workers_expected"] == 1 and [w["pid"] for w in detail["workers"]] == sorted([me.pid, peer.pid])
        peer.publish(accepting=True, models=None)
        children[1].kill()  # a dead worker's file is stale: it no longer counts
        children[1].wait()
        r = client.get("/readyz", headers=admin)
        assert r.status_code == 200 and [w["pid"] for w in r.json()["workers"]] == [me.pid]
