"""The admin routes (bearer token): experiments, reload, rollback, canary windows."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

from recforge import registry
from recforge.serve.experiment_config import experiments_to
from recforge.serve.loading import ConfigRejected
from recforge.serve.routes.deps import ADMIN, ADMIN_ERRORS, ERRORS, Life, Svc, ready_snapshot
from recforge.serve.schemas import ExperimentsBody, ReloadResponse, RollbackRequest

router = APIRouter(dependencies=ADMIN)


@router.get("/admin/experiments", response_model=ExperimentsBody, responses=ADMIN_ERRORS)
async def get_experiments(svc: Svc) -> Any:
    return experiments_to(svc.loader.experiments)


@router.put("/admin/experiments", response_model=ExperimentsBody, responses={**ADMIN_ERRORS, **ERRORS})
async def put_experiments(body: ExperimentsBody, svc: Svc) -> Any:
    settings = svc.settings
    if settings.workers > 1 and settings.experiments is None:
        raise HTTPException(409, f"with workers={settings.workers} experiments must live in a file the workers "
                                 "share: restart with --experiments FILE")
    try:
        await svc.set_experiments(body.model_dump())
    except ConfigRejected as exc:
        raise HTTPException(409, str(exc)) from None
    except ValueError as exc:  # valid JSON, but contradictory (e.g. a repeated variant name)
        raise HTTPException(409, str(exc).strip().splitlines()[0]) from None
    return experiments_to(svc.loader.experiments)


@router.post("/admin/reload", response_model=ReloadResponse, responses={**ADMIN_ERRORS, **ERRORS})
async def reload(svc: Svc, life: Life) -> Any:
    try:
        changed = await life.reload()
    except Exception as exc:  # the old models keep serving; say why the new ones did not load
        raise HTTPException(409, f"reload failed, still serving the previous versions: {exc}") from None
    return ReloadResponse(changed=changed, models=svc.loader.ready().versions())


@router.post("/admin/rollback", response_model=ReloadResponse, responses={**ADMIN_ERRORS, **ERRORS})
async def rollback(body: RollbackRequest, svc: Svc, life: Life) -> Any:
    try:
        changed = await life.rollback(body.model, body.alias, body.reason)
    except registry.RegistryError as exc:
        raise HTTPException(409, str(exc)) from None
    return ReloadResponse(changed=changed, models=ready_snapshot(svc).versions())


@router.get("/admin/canary", responses=ADMIN_ERRORS)
async def canary(svc: Svc) -> dict[str, Any]:
    return svc.canary.stats()
