"""Probes and what operators read: /healthz, /readyz, /metrics and the API docs."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response

from recforge.serve.loading import NotReady
from recforge.serve.routes.deps import Life, Svc, exposure, require_admin, token_matches
from recforge.serve.schemas import ErrorResponse, Health, Ready, WorkerStatus
from recforge.serve.service import Service
from recforge.serve.settings import Exposure, ServeSettings
from recforge.serve.workers import WorkerBoard, WorkerState

log = logging.getLogger("recforge.serve")

# A not-ready reason is logged when it changes, and at most this often while it stays the same (probes poll).
NOT_READY_LOG_EVERY_S = 30.0


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


def not_ready_reason(svc: Service, board: WorkerBoard | None, states: list[WorkerState] | None
                     ) -> tuple[str, str | None]:
    """Runs in the events thread: (what anyone may be told, the full reason or None when ready)."""
    problem = svc.online.unwritable()
    if problem:
        return "the event store cannot write", f"the event store cannot write: {problem}"
    try:
        svc.loader.ready()
    except NotReady as exc:
        return "models not loaded", str(exc)
    me = board.pid if board is not None else None
    waiting = [s.pid for s in states or [] if s.accepting and s.models is None and s.pid != me]
    if waiting:
        return ("models not loaded in every worker",
                f"worker(s) {', '.join(map(str, waiting))} take connections but have not loaded their models")
    return "", None


def router(settings: ServeSettings) -> APIRouter:
    routes = APIRouter()
    not_ready_log = NotReadyLog()

    @routes.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok")

    @routes.get("/readyz", response_model=Ready, response_model_exclude_none=True,
                responses={503: {"model": ErrorResponse}})
    async def readyz(svc: Svc, life: Life, authorization: str | None = Header(None, include_in_schema=False)
                     ) -> Ready:
        """Ready or not for anyone; the versions, the workers and the exact reason only with the admin token."""
        loop, board = asyncio.get_running_loop(), life.board
        states = await loop.run_in_executor(None, board.states) if board is not None else None
        public, reason = await loop.run_in_executor(svc.events_executor, not_ready_reason, svc, board, states)
        not_ready_log(reason)
        detailed = token_matches(settings, authorization)
        if reason is not None:
            raise HTTPException(503, reason if detailed else f"not ready: {public}")
        if not detailed:
            return Ready(status="ready")
        workers = [WorkerStatus(pid=s.pid, accepting=s.accepting, models=s.models) for s in states or []]
        return Ready(status="ready", models=svc.loader.ready().versions(),
                     workers_expected=settings.workers if states else None, workers=workers or None)

    if exposure(settings, settings.metrics) != "off":
        @routes.get("/metrics", include_in_schema=False,
                    dependencies=[Depends(require_admin)] if settings.metrics == "admin" else [])
        async def metrics(svc: Svc) -> Response:
            return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return routes


def add_docs(app: FastAPI, level: Exposure) -> None:
    """/openapi.json, /docs and /redoc at `level`: absent (404), behind the admin token (401 without it), or open.

    FastAPI's own docs routes cannot take a dependency, so the app is built without them and these stand in.
    """
    if level == "off":
        return
    dependencies = [Depends(require_admin)] if level == "admin" else []

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
