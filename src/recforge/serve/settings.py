"""Server settings: read once at startup (defaults < RECFORGE_SERVE_* environment < command-line flags).

Everything the server can be tuned with lives here, typed and frozen, so a route never reads the
environment and a test can build a server from one explicit object.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from recforge.config import Strict

ENV_PREFIX = "RECFORGE_SERVE_"
ADMIN_TOKEN_ENV = "RECFORGE_ADMIN_TOKEN"
# A file holding the token (a mounted secret), for deployments that keep secrets out of the environment.
ADMIN_TOKEN_FILE_ENV = "RECFORGE_ADMIN_TOKEN_FILE"
# Who may read a route that describes the server: nobody (404), admin-token holders (401 otherwise), anyone.
Exposure = Literal["off", "admin", "public"]


def admin_token_from(env: Mapping[str, str]) -> str | None:
    """The admin token from the environment or the file it names, stripped; never from flags or --set.

    A flag would show the token in `ps`. A file written by `echo` ends in a newline that a client
    never sends, so both sides are stripped; an empty or blank token would switch admin on with a
    secret anyone can guess, so it is refused.
    """
    inline, path = env.get(ADMIN_TOKEN_ENV), env.get(ADMIN_TOKEN_FILE_ENV)
    if inline is not None and path is not None:
        raise ValueError(f"set {ADMIN_TOKEN_ENV} or {ADMIN_TOKEN_FILE_ENV}, not both")
    if path is not None:
        try:
            inline = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{ADMIN_TOKEN_FILE_ENV}={path}: cannot read the admin token ({exc})") from None
    if inline is None:
        return None
    token = inline.strip()
    if not token:
        where = f"the file {path}" if path is not None else ADMIN_TOKEN_ENV
        raise ValueError(f"the admin token in {where} is empty or blank; set a real secret or unset it")
    return token


class ServeSettings(Strict):
    """How one server process loads, routes, limits and watches its models."""

    registry: str = Field(..., description="Registry root the models are resolved from.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    retrieval_model: str = "retrieval"
    ranker_model: str = "ranker"
    alias: str = "production"
    experiments: Path | None = None
    events_dir: Path = Path("serve-events")
    # Where accepted events, users' recent items and canary windows live: "local" (a SQLite file in events_dir
    # and this process's memory: one machine) or redis://HOST:PORT/DB (rediss:// for TLS), shared by every
    # replica (docs/online-state.md). Credentials come from RECFORGE_REDIS_* variables, never from this URL.
    state: str = "local"
    # Key prefix in that Redis: deployments (or tests) sharing one Redis keep apart by it.
    redis_prefix: str = Field("recforge", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    # How long a stored event_id is remembered, so a retry within it stores the event once.
    event_id_ttl_s: int = Field(86_400, ge=1)
    # Users with no event for this long leave the shared state (their lists expire).
    user_state_ttl_s: int = Field(30 * 86_400, ge=0)
    # Acknowledge events only once this many Redis replicas have them (WAIT), or answer 503 after the timeout.
    redis_wait_replicas: int = Field(0, ge=0, le=16)
    redis_wait_timeout_ms: int = Field(500, ge=1)
    # Accepted event timestamps lie within [now - event_max_age_s, now + event_max_ahead_s] of the server's clock;
    # others are answered 422. A client clock years ahead would otherwise date events into a future that training
    # takes for the newest data. Replaying a recorded or simulated period: raise the bounds (inf: unbounded).
    event_max_ahead_s: float = Field(86_400.0, ge=0.0)
    event_max_age_s: float = Field(30 * 86_400.0, ge=0.0)
    # Retrieval candidates handed to the ranker per request.
    num_candidates: int = Field(200, ge=1, le=10_000)
    default_k: int = Field(10, ge=1)
    max_k: int = Field(100, ge=1, le=1000)
    max_item_ids: int = Field(1000, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    # Server processes sharing the port. One process runs its Python (HTTP, glue) on one core at a time
    # (the GIL), so on a multi-core machine throughput grows with workers; each loads its own copy of the
    # models. Workers share the events store and the experiments file, and follow each other's alias
    # moves, canary rollbacks and experiment changes on their registry poll (see serve/app.py).
    workers: int = Field(1, ge=1, le=64)
    # Model calls run in this many threads per worker (FAISS and torch release the GIL); each uses one core.
    # Unset: 2, or fewer when the workers would otherwise hold more model threads than the machine has cores
    # (2 workers on 2 cores: 1 each; measured in bench/serve_load.py, more threads only queue for the cores).
    model_threads: int = Field(2, ge=1, le=64)
    # Requests queued while a model call runs are merged into the next call, up to this many.
    max_batch: int = Field(64, ge=1, le=4096)
    # Follow registry aliases: re-resolve them every this many seconds (0 = only on POST /admin/reload).
    poll_interval_s: float = Field(10.0, ge=0.0)
    canary_share: float = Field(0.1, ge=0.0, le=1.0)
    canary_window_s: float = Field(60.0, gt=0.0)
    canary_min_requests: int = Field(20, ge=1)
    canary_max_error_rate: float = Field(0.05, ge=0.0, le=1.0)
    canary_max_p99_ms: float = Field(500.0, gt=0.0)
    # Items remembered per user (from accepted events) for exclude_seen and histories, and how many users.
    seen_per_user: int = Field(200, ge=0)
    seen_users: int = Field(100_000, ge=0)
    # "Log what you serve": each answered request's online features (the history the models read) are kept this
    # long (Redis) or for this many most recent requests (local), and stored with the impressions that name its
    # request_id (exported as served_history). An impression posted later than that is stored without them.
    served_ttl_s: int = Field(900, ge=1)
    served_records: int = Field(100_000, ge=0)
    # With several workers, how long the supervisor waits for a worker to answer its health ping before it kills
    # and replaces it. A worker loading its models on a busy machine can hold the interpreter for seconds, so
    # this stays well above the model loading time (uvicorn's own default, 5 s, killed loading workers).
    worker_healthcheck_timeout_s: int = Field(60, ge=1, le=3600)
    # /openapi.json, /docs and /redoc describe every route, the admin ones included; /metrics shows the model
    # versions and traffic. "admin" serves them to bearers of the admin token only; with no admin token
    # configured, "admin" is the same as "off" (nobody could present it). See docs/security.md.
    docs: Exposure = "admin"
    metrics: Exposure = "admin"
    log_level: str = "info"
    admin_token: str | None = Field(None, repr=False, description=f"From the {ADMIN_TOKEN_ENV} environment variable.")

    @field_validator("admin_token")
    @classmethod
    def _stripped_token(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("the admin token is empty or blank")
        return value.strip()

    @model_validator(mode="before")
    @classmethod
    def _share_cores(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("model_threads") is None:
            try:
                workers = max(1, int(data.get("workers") or 1))
            except (TypeError, ValueError):
                return data  # the field validation reports the bad value
            data = {**data, "model_threads": min(2, max(1, (os.cpu_count() or 1) // workers))}
        return data

    @field_validator("state")
    @classmethod
    def _known_state(cls, value: str) -> str:
        if value == "local" or value.startswith(("redis://", "rediss://")):
            if "@" in value:
                raise ValueError("credentials in the state URL would show in `ps`; set RECFORGE_REDIS_USERNAME "
                                 "and RECFORGE_REDIS_PASSWORD (or RECFORGE_REDIS_PASSWORD_FILE) instead")
            return value
        raise ValueError(f"{value!r}: expected local or redis://HOST:PORT/DB (rediss:// for TLS)")

    @field_validator("poll_interval_s")
    @classmethod
    def _workers_follow_each_other(cls, value: float, info: ValidationInfo) -> float:
        workers = info.data.get("workers", 1)
        if workers > 1 and value == 0:
            raise ValueError(f"must be > 0 with workers={workers}: each worker learns of alias moves, canary "
                             "rollbacks and experiment changes made through another worker on its poll")
        return value

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
             ) -> ServeSettings:
        """Defaults, then RECFORGE_SERVE_<FIELD> variables, then `overrides` whose value is not None.

        Unknown RECFORGE_SERVE_* variables are errors (a typo must not be silently ignored).
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        fields = set(cls.model_fields) - {"admin_token"}
        unknown = []
        for key, value in env.items():
            if key.startswith(ENV_PREFIX):
                name = key[len(ENV_PREFIX):].lower()
                if name in fields:
                    values[name] = value
                else:
                    unknown.append(key)
        if unknown:
            raise ValueError(f"unknown serve setting(s) in the environment: {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(ENV_PREFIX + f.upper() for f in sorted(fields))}")
        if (overrides or {}).get("admin_token") is not None:
            raise ValueError(f"admin_token cannot be given as a flag or --set (it would show in `ps`); "
                             f"set {ADMIN_TOKEN_ENV} or {ADMIN_TOKEN_FILE_ENV}")
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        token = admin_token_from(env)
        if token is not None:
            values["admin_token"] = token
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"invalid serve settings: {problems}") from None
