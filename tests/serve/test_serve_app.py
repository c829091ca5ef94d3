"""The HTTP layer in-process (no models needed): readiness, admin switched off without a token, events
accepted before the models load, and the body limit on streamed uploads. What a client without the admin
token learns (readiness, docs, metrics) is in test_serve_exposure.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from recforge.serve.app import create_app
from recforge.serve.events import EventStore, EventStoreFull, encode_event
from recforge.serve.settings import ServeSettings


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    (tmp_path / "registry").mkdir()
    settings = ServeSettings.load({"registry": str(tmp_path / "registry"), "events_dir": str(tmp_path / "events"),
                                   "poll_interval_s": 0, "max_body_bytes": 4096, "metrics": "public"}, environ={})
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


def _event(**fields: object) -> dict[str, object]:
    return {"type": "impression", "request_id": "r", "user_id": "u", "item_id": 3, "position": 1, **fields}


def test_event_times_are_bounded_by_the_server_clock(client: TestClient, tmp_path: Path) -> None:
    now = time.time()
    r = client.post("/v1/events", json={"events": [_event(timestamp=now), _event(timestamp=4_102_444_800)]})
    assert r.status_code == 422 and r.json()["message"].startswith("body.events.1.timestamp: must not be more than")
    r = client.post("/v1/events", json={"events": [_event(timestamp=now - 400 * 86_400)]})
    assert r.status_code == 422 and "event_max_age_s" in r.json()["message"]
    assert EventStore(tmp_path / "events").count() == 0  # a batch with one bad time is refused whole
    r = client.post("/v1/events", json={"events": [_event(timestamp=now + 3600), _event(timestamp=now - 86_400)]})
    assert r.status_code == 200 and r.json()["accepted"] == 2


def test_a_full_event_store_is_503_counted_not_ready_and_recovers(client: TestClient) -> None:
    store = client.app.state.service.online.sink
    store._db.execute(f"PRAGMA max_page_count={store._db.execute('PRAGMA page_count').fetchone()[0] + 8}")
    pad = {f"pad{n}": "x" * 250 for n in range(12)}
    with pytest.raises(EventStoreFull):  # the disk fills up
        for _ in range(100):
            store.append([encode_event("click", "r", "u", 3, 0, time.time(), pad, None, None, None)])
    stored = store.count()
    batch = {"events": [_event(context=pad)]}
    for _ in range(2):
        r = client.post("/v1/events", json=batch)
        assert r.status_code == 503 and "disk full" in r.json()["detail"] and r.headers["retry-after"]
    assert 'recforge_event_write_failures_total 2.0' in client.get("/metrics").text
    r = client.get("/readyz")
    assert r.status_code == 503 and "event store" in r.json()["detail"]
    store._db.execute("PRAGMA max_page_count=1073741823")  # space freed
    assert "event store" not in client.get("/readyz").json()["detail"]  # not ready only for want of models now
    r = client.post("/v1/events", json=batch)
    assert r.status_code == 200 and r.json()["accepted"] == 1 and store.count() == stored + 1


@pytest.mark.parametrize("raw", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b'"\\ud800"'])
@pytest.mark.parametrize(("route", "template", "field"), [
    ("/v1/recommend", b'{"user_id": 1, "k": %s}', "body.k"),
    ("/v1/score", b'{"user_id": 1, "item_ids": [%s]}', "body.item_ids.0"),
    ("/v1/events", b'{"events": [{"type": "impression", "request_id": "r", "user_id": "u", "item_id": %s, '
                   b'"position": 1}]}', "body.events.0.item_id"),
    ("/v1/events", b'{"events": [{"type": "impression", "request_id": "r", "user_id": "u", "item_id": 3, '
                   b'"position": 1, "timestamp": %s}]}', "body.events.0.timestamp"),
])
def test_unencodable_values_in_a_body_are_422_naming_the_field(client: TestClient, route: str, template: bytes,
                                                               field: str, raw: bytes) -> None:
    r = client.post(route, content=template % raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["message"].startswith(field), r.json()["message"]
    assert "input" not in r.json()["detail"][0]
