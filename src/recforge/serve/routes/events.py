"""/v1/events: impressions and clicks in, acknowledged only once stored durably."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.exceptions import RequestValidationError

from recforge.serve.events import EventStoreFull
from recforge.serve.routes.deps import ERRORS, Svc
from recforge.serve.schemas import EventsRequest, EventsResponse
from recforge.serve.service import EventTimesRejected

router = APIRouter()


@router.post("/v1/events", response_model=EventsResponse, responses=ERRORS)
async def events(body: EventsRequest, svc: Svc) -> EventsResponse:
    try:
        total = await svc.store_events(body.events)
    except EventTimesRejected as exc:  # a batch with one bad time is refused whole, naming each field
        raise RequestValidationError([{"type": "value_error", "loc": ("body", "events", i, "timestamp"), "msg": why}
                                      for i, why in exc.problems]) from None
    except EventStoreFull as exc:
        raise HTTPException(503, f"events not stored: {exc.public}", headers={"Retry-After": "5"}) from None
    return EventsResponse(accepted=len(body.events), stored_total=total)
