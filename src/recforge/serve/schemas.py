"""The HTTP wire format (pydantic), kept apart from the internal types the server computes with.

Ids are JSON integers (64-bit) or non-empty strings and keep their JSON type end to end: an id sent
as 42 is logged and exported as an int64, "u42" as a string. Static bounds live here; bounds that
depend on settings (k, number of item ids) are checked in the routes, with the same 422 shape.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

# Integer ids must be JSON-safe (|id| <= 2**53, what every JSON parser keeps exact); larger ids go as strings.
INT64_MIN, INT64_MAX = -(2**53), 2**53
# Unix seconds accepted for an event: 1970 .. 2100.
MAX_TIMESTAMP = 4_102_444_800



def _json_integer(value: Any) -> Any:
    """JSON integers as JSON Schema defines them: 5.0 is the integer 5, true is not an integer."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= INT64_MAX:
        return int(value)
    return value


def json_int(ge: int, le: int) -> Any:
    """A bounded JSON integer (the bounds must sit before the validator for the schema to show them)."""
    return Annotated[StrictInt, Field(ge=ge, le=le), BeforeValidator(_json_integer)]

Id = Annotated[Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)] | Annotated[StrictStr, Field(
    min_length=1, max_length=256)], BeforeValidator(_json_integer)]
ContextValue = Annotated[Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)] | Annotated[StrictStr, Field(
    max_length=256)] | Annotated[StrictFloat, Field(allow_inf_nan=False)], BeforeValidator(_json_integer)]
Context = Annotated[dict[Annotated[str, Field(min_length=1, max_length=64)], ContextValue], Field(max_length=32)]
Name = Annotated[str, Field(min_length=1, max_length=128)]


class _Wire(BaseModel):
    # Strict: a JSON boolean or string is not silently taken for a number (nor the reverse).
    model_config = ConfigDict(extra="forbid", strict=True)


class RecommendRequest(_Wire):
    user_id: Id
    context: Context = Field(default_factory=dict)
    k: json_int(1, 1000) | None = Field(None, description="Items to return.")
    exclude_seen: StrictBool = True


_RecommendRequest = RecommendRequest


def bounded_recommend_request(max_k: int) -> type[RecommendRequest]:
    """The request model with the server's own k limit, so the published schema states the real bound."""

    class RecommendRequest(_RecommendRequest):
        k: json_int(1, max_k) | None = Field(None, description=f"Items to return (1..{max_k}).")

    return RecommendRequest


def bounded_score_request(max_item_ids: int) -> type[ScoreRequest]:
    class ScoreRequest(_ScoreRequest):
        item_ids: Annotated[list[Id], Field(max_length=max_item_ids)]

    return ScoreRequest


class ScoredItem(BaseModel):
    item_id: Id
    score: float = Field(description="Ranker click probability (sigmoid of the logit).")


class RecommendedItem(ScoredItem):
    retrieval_score: float | None = None


class ModelVersions(BaseModel):
    retrieval: int | None = None
    ranker: int | None = None


class RecommendResponse(BaseModel):
    request_id: str
    user_id: Id
    items: list[RecommendedItem]
    cold_start: bool
    model_versions: ModelVersions
    model_version: str = Field(description="The versions as one string, to send back with events.")
    assignments: dict[str, str]
    canary: bool
    degraded: bool = Field(False, description="Answered without the user's online state (recent items and "
                           "clicks): the shared state store could not be read. exclude_seen did not apply.")


class ScoreRequest(_Wire):
    user_id: Id
    item_ids: Annotated[list[Id], Field(max_length=100_000)]
    context: Context = Field(default_factory=dict)


_ScoreRequest = ScoreRequest


class ScoreResponse(BaseModel):
    request_id: str
    scores: list[ScoredItem]
    unknown_items: list[Id]
    model_versions: ModelVersions
    model_version: str
    assignments: dict[str, str]
    canary: bool


class Event(_Wire):
    type: Literal["impression", "click"]
    request_id: Name
    user_id: Id
    item_id: Id
    position: json_int(0, 100_000)
    timestamp: Annotated[float, Field(ge=0, le=MAX_TIMESTAMP, allow_inf_nan=False)] | None = None
    context: Context | None = None
    assignments: Annotated[dict[Name, Name], Field(max_length=64)] | None = None
    model_version: Annotated[str, Field(max_length=256)] | None = None
    event_id: Name | None = Field(None, description="The client's id of this event: a batch retried after a "
                                  "timeout stores each event with an id once (within the server's event_id_ttl_s).")


class EventsRequest(_Wire):
    events: Annotated[list[Event], Field(min_length=1, max_length=1000)]


class EventsResponse(BaseModel):
    accepted: int
    stored_total: int


class VariantSpec(_Wire):
    name: Name
    weight: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)]
    ranker: Name | None = Field(None, description="Registry version number or alias of the ranker.")
    retrieval: Name | None = Field(None, description="Registry version number or alias of the retrieval model.")


class ExperimentSpec(_Wire):
    name: Name
    salt: Name
    variants: Annotated[list[VariantSpec], Field(min_length=1, max_length=32)]


class ExperimentsBody(_Wire):
    experiments: Annotated[list[ExperimentSpec], Field(max_length=64)]


class RollbackRequest(_Wire):
    model: Literal["ranker", "retrieval"]
    alias: Literal["production", "canary"] = "production"
    reason: Annotated[str, Field(max_length=1000)] = "manual rollback via /admin/rollback"


class Health(BaseModel):
    status: str


class WorkerStatus(BaseModel):
    pid: int
    accepting: bool
    models: dict[str, dict[str, int | None]] | None = None


class Ready(BaseModel):
    """Anyone gets `status`; the versions and (with several workers) each worker's state need the admin token."""

    status: str
    models: dict[str, dict[str, int | None]] | None = None
    workers_expected: int | None = None
    workers: list[WorkerStatus] | None = None


class ReloadResponse(BaseModel):
    changed: bool
    models: dict[str, dict[str, int | None]]


class ErrorResponse(BaseModel):
    detail: str
