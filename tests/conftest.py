"""Shared fixtures: a real S3-compatible server (SeaweedFS, see _seaweed.py) for the storage, registry
and resume tests; one per session, started on first use. Tests that kill a server start their own."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from _redis import RedisServer
from _seaweed import BUCKET, SeaweedServer


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """The session's S3 server; its endpoint and credentials are in os.environ (so subprocesses get them)."""
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    saved = {k: os.environ.get(k) for k in (*server.env, "RECFORGE_CACHE")}
    os.environ.update(server.env, RECFORGE_CACHE=str(tmp_path_factory.mktemp("recforge-cache")))
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def s3_prefix(s3_server: SeaweedServer, request: pytest.FixtureRequest) -> str:
    """A fresh s3:// prefix per test on the session's server."""
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').replace(']', '')}-{os.urandom(4).hex()}"


@pytest.fixture
def seaweed_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], SeaweedServer]]:
    """Private servers for tests that kill them; all stopped at the end of the test."""
    started: list[SeaweedServer] = []

    def make() -> SeaweedServer:
        server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs-own"))
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def redis_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisServer]]:
    """Private Redis servers (a test may kill and restart them); all stopped at the end of the test."""
    started: list[RedisServer] = []

    def make(password: str | None = None) -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp("redis"), password)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
