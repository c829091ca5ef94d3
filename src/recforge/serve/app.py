"""The ASGI app: the server's parts (`Service`, `Lifecycle`) behind the routes of `serve/routes/`, and the
process (or processes, with --workers) that serves it.

Routes validate the wire format, call one method (model work in the model threads, event writes in the
events thread, so the event loop never blocks), and turn its exceptions into HTTP status codes; nothing
in this module knows about models or storage.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from recforge.serve.lifecycle import Lifecycle
from recforge.serve.middleware import BodyLimit, validation_error
from recforge.serve.routes import admin, events, health, model_routes
from recforge.serve.routes.deps import exposure
from recforge.serve.service import Service
from recforge.serve.settings import ADMIN_TOKEN_ENV, ServeSettings
from recforge.serve.workers import STATE_DIR_ENV, WorkerBoard, WorkerProcess

log = logging.getLogger("recforge.serve")

# How the parent process hands its settings to the worker processes (uvicorn starts them from an import string).
WORKER_SETTINGS_ENV = "RECFORGE_WORKER_SETTINGS"


def create_app(settings: ServeSettings, service: Service | None = None, board: WorkerBoard | None = None) -> FastAPI:
    """The ASGI app. Alone, a server loads its models in the background from startup (/readyz says when it is
    done). One of several workers (`board` given) loads them before it takes connections while another worker
    serves (serve/lifecycle.py, serve/workers.py)."""
    svc = service or Service(settings)
    lifecycle = Lifecycle(svc, board)
    # No built-in docs routes: health.add_docs serves them at the `docs` setting's level.
    app = FastAPI(title="recforge serve", version="1", lifespan=lifecycle.lifespan, openapi_url=None,
                  docs_url=None, redoc_url=None,
                  description="Two-stage recommendations, scoring, events, A/B experiments and canaries.")
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.state.service = svc
    app.state.lifecycle = lifecycle
    app.include_router(health.router(settings))
    app.include_router(model_routes.router(settings))
    app.include_router(events.router)
    app.include_router(admin.router)
    health.add_docs(app, exposure(settings, settings.docs))
    return app


def run(settings: ServeSettings) -> None:
    """Serve until interrupted (the `recforge serve` command)."""
    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.admin_token:
        off = [f"{name}=admin" for name in ("docs", "metrics") if getattr(settings, name) == "admin"]
        log.warning("%s is not set: admin routes (reload, experiments, rollback) are disabled%s", ADMIN_TOKEN_ENV,
                    f", and so are the routes under {' and '.join(off)} (404)" if off else "")
    if settings.workers > 1:
        _run_workers(settings)
        return
    app = create_app(settings)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False,
                    lifespan="on")


def _run_workers(settings: ServeSettings) -> None:
    """`settings.workers` processes accepting on one listening socket (uvicorn's supervisor restarts any that die).

    Shared by the workers: the events store (one SQLite file in WAL mode; every accepted event is durable there
    whichever worker took it, and each worker reads the others' events into its per-user memory every
    SEEN_SYNC_S), the experiments file (re-read on the poll when another worker changed it) and the registry
    (alias moves and canary rollbacks reach every worker on its next poll). Per worker: the loaded models, the
    micro-batches, the canary window (each judges the canary on the requests it served) and the /metrics series
    (a scrape sees the worker that answered it).

    Readiness is the server's, not one worker's: each worker publishes its state in a directory made here for
    this server (serve/workers.py). A worker restarted while others serve loads its models in its lifespan
    startup, and uvicorn starts accepting on the socket only once startup is over, so it takes no connection
    before it can answer it; /readyz, from whichever worker answers, is ready only when every worker that
    accepts connections has its models. The supervisor's health ping waits `worker_healthcheck_timeout_s`:
    loading can hold a worker's interpreter for seconds on a busy machine, and a worker that misses the ping
    is killed and restarted, loading again from scratch. A worker that died is still noticed at once
    (`serve.workers.WorkerProcess`).

    The socket is made here rather than by uvicorn: uvicorn's own leaves the protocol unset, so asyncio does not
    set TCP_NODELAY on the accepted connections, and every keep-alive response then waits ~40 ms for a delayed
    ACK (Nagle's algorithm).
    """
    import shutil
    import socket
    import tempfile

    import uvicorn
    from uvicorn.supervisors import Multiprocess, multiprocess

    multiprocess.Process = WorkerProcess  # type: ignore[misc]  # the supervisor makes its workers by this name
    os.environ[WORKER_SETTINGS_ENV] = settings.model_dump_json()
    config = uvicorn.Config("recforge.serve.app:worker_app", factory=True, workers=settings.workers,
                            host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False,
                            lifespan="on", timeout_worker_healthcheck=settings.worker_healthcheck_timeout_s)
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        raise OSError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}; choose another --port"
                      ) from None
    log.info("serving with %d worker processes on %s:%d", settings.workers, settings.host, settings.port)
    state_dir = tempfile.mkdtemp(prefix="recforge-serve-workers-")
    os.environ[STATE_DIR_ENV] = state_dir
    try:
        with contextlib.suppress(KeyboardInterrupt):
            Multiprocess(config, sockets=[sock]).run()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def worker_app() -> FastAPI:
    """One worker process's app, built from the settings the parent read (uvicorn calls this in each worker)."""
    settings = ServeSettings.model_validate_json(os.environ[WORKER_SETTINGS_ENV])
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(settings, board=WorkerBoard(Path(os.environ[STATE_DIR_ENV])))
