"""What a client without the admin token learns: /readyz says ready or not and nothing more (no registry
paths, checksums or versions), and /openapi.json, /docs, /redoc and /metrics follow their off|admin|public
settings (404 / 401 without the token / 200)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from recforge.serve.app import create_app
from recforge.serve.routes.deps import MODELS_NOT_LOADED
from recforge.serve.service import Service
from recforge.serve.settings import ServeSettings

TOKEN = "exposure-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
VERSIONS = {"retrieval": {"production": 4, "canary": None}, "ranker": {"production": 7, "canary": 8}}


def _settings(tmp_path: Path, token: str | None = TOKEN, **values: Any) -> ServeSettings:
    (tmp_path / "registry").mkdir(exist_ok=True)
    env = {"RECFORGE_ADMIN_TOKEN": token} if token else {}
    return ServeSettings.load({"registry": str(tmp_path / "registry"), "events_dir": str(tmp_path / "events"),
                               "poll_interval_s": 0, **values}, environ=env)


@pytest.fixture
def broken(tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    """A server whose models fail to load with a reason that names a registry path and a checksum."""
    settings = _settings(tmp_path)
    reason = f"{tmp_path}/registry/ranker/7/model.pt: sha256 {'ab' * 32} does not match the manifest"
    service = Service(settings)

    def reload(*_: object) -> bool:
        raise ValueError(reason)

    service.loader.reload = reload  # type: ignore[method-assign]
    with TestClient(create_app(settings, service)) as client:
        deadline = time.monotonic() + 10
        while service.loader.last_error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        yield client, reason


def test_public_readyz_says_not_ready_without_paths_or_checksums(broken: tuple[TestClient, str],
                                                                caplog: pytest.LogCaptureFixture) -> None:
    client, reason = broken
    with caplog.at_level(logging.WARNING, logger="recforge.serve"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = client.get("/readyz", headers=headers)
            assert r.status_code == 503 and r.json() == {"detail": "not ready: models not loaded"}, r.text
            assert "registry" not in r.text and "sha256" not in r.text
    assert any(reason in record.getMessage() for record in caplog.records)  # the full reason is logged
    detailed = client.get("/readyz", headers=ADMIN)
    assert detailed.status_code == 503 and reason in detailed.json()["detail"]
    # The model routes say the same short thing to everyone.
    r = client.post("/v1/recommend", json={"user_id": 1})
    assert r.status_code == 503 and r.json() == {"detail": MODELS_NOT_LOADED}


def test_public_readyz_when_ready_shows_no_versions(broken: tuple[TestClient, str]) -> None:
    client, _ = broken
    client.app.state.service.loader.snapshot = SimpleNamespace(versions=lambda: VERSIONS)
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    r = client.get("/readyz", headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"status": "ready", "models": VERSIONS}


DESCRIBING = ("/openapi.json", "/docs", "/redoc")


@pytest.mark.parametrize(("level", "anonymous", "admin"), [("off", 404, 404), ("admin", 401, 200),
                                                            ("public", 200, 200)])
def test_docs_and_metrics_follow_their_setting(tmp_path: Path, level: str, anonymous: int, admin: int) -> None:
    client = TestClient(create_app(_settings(tmp_path, docs=level, metrics=level)))
    for path in (*DESCRIBING, "/metrics"):
        assert client.get(path).status_code == anonymous, path
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == anonymous, path
        assert client.get(path, headers=ADMIN).status_code == admin, path
    if admin == 200:
        schema = client.get("/openapi.json", headers=ADMIN).json()
        assert "/admin/reload" in schema["paths"] and "/v1/recommend" in schema["paths"]
        assert not {"/openapi.json", "/docs", "/redoc", "/metrics"} & set(schema["paths"])
        assert "/openapi.json" in client.get("/docs", headers=ADMIN).text
        assert "recforge_requests_total" in client.get("/metrics", headers=ADMIN).text


def test_settings_default_to_admin_and_admin_without_a_token_is_off(tmp_path: Path) -> None:
    settings = _settings(tmp_path, token=None)
    assert (settings.docs, settings.metrics) == ("admin", "admin")
    client = TestClient(create_app(settings))
    for path in (*DESCRIBING, "/metrics"):
        assert client.get(path, headers={"Authorization": "Bearer anything"}).status_code == 404, path
    env = {"RECFORGE_SERVE_DOCS": "public", "RECFORGE_SERVE_METRICS": "off"}
    loaded = ServeSettings.load({"registry": "r"}, environ=env)
    assert (loaded.docs, loaded.metrics) == ("public", "off")
    with pytest.raises(ValueError, match="metrics: Input should be 'off', 'admin' or 'public'"):
        ServeSettings.load({"registry": "r", "metrics": "open"}, environ={})
