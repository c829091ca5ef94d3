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
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
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
    bounded_recommend_request,
    bounded_score_request,
)
from recforge.serve.service import ConfigRejected, Job, NotReady, Route, Service, experiments_from, experiments_to
from recforge.serve.settings import ADMIN_TOKEN_ENV, ServeSettings

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


def create_app(settings: ServeSettings, service: Service | None = None) -> FastAPI:
    """The ASGI app; model loading starts in the background at startup (/readyz says when it is done)."""
    svc = service or Service(settings)
    background: set[asyncio.Future[Any]] = set()

    def spawn(future: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(future)
        background.add(task)
        task.add_done_callback(background.discard)

    async def reload_in_thread() -> bool:
        return await asyncio.get_running_loop().run_in_executor(None, svc.reload)

    async def follow_registry() -> None:
        """Initial load, then re-resolve the aliases every poll interval (retrying until production loads)."""
        while True:
            try:
                if settings.workers > 1 and svc.snapshot is not None:
                    await asyncio.get_running_loop().run_in_executor(None, svc.follow_experiments_file)
                await reload_in_thread()
                svc.last_error = None
            except Exception as exc:  # the registry may be mid-change or empty: report and retry
                svc.last_error = f"cannot load models: {str(exc).strip().splitlines()[0] if str(exc) else exc!r}"
                log.error("%s", svc.last_error)
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
        spawn(follow_registry())
        if settings.workers > 1:
            spawn(follow_events())
        try:
            yield
        finally:
            for task in list(background):
                task.cancel()
            svc.close()

    app = FastAPI(title="recforge serve", version="1", lifespan=lifespan,
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
        except NotReady as exc:
            raise HTTPException(503, str(exc)) from None

    def admin(authorization: str | None = Header(None)) -> None:
        token = settings.admin_token
        if not token:
            raise HTTPException(403, f"admin routes are disabled: set {ADMIN_TOKEN_ENV} to enable them")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
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

    @app.get("/readyz", response_model=Ready, responses={503: {"model": ErrorResponse}})
    async def readyz() -> Ready:
        if await asyncio.get_running_loop().run_in_executor(svc.events_executor, svc.events_unwritable):
            raise HTTPException(503, "the event store cannot write (disk full)")
        snapshot = ready()
        return Ready(status="ready", models=snapshot.versions())

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

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
        log.warning("%s is not set: admin routes (reload, experiments, rollback) are disabled", ADMIN_TOKEN_ENV)
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

    The socket is made here rather than by uvicorn: uvicorn's own leaves the protocol unset, so asyncio does not
    set TCP_NODELAY on the accepted connections, and every keep-alive response then waits ~40 ms for a delayed
    ACK (Nagle's algorithm).
    """
    import socket

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    os.environ[WORKER_SETTINGS_ENV] = settings.model_dump_json()
    config = uvicorn.Config("recforge.serve.app:worker_app", factory=True, workers=settings.workers,
                            host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False,
                            lifespan="on")
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        raise OSError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}; choose another --port"
                      ) from None
    log.info("serving with %d worker processes on %s:%d", settings.workers, settings.host, settings.port)
    with contextlib.suppress(KeyboardInterrupt):
        Multiprocess(config, sockets=[sock]).run()


def worker_app() -> FastAPI:
    """One worker process's app, built from the settings the parent read (uvicorn calls this in each worker)."""
    settings = ServeSettings.model_validate_json(os.environ[WORKER_SETTINGS_ENV])
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(settings)
