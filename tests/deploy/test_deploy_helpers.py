"""The scripts the app image ships, run for real: the HEALTHCHECK helper against live HTTP servers, and the
registry seeding job followed by the image's own CMD (`recforge serve ...`) until the healthcheck passes.

No Docker engine is needed: the image's ENTRYPOINT + CMD are read from app.Dockerfile and run here with
only the paths and port swapped, so a CMD flag that `serve` lost, or a seeding step that no longer
produces what `serve` loads, fails here.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from recforge import registry
from recforge.runtime import die_with_parent, free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
HEALTHCHECK = DOCKER / "healthcheck.py"
TINY = ["data.generate.users=800", "data.generate.items=300", "data.generate.events=20000", "data.generate.days=6",
        "train.epochs=1", "train.batch_size=512", "train.progress=false"]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(200 if self.path == "/readyz" else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def healthcheck(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RECFORGE_")}
    return subprocess.run([sys.executable, str(HEALTHCHECK)], capture_output=True, text=True, timeout=30,
                          env={**clean, **env})


def test_healthcheck_passes_only_on_http_200_from_readyz(http_server):
    # A server that is alive (/healthz) but cannot serve (/readyz 503) is an unhealthy container.
    assert healthcheck(RECFORGE_SERVE_PORT=str(http_server)).returncode == 0
    bad = healthcheck(RECFORGE_HEALTHCHECK_URL=f"http://127.0.0.1:{http_server}/healthz")
    assert bad.returncode == 1 and bad.stderr.strip().endswith("/healthz: HTTP 503")
    closed = free_port()
    down = healthcheck(RECFORGE_SERVE_PORT=str(closed), RECFORGE_HEALTHCHECK_TIMEOUT_S="2")
    assert down.returncode == 1 and f"unhealthy: http://127.0.0.1:{closed}/readyz:" in down.stderr


def image_command() -> list[str]:
    """ENTRYPOINT + CMD of the app image, as the container would run them."""
    lines = (DOCKER / "app.Dockerfile").read_text().splitlines()
    entry = next(yaml.safe_load(line.split(None, 1)[1]) for line in reversed(lines) if line.startswith("ENTRYPOINT"))
    cmd = next(yaml.safe_load(line.split(None, 1)[1]) for line in reversed(lines) if line.startswith("CMD"))
    return [*entry, *cmd]


@pytest.mark.slow
def test_seeded_registry_is_served_by_the_images_command_and_passes_its_healthcheck(tmp_path):
    reg, work = tmp_path / "models", tmp_path / "data"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RECFORGE_")},
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "120"}
    seeded = subprocess.run(["bash", str(DOCKER / "seed-registry.sh"), str(reg), str(work), *TINY],
                            capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert seeded.returncode == 0, seeded.stderr[-3000:]
    for model in ("ranker", "retrieval"):
        assert "production" in registry.show(reg, model, "production")["aliases"]

    port = free_port()
    argv = image_command()
    assert argv[:2] == ["recforge", "serve"]
    swap = {"/models": str(reg), "0.0.0.0": "127.0.0.1", "8000": str(port)}
    argv = [str(Path(sys.executable).with_name("recforge")), *[swap.get(a, a) for a in argv[1:]]]
    log = tmp_path / "server.log"
    with log.open("w") as sink:  # the child keeps its own copy of the descriptor
        server = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=sink,
                                  env={**env, "RECFORGE_SERVE_EVENTS_DIR": str(tmp_path / "logs"),
                                       "RECFORGE_ADMIN_TOKEN": "deploy-token"},
                                  preexec_fn=die_with_parent)
    try:
        deadline = time.monotonic() + 90
        while True:
            check = healthcheck(RECFORGE_SERVE_PORT=str(port), RECFORGE_HEALTHCHECK_TIMEOUT_S="2")
            if check.returncode == 0:
                break
            assert server.poll() is None, f"the server exited {server.returncode}: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"healthcheck never passed: {check.stderr}"
            time.sleep(0.5)
        # The versions in /readyz are for the admin token's bearers; the healthcheck needs only the status.
        admin = {"Authorization": "Bearer deploy-token"}
        while (ready := httpx.get(f"http://127.0.0.1:{port}/readyz", headers=admin, timeout=5)).status_code != 200:
            assert time.monotonic() < deadline, f"never ready: {ready.text}"
            time.sleep(0.5)
        assert set(json.loads(ready.text)["models"]) >= {"ranker", "retrieval"}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
