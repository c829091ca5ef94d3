"""What routes receive through FastAPI dependencies: the server's parts, the admin check, and the response
helpers every route shares."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request
from fastapi.responses import Response
from pydantic_core import to_json

from recforge.serve.lifecycle import Lifecycle
from recforge.serve.loading import NotReady, Snapshot
from recforge.serve.schemas import ErrorResponse
from recforge.serve.service import Service
from recforge.serve.settings import ADMIN_TOKEN_ENV, Exposure, ServeSettings

# What a client without the admin token is told when a model route cannot answer (the reason is in the log).
MODELS_NOT_LOADED = "models not loaded yet; retry later"

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body is not valid JSON."},
    413: {"model": ErrorResponse, "description": "Request body too large."},
    500: {"model": ErrorResponse, "description": "A model failed."},
    503: {"model": ErrorResponse, "description": "Models not loaded yet."},
}
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body is not valid JSON."},
    401: {"model": ErrorResponse, "description": "Missing or wrong admin token."},
    403: {"model": ErrorResponse, "description": f"Admin routes disabled ({ADMIN_TOKEN_ENV} not set)."},
    409: {"model": ErrorResponse, "description": "The registry refused the change (unknown version or alias)."},
    413: ERRORS[413],
}


# async on purpose: FastAPI runs a plain-def dependency in its thread pool, a thread hop on every request.
async def _service(request: Request) -> Service:
    return request.app.state.service


async def _lifecycle(request: Request) -> Lifecycle:
    return request.app.state.lifecycle


Svc = Annotated[Service, Depends(_service)]
Life = Annotated[Lifecycle, Depends(_lifecycle)]


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


async def require_admin(svc: Svc, authorization: str | None = Header(None)) -> None:
    if not svc.settings.admin_token:
        raise HTTPException(403, f"admin routes are disabled: set {ADMIN_TOKEN_ENV} to enable them")
    if not token_matches(svc.settings, authorization):
        raise HTTPException(401, "missing or wrong admin token: send 'Authorization: Bearer <token>'")


ADMIN = [Depends(require_admin)]


def ready_snapshot(svc: Service) -> Snapshot:
    """The loaded snapshot, or a 503 that says only that models are not loaded (why is in the log and in
    /readyz for the admin: a registry path or a checksum is nothing to tell a client)."""
    try:
        return svc.loader.ready()
    except NotReady:
        raise HTTPException(503, MODELS_NOT_LOADED) from None


def json_content(content: dict[str, Any]) -> Response:
    """A response body from values the server computed itself (ids and floats it already holds as such), in
    the shape of the route's response model, which stays declared for the schema.

    Building the pydantic models first and dumping them costs ~5x more: with 500 scored items that was ~0.5 ms
    per request of the one core the event loop has. NaN/inf become null, as pydantic's dump would write them.
    """
    return Response(content=to_json(content, inf_nan_mode="null"), media_type="application/json")
