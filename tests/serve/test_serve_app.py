"""The HTTP layer in-process (no models needed): readiness, admin switched off without a token, events
accepted before the models load, and the body limit on streamed uploads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from recforge.serve.app import create_app
from recforge.serve.events import EventStore
from recforge.serve.settings import ServeSettings


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    (tmp_path / "registry").mkdir()
    settings = ServeSettings.load({"registry": str(tmp_path / "registry"), "events_dir": str(tmp_path / "events"),
                                   "poll_interval_s": 0, "max_body_bytes": 4096}, environ={})
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_alive_but_not_ready_without_models(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 503
    r = client.post("/v1/recommend", json={"user_id": 1})
    assert r.status_code == 503


def test_events_are_stored_even_before_models_load(client: TestClient, tmp_path: Path) -> None:
    event = {"type": "impression", "request_id": "r", "user_id": "u", "item_id": 3, "position": 1}
    r = client.post("/v1/events", json={"events": [event, {**event, "type": "click"}]})
    assert r.status_code == 200 and r.json() == {"accepted": 2, "stored_total": 2}
    assert EventStore(tmp_path / "events").count() == 2


def test_admin_routes_are_disabled_without_a_configured_token(client: TestClient) -> None:
    r = client.post("/admin/reload", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 403 and "RECFORGE_ADMIN_TOKEN" in r.json()["detail"]


def test_streamed_body_over_the_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"events": ['
        for _ in range(100):
            yield b" " * 100
        yield b"]}"

    r = client.post("/v1/events", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
    small = client.post("/v1/events", content=iter([b'{"events": []}']), headers={"content-type": "application/json"})
    assert small.status_code == 422 and small.json()["message"].startswith("body.events")
