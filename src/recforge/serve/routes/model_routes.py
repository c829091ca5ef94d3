"""The model routes: /v1/recommend and /v1/score."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

from recforge.serve.inference import ModelError
from recforge.serve.loading import NotReady
from recforge.serve.routes.deps import ERRORS, MODELS_NOT_LOADED, Svc, json_content
from recforge.serve.schemas import (
    RecommendRequest,
    RecommendResponse,
    ScoreRequest,
    ScoreResponse,
    bounded_recommend_request,
    bounded_score_request,
)
from recforge.serve.settings import ServeSettings


def router(settings: ServeSettings) -> APIRouter:
    routes = APIRouter()

    async def recommend(body: RecommendRequest, svc: Svc) -> Any:
        try:
            served = await svc.recommend(body.user_id, body.context, body.k, body.exclude_seen)
        except NotReady:
            raise HTTPException(503, MODELS_NOT_LOADED) from None
        except ModelError as exc:
            raise HTTPException(500, str(exc)) from None
        result, used = served.result, served.route
        # RecommendResponse's fields, serialized straight from the computed values (see json_content).
        return json_content({
            "request_id": served.request_id, "user_id": body.user_id,
            "items": [{"item_id": i, "score": s, "retrieval_score": r} for i, s, r in
                      zip(result.items, result.scores, result.retrieval_scores, strict=True)],
            "cold_start": result.cold_start, "model_versions": {"retrieval": used.retrieval, "ranker": used.ranker},
            "model_version": used.model_version, "assignments": used.assignments, "canary": bool(used.canary),
            "degraded": served.degraded})

    async def score(body: ScoreRequest, svc: Svc) -> Any:
        try:
            request_id, ids, scores, unknown, used = await svc.score(body.user_id, body.context, body.item_ids)
        except NotReady:
            raise HTTPException(503, MODELS_NOT_LOADED) from None
        except ModelError as exc:
            raise HTTPException(500, str(exc)) from None
        # ScoreResponse's fields (see json_content).
        return json_content({
            "request_id": request_id,
            "scores": [{"item_id": i, "score": s} for i, s in zip(ids, scores, strict=True)],
            "unknown_items": unknown, "model_versions": {"retrieval": used.retrieval, "ranker": used.ranker},
            "model_version": used.model_version, "assignments": used.assignments, "canary": bool(used.canary)})

    # The request models carry this server's limits (k, item_ids), so a too-large value is a 422 naming the field
    # and the published schema states the bound.
    recommend.__annotations__["body"] = bounded_recommend_request(settings.max_k)
    score.__annotations__["body"] = bounded_score_request(settings.max_item_ids)
    routes.post("/v1/recommend", response_model=RecommendResponse, responses=ERRORS)(recommend)
    routes.post("/v1/score", response_model=ScoreResponse, responses=ERRORS)(score)
    return routes
