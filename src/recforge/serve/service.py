"""The serving state behind the HTTP routes, composed of parts that each own one thing.

`Loader` owns the loaded versions (snapshot, reload, registry moves), `CanaryGuard` the canary
windows and the rollback decision, `OnlineState` the events sink and the user-state store,
`routing` (pure) which versions serve a user, and `ModelWork` the model threads. `Service` is what a
route calls: one method per request kind, which records the request's metrics and canary outcome
and raises the errors the route turns into status codes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from recforge import registry
from recforge.serve.canary import CanaryGuard, CanaryThresholds
from recforge.serve.events import EventStore, EventStoreFull, encode_event, timestamp_problem
from recforge.serve.experiment_config import experiments_from
from recforge.serve.inference import Query, RawId
from recforge.serve.loading import Loader, Snapshot
from recforge.serve.model_work import Job, ModelWork, Served
from recforge.serve.online import OnlineState, plain
from recforge.serve.routing import Route, route_user
from recforge.serve.settings import ServeSettings
from recforge.serve.telemetry import ServeMetrics
from recforge.serve.user_state import MemoryUserState

log = logging.getLogger("recforge.serve")


class EventTimesRejected(ValueError):
    """Events whose timestamps lie outside the accepted window: (index in the batch, why) for each."""

    def __init__(self, problems: list[tuple[int, str]]) -> None:
        super().__init__("; ".join(f"event {i}: {why}" for i, why in problems))
        self.problems = problems


class Service:
    """The parts of one server process, and the operations the routes call."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.metrics = ServeMetrics()
        self.online, self.canary = open_online(settings, self.metrics)
        self.loader = Loader(settings, self.metrics, self.canary.is_banned)
        self.work = ModelWork(settings.model_threads, settings.max_batch, settings.num_candidates, self.metrics)
        # The events sink and the user state are touched from this one thread only, in arrival order.
        self.events_executor = ThreadPoolExecutor(1, thread_name_prefix="recforge-events")
        self._background: set[asyncio.Future[Any]] = set()

    def spawn(self, work: Awaitable[Any]) -> None:
        """Run `work` in the background of the event loop, kept referenced until it ends."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def route(self, snapshot: Snapshot, user_id: RawId) -> Route:
        return route_user(snapshot, user_id, self.loader.model_names, self.settings.canary_share,
                          self.canary.is_banned)

    async def recommend(self, user_id: RawId, context: dict[str, Any] | None, k: int | None,
                        exclude_seen: bool) -> Served:
        """Top-k for one user, micro-batched with concurrent requests. Raises NotReady or ModelError."""
        started = time.perf_counter()
        snapshot = self.loader.ready()
        route = self.route(snapshot, user_id)
        request_id = uuid.uuid4().hex
        seen, clicked, degraded = await self.online.read_user(user_id, request_id, history_length(snapshot, route))
        query = Query(user_id, context, k or min(self.settings.default_k, self.settings.max_k), exclude_seen, seen,
                      clicked)
        try:
            served = await self.work.batcher.submit(Job(query, route, snapshot))
        except Exception:
            self.finish("recommend", route, 500, started)
            raise
        self.finish("recommend", route, 200, started, served.canary_failed)
        if served.result.cold_start:
            self.metrics.cold_start.inc()
        return dataclasses.replace(served, degraded=degraded, request_id=request_id)

    async def score(self, user_id: RawId, context: dict[str, Any] | None, item_ids: Sequence[RawId]
                    ) -> tuple[str, list[RawId], list[float], list[RawId], Route]:
        """The ranker's scores of given items for one user: (request id, ids, scores, unknown ids, the route)."""
        started = time.perf_counter()
        snapshot = self.loader.ready()
        route = self.route(snapshot, user_id)
        request_id = uuid.uuid4().hex
        seen, clicked, degraded = await self.online.read_user(user_id, request_id, history_length(snapshot, route))
        query = Query(user_id, context, 1, False, seen, clicked)
        try:
            ids, scores, unknown, used, failed = await asyncio.get_running_loop().run_in_executor(
                self.work.executor, self.work.score, snapshot, route, query, item_ids)
        except Exception:
            self.finish("score", route, 500, started)
            raise
        self.finish("score", route, 200, started, failed)
        return request_id, ids, scores, unknown, used

    async def store_events(self, events: Sequence[Any]) -> int:
        """Validate the batch's times, store it durably, remember it per user; the number of events stored (by
        every worker). Raises EventTimesRejected (nothing stored) or EventStoreFull."""
        started, now = time.perf_counter(), time.time()
        late = [(i, problem) for i, e in enumerate(events) if e.timestamp is not None and (problem := timestamp_problem(
            e.timestamp, now, self.settings.event_max_ahead_s, self.settings.event_max_age_s))]
        if late:
            raise EventTimesRejected(late)
        snapshot = self.loader.snapshot
        features = (item_features(snapshot, [e.item_id for e in events]) if snapshot is not None
                    else [{} for _ in events])
        stored = [encode_event(e.type, e.request_id, e.user_id, e.item_id, e.position,
                               now if e.timestamp is None else e.timestamp, e.context, e.assignments,
                               e.model_version, f if e.type == "impression" else None, e.event_id,
                               self.online.users.served(e.request_id) if e.type == "impression" else None)
                  for e, f in zip(events, features, strict=True)]
        seen = [(e.type, e.user_id, e.item_id) for e in events]
        try:
            total = await asyncio.get_running_loop().run_in_executor(self.events_executor, self.online.store,
                                                                     stored, seen)
        except EventStoreFull:
            self.metrics.requests.labels("events", "default", "503").inc()
            raise
        self.metrics.requests.labels("events", "default", "200").inc()
        self.metrics.latency.labels("events", "default").observe(time.perf_counter() - started)
        return total

    def finish(self, route_name: str, route: Route, status: int, started: float, canary_failed: bool = False) -> None:
        """A request's metrics, and its canary outcome: a breach starts the rollback in the background."""
        latency = time.perf_counter() - started
        self.metrics.requests.labels(route_name, route.variant, str(status)).inc()
        self.metrics.latency.labels(route_name, route.variant).observe(latency)
        if not route.canary:
            return
        canaries = [(kind, route.retrieval if kind == "retrieval" else route.ranker) for kind in route.canary]
        for kind, version, reason in self.canary.observe(canaries, status < 500 and not canary_failed, latency):
            self.spawn(asyncio.get_running_loop().run_in_executor(None, self.rollback_canary, kind, version, reason))

    def rollback_canary(self, kind: str, version: int, reason: str) -> dict[str, Any] | None:
        """Move the registry's canary alias off `version` (recording why), then reload. Runs in a thread."""
        name = self.loader.model_names[kind]
        why = f"automatic canary rollback of {name} v{version}: {reason}"
        record = None
        try:
            record = self.loader.withdraw_canary(kind, version, why)
            self.metrics.canary_rollbacks.labels(kind).inc()
            log.error("%s", why)
        except (registry.RegistryError, OSError) as exc:
            log.error("canary rollback of %s v%d failed in the registry (%s); it stays out of rotation here",
                      name, version, exc)
        finally:
            self.canary.rolled_back(kind, version)
        try:
            self.loader.reload()
        except Exception as exc:  # the breach is handled; a failed reload is reported by its own metric
            log.error("reload after canary rollback failed: %s", exc)
        return record

    async def set_experiments(self, body: dict[str, Any]) -> None:
        """Swap the running experiments. Raises ConfigRejected (an unknown ref) or ValueError (contradictory)."""
        experiments = experiments_from(body)
        await asyncio.get_running_loop().run_in_executor(None, self.loader.set_experiments, experiments)

    def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        self.work.close()
        self.events_executor.shutdown(wait=True)
        self.online.close()


def open_online(settings: ServeSettings, metrics: ServeMetrics) -> tuple[OnlineState, CanaryGuard]:
    """The events sink, the user state and the canary guard of `settings.state`: this machine's SQLite file
    and memory (`local`), or one Redis every replica shares (`redis://`)."""
    thresholds = CanaryThresholds(settings.canary_window_s, settings.canary_min_requests,
                                  settings.canary_max_error_rate, settings.canary_max_p99_ms)
    if settings.state == "local":
        users = MemoryUserState(settings.seen_per_user, settings.seen_users, settings.served_records)
        online = OnlineState(EventStore(settings.events_dir), users, metrics, shared=settings.workers > 1,
                             warm_events=min(1_000_000, settings.seen_per_user * settings.seen_users))
        return online, CanaryGuard(thresholds)
    from recforge.serve.redis_state import open_plane

    plane = open_plane(settings, metrics)
    return (OnlineState(plane.events, plane.users, metrics, shared=False, warm_events=0),
            CanaryGuard(thresholds, shared=plane.canary))


def item_features(snapshot: Snapshot, item_ids: Sequence[RawId]) -> list[dict[str, Any]]:
    """Item-side raw features from the production retrieval catalog, as stored with each impression."""
    model = snapshot.model("retrieval", snapshot.production["retrieval"])
    rows = np.asarray(model.item_vocab.lookup([str(i) for i in item_ids]), dtype=np.int64)
    values = model.feature_values(rows)
    return [{} if row == 0 else {name: plain(col[j]) for name, col in values.items()} for j, row in enumerate(rows)]


def history_length(snapshot: Snapshot, route: Route) -> int:
    """The longest history the route's models read: what a request's served record keeps of the clicks."""
    return max((model.history_length for key in (("retrieval", route.retrieval), ("ranker", route.ranker))
                if (model := snapshot.models.get(key)) is not None), default=0)
