"""The HTTP layer: FastAPI routes over `Service`. Thin on purpose.

Routes validate the wire format, call one service method (model work in the model threads, event
writes in the events thread, so the event loop never blocks), and turn the service's exceptions
into HTTP status codes; nothing else here knows about models or storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic_core import to_json
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recforge import registry
from recforge.serve.events import EventStoreFull, encode_event, timestamp_problem
from recforge.serve.models import ModelError, Query
from recforge.serve.schemas import (
    ErrorResponse,
    EventsRequest,
    EventsResponse,
    ExperimentsBody,
    Health,
    Ready,
    RecommendRequest,
    RecommendResponse,
    ReloadResponse,
    RollbackRequest,
    ScoreRequest,
    ScoreResponse,
    WorkerStatus,
    bounded_recommend_request,
    bounded_score_request,
)
from recforge.serve.service import ConfigRejected, Job, NotReady, Route, Service, experiments_from, experiments_to
from recforge.serve.settings import ADMIN_TOKEN_ENV, Exposure, ServeSettings
from recforge.serve.workers import STATE_DIR_ENV, WorkerBoard, WorkerProcess, WorkerState

log = logging.getLogger("recforge.serve")

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body is not valid JSON."},
    413: {"model": ErrorResponse, "description": "Request body too large."},
    500: {"model": ErrorResponse, "description": "A model failed."},
    503: {"model": ErrorResponse, "description": "Models not loaded yet."},
}
_ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body is not valid JSON."},
    401: {"model": ErrorResponse, "description": "Missing or wrong admin token."},
    403: {"model": ErrorResponse, "description": f"Admin routes disabled ({ADMIN_TOKEN_ENV} not set)."},
    409: {"model": ErrorResponse, "description": "The registry refused the change (unknown version or alias)."},
    413: _ERRORS[413],
}


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, before any parsing (declared or streamed size)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(send)
            return
        if declared is not None:
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._reject(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        body = (b'{"detail":"request body larger than %d bytes (max_body_bytes); send smaller batches"}'
                % self.limit)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# How often a worker reads the events the other workers stored (exclude_seen and histories lag by at most this).
SEEN_SYNC_S = 0.2
# How the parent process hands its settings to the worker processes (uvicorn starts them from an import string).
WORKER_SETTINGS_ENV = "RECFORGE_WORKER_SETTINGS"
# A not-ready reason is logged when it changes, and at most this often while it stays the same (probes poll).
NOT_READY_LOG_EVERY_S = 30.0
# What a client without the admin token is told when a model route cannot answer (the reason is in the log).
MODELS_NOT_LOADED = "models not loaded yet; retry later"


def _json_content(content: dict[str, Any]) -> Response:
    """A response body from values the server computed itself (ids and floats it already holds as such), in
    the shape of the route's response model, which stays declared for the schema.

    Building the pydantic models first and dumping them costs ~5x more: with 500 scored items that was ~0.5 ms
    per request of the one core the event loop has. NaN/inf become null, as pydantic's dump would write them.
    """
    return Response(content=to_json(content, inf_nan_mode="null"), media_type="application/json")


def _printable(value: object) -> str | int:
    """A location or message part as JSON can carry it (lone surrogates escaped)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def token_matches(settings: ServeSettings, authorization: str | None) -> bool:
    """Whether an Authorization header carries the configured admin token (never, when none is configured)."""
    token = settings.admin_token
    if not token:
        return False
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def exposure(settings: ServeSettings, level: Exposure) -> Exposure:
    """The level a `docs`/`metrics` setting takes effect at: `admin` with no admin token configured is `off`,
    since nobody could present the token (a 403 "admin disabled" would tell the same to anyone)."""
    return "off" if level == "admin" and not settings.admin_token else level


class NotReadyLog:
    """Logs why the server is not ready (the public /readyz answer does not say): when the reason changes,
    and at most every NOT_READY_LOG_EVERY_S while it stays the same, since probes ask every few seconds."""

    def __init__(self) -> None:
        self.last: str | None = None
        self.at = 0.0

    def __call__(self, reason: str | None) -> None:
        now = time.monotonic()
        if reason is not None and (reason != self.last or now - self.at >= NOT_READY_LOG_EVERY_S):
            log.warning("/readyz: not ready: %s", reason)
            self.at = now
        self.last = reason


def _add_docs(app: FastAPI, level: Exposure, admin: Any) -> None:
    """/openapi.json, /docs and /redoc at `level`: absent (404), behind the admin token (401 without it), or open.

    FastAPI's own docs routes cannot take a dependency, so the app is built without them and these stand in.
    """
    if level == "off":
        return
    dependencies = [Depends(admin)] if level == "admin" else []

    @app.get("/openapi.json", include_in_schema=False, dependencies=dependencies)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=dependencies)
    async def swagger(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json",
                                   title=f"{app.title} - Swagger UI")

    @app.get("/redoc", include_in_schema=False, dependencies=dependencies)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json",
                              title=f"{app.title} - ReDoc")


def create_app(settings: ServeSettings, service: Service | None = None, board: WorkerBoard | None = None) -> FastAPI:
    """The ASGI app. Alone, a server loads its models in the background from startup (/readyz says when it is
    done). One of several workers (`board` given) loads them before it takes connections while another worker
    serves (see `join_workers` and serve/workers.py)."""
    svc = service or Service(settings)
    background: set[asyncio.Future[Any]] = set()
    not_ready_log = NotReadyLog()

    def spawn(future: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(future)
        background.add(task)
        task.add_done_callback(background.discard)

    def announce(accepting: bool = True) -> None:
        """This worker's state, for the others' /readyz and start-up decisions (see serve/workers.py)."""
        if board is not None:
            snapshot = svc.snapshot
            try:
                board.publish(accepting, snapshot.versions() if snapshot is not None else None)
            except OSError as exc:  # the supervisor removes the directory as it stops
                log.warning("cannot publish this worker's state in %s: %s", board.root, exc)

    async def reload_in_thread() -> bool:
        changed = await asyncio.get_running_loop().run_in_executor(None, svc.reload)
        if changed:
            announce()
        return changed

    async def load_attempt() -> None:
        """One reload; a failure is kept in `svc.last_error` (and logged) for /readyz, and the caller retries."""
        try:
            if settings.workers > 1 and svc.snapshot is not None:
                await asyncio.get_running_loop().run_in_executor(None, svc.follow_experiments_file)
            await reload_in_thread()
            svc.last_error = None
        except Exception as exc:  # the registry may be mid-change or empty: report and retry
            svc.last_error = f"cannot load models: {str(exc).strip().splitlines()[0] if str(exc) else exc!r}"
            log.error("%s", svc.last_error)

    async def join_workers(board: WorkerBoard) -> None:
        """Runs in lifespan startup, so before uvicorn's server takes connections on the shared socket: while
        another worker serves, load the models first (a worker restarted next to serving ones would otherwise
        take its share of new connections at once and answer them 503 until loaded). With no other worker
        accepting (the server's first start, or all of them down) nobody would answer /healthz and /readyz
        meanwhile, so this one accepts at once and loads in the background, as a single server does."""
        loop = asyncio.get_running_loop()
        announce(accepting=False)
        while svc.snapshot is None:
            if not await loop.run_in_executor(None, board.others_accepting):
                log.info("no other worker takes connections: this one does now, its models load meanwhile")
                return
            await load_attempt()
            for _ in range(10):  # a failed load is retried every 2 s, as follow_registry does
                if svc.snapshot is not None or not await loop.run_in_executor(None, board.others_accepting):
                    break
                await asyncio.sleep(0.2)
        log.info("models loaded before taking connections: %s", svc.snapshot.versions())

    async def follow_registry() -> None:
        """Initial load, then re-resolve the aliases every poll interval (retrying until production loads)."""
        while True:
            await load_attempt()
            announce()  # also after changes made outside reload_in_thread (experiments, canary rollbacks)
            interval = settings.poll_interval_s or (2.0 if svc.snapshot is None else 0)
            if not interval:
                return
            await asyncio.sleep(interval)

    async def follow_events() -> None:
        """With several workers: read the events the other workers stored into this one's per-user memory."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SEEN_SYNC_S)
            try:
                await loop.run_in_executor(svc.events_executor, svc.sync_seen)
            except Exception as exc:  # a busy or briefly unreadable store: the next round catches up
                log.warning("reading events stored by other workers failed: %s", exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import faiss
        import torch

        # One thread per model call; parallelism comes from the model thread pool and from batching.
        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)
        if settings.workers > 1:
            spawn(follow_events())
        if board is not None:
            await join_workers(board)
            announce(accepting=True)
        spawn(follow_registry())
        try:
            yield
        finally:
            for task in list(background):
                task.cancel()
            if board is not None:
                board.withdraw()
            svc.close()

    # No built-in docs routes: _add_docs serves them at the `docs` setting's level.
    app = FastAPI(title="recforge serve", version="1", lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None,
                  description="Two-stage recommendations, scoring, events, A/B experiments and canaries.")
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.state.service = svc

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The offending input is not echoed: NaN, 1e400 or a lone surrogate cannot be encoded as JSON,
        # and a response that fails to encode closes the connection with no answer at all.
        errors = [{"type": str(e.get("type", "")), "loc": [_printable(part) for part in e.get("loc", ())],
                   "msg": _printable(e.get("msg", ""))} for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(map(str, first.get("loc", [])))
        return JSONResponse(status_code=422, content={"detail": errors, "message": f"{where}: {first.get('msg')}"})

    def ready() -> Any:
        try:
            return svc.ready()
        except NotReady:  # why (a registry path, a checksum) is in the log and in /readyz for the admin
            raise HTTPException(503, MODELS_NOT_LOADED) from None

    def admin(authorization: str | None = Header(None)) -> None:
        if not settings.admin_token:
            raise HTTPException(403, f"admin routes are disabled: set {ADMIN_TOKEN_ENV} to enable them")
        if not token_matches(settings, authorization):
            raise HTTPException(401, "missing or wrong admin token: send 'Authorization: Bearer <token>'")

    def finish(route_name: str, route: Route, status: int, started: float, canary_failed: bool = False) -> None:
        latency = time.perf_counter() - started
        svc.metrics.requests.labels(route_name, route.variant, str(status)).inc()
        svc.metrics.latency.labels(route_name, route.variant).observe(latency)
        if route.canary:
            for kind, version, reason in svc.observe_canary(route, status < 500 and not canary_failed, latency):
                spawn(asyncio.get_running_loop().run_in_executor(None, svc.rollback_canary, kind, version, reason))

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=Ready, response_model_exclude_none=True,
             responses={503: {"model": ErrorResponse}})
    async def readyz(authorization: str | None = Header(None, include_in_schema=False)) -> Ready:
        """Ready or not for anyone; the versions, the workers and the exact reason only with the admin token."""
        loop = asyncio.get_running_loop()
        detailed = token_matches(settings, authorization)
        states = await loop.run_in_executor(None, board.states) if board is not None else None
        public, reason = await loop.run_in_executor(svc.events_executor, not_ready_reason, states)
        not_ready_log(reason)
        if reason is not None:
            raise HTTPException(503, reason if detailed else f"not ready: {public}")
        if not detailed:
            return Ready(status="ready")
        snapshot = svc.ready()
        return Ready(status="ready", models=snapshot.versions(), workers_expected=settings.workers if states else None,
                     workers=[WorkerStatus(pid=s.pid, accepting=s.accepting, models=s.models) for s in states or []]
                     or None)

    def not_ready_reason(states: list[WorkerState] | None) -> tuple[str, str | None]:
        """Runs in the events thread: (what anyone may be told, the full reason or None when ready)."""
        problem = svc.events_unwritable()
        if problem:
            return "the event store cannot write", f"the event store cannot write (disk full): {problem}"
        try:
            svc.ready()
        except NotReady as exc:
            return "models not loaded", str(exc)
        me = board.pid if board is not None else None
        waiting = [s.pid for s in states or [] if s.accepting and s.models is None and s.pid != me]
        if waiting:
            return ("models not loaded in every worker",
                    f"worker(s) {', '.join(map(str, waiting))} take connections but have not loaded their models")
        return "", None

    if exposure(settings, settings.metrics) != "off":
        @app.get("/metrics", include_in_schema=False,
                 dependencies=[Depends(admin)] if settings.metrics == "admin" else [])
        async def metrics() -> Response:
            return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    _add_docs(app, exposure(settings, settings.docs), admin)

    async def recommend(body: RecommendRequest) -> Any:
        started = time.perf_counter()
        k = body.k or min(settings.default_k, settings.max_k)
        snapshot = ready()
        route = svc.route(snapshot, body.user_id)
        seen, clicked = svc.seen.get(body.user_id)
        query = Query(body.user_id, body.context, k, body.exclude_seen, seen, clicked)
        try:
            served = await svc.batcher.submit(Job(query, route, snapshot))
        except ModelError as exc:
            finish("recommend", route, 500, started)
            raise HTTPException(500, str(exc)) from None
        finish("recommend", route, 200, started, served.canary_failed)
        if served.result.cold_start:
            svc.metrics.cold_start.inc()
        used = served.route
        # RecommendResponse's fields, serialized straight from the computed values (see _json_content).
        return _json_content({
            "request_id": uuid.uuid4().hex, "user_id": body.user_id,
            "items": [{"item_id": i, "score": s, "retrieval_score": r} for i, s, r in
                      zip(served.result.items, served.result.scores, served.result.retrieval_scores, strict=True)],
            "cold_start": served.result.cold_start,
            "model_versions": {"retrieval": used.retrieval, "ranker": used.ranker},
            "model_version": used.model_version, "assignments": used.assignments, "canary": bool(used.canary)})

    # The request models carry this server's limits (k, item_ids), so a too-large value is a 422 naming the field
    # and the published schema states the bound.
    recommend.__annotations__["body"] = bounded_recommend_request(settings.max_k)
    app.post("/v1/recommend", response_model=RecommendResponse, responses=_ERRORS)(recommend)

    async def score(body: ScoreRequest) -> Any:
        started = time.perf_counter()
        snapshot = ready()
        route = svc.route(snapshot, body.user_id)
        seen, clicked = svc.seen.get(body.user_id)
        query = Query(body.user_id, body.context, 1, False, seen, clicked)
        loop = asyncio.get_running_loop()
        try:
            ids, scores, unknown, used, failed = await loop.run_in_executor(
                svc.executor, svc.score, snapshot, route, query, body.item_ids)
        except ModelError as exc:
            finish("score", route, 500, started)
            raise HTTPException(500, str(exc)) from None
        finish("score", route, 200, started, failed)
        # ScoreResponse's fields (see _json_content).
        return _json_content({
            "request_id": uuid.uuid4().hex,
            "scores": [{"item_id": i, "score": s} for i, s in zip(ids, scores, strict=True)],
            "unknown_items": unknown, "model_versions": {"retrieval": used.retrieval, "ranker": used.ranker},
            "model_version": used.model_version, "assignments": used.assignments, "canary": bool(used.canary)})

    score.__annotations__["body"] = bounded_score_request(settings.max_item_ids)
    app.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS)(score)

    @app.post("/v1/events", response_model=EventsResponse, responses=_ERRORS)
    async def events(body: EventsRequest) -> EventsResponse:
        started = time.perf_counter()
        now = time.time()
        late = [{"type": "value_error", "loc": ("body", "events", i, "timestamp"), "msg": problem}
                for i, e in enumerate(body.events) if e.timestamp is not None and (problem := timestamp_problem(
                    e.timestamp, now, settings.event_max_ahead_s, settings.event_max_age_s))]
        if late:
            raise RequestValidationError(late)
        snapshot = svc.snapshot
        features = (svc.item_features(snapshot, [e.item_id for e in body.events]) if snapshot is not None
                    else [{} for _ in body.events])
        stored = [encode_event(e.type, e.request_id, e.user_id, e.item_id, e.position,
                               now if e.timestamp is None else e.timestamp, e.context, e.assignments,
                               e.model_version, f if e.type == "impression" else None)
                  for e, f in zip(body.events, features, strict=True)]
        seen = [(e.type, e.user_id, e.item_id) for e in body.events]
        loop = asyncio.get_running_loop()
        try:
            total = await loop.run_in_executor(svc.events_executor, svc.store_events, stored, seen)
        except EventStoreFull:
            svc.metrics.requests.labels("events", "default", "503").inc()
            raise HTTPException(503, "events not stored: the event store cannot write (disk full); retry later",
                                headers={"Retry-After": "5"}) from None
        svc.metrics.requests.labels("events", "default", "200").inc()
        svc.metrics.latency.labels("events", "default").observe(time.perf_counter() - started)
        return EventsResponse(accepted=len(stored), stored_total=total)

    @app.get("/admin/experiments", response_model=ExperimentsBody, responses=_ADMIN_ERRORS,
             dependencies=[Depends(admin)])
    async def get_experiments() -> Any:
        return experiments_to(svc.experiments)

    @app.put("/admin/experiments", response_model=ExperimentsBody, responses={**_ADMIN_ERRORS, **_ERRORS},
             dependencies=[Depends(admin)])
    async def put_experiments(body: ExperimentsBody) -> Any:
        if settings.workers > 1 and settings.experiments is None:
            raise HTTPException(409, f"with workers={settings.workers} experiments must live in a file the workers "
                                     "share: restart with --experiments FILE")
        try:
            experiments = experiments_from(body.model_dump())
            await asyncio.get_running_loop().run_in_executor(None, svc.set_experiments, experiments)
        except ConfigRejected as exc:
            raise HTTPException(409, str(exc)) from None
        except ValueError as exc:  # valid JSON, but contradictory (e.g. a repeated variant name)
            raise HTTPException(409, str(exc).strip().splitlines()[0]) from None
        return experiments_to(svc.experiments)

    @app.post("/admin/reload", response_model=ReloadResponse, responses={**_ADMIN_ERRORS, **_ERRORS},
              dependencies=[Depends(admin)])
    async def reload() -> Any:
        try:
            changed = await reload_in_thread()
        except Exception as exc:  # the old models keep serving; say why the new ones did not load
            raise HTTPException(409, f"reload failed, still serving the previous versions: {exc}") from None
        return ReloadResponse(changed=changed, models=svc.ready().versions())

    @app.post("/admin/rollback", response_model=ReloadResponse, responses={**_ADMIN_ERRORS, **_ERRORS},
              dependencies=[Depends(admin)])
    async def rollback(body: RollbackRequest) -> Any:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, lambda: registry.rollback(
                settings.registry, svc.model_name(body.model), alias=body.alias, reason=body.reason))
            changed = await reload_in_thread()
        except registry.RegistryError as exc:
            raise HTTPException(409, str(exc)) from None
        return ReloadResponse(changed=changed, models=ready().versions())

    @app.get("/admin/canary", responses=_ADMIN_ERRORS, dependencies=[Depends(admin)])
    async def canary() -> dict[str, Any]:
        return svc.canary_stats()

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
