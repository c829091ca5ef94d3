"""The server's online plane: accepted events go to an events sink, and what users did goes to a
user-state store; this keeps the two consistent and says when events cannot be stored.

`EventSink` is what the server needs of an event log: the SQLite store in `events.py` (one file
shared by the workers of one machine), or the Redis stream of `redis_state.py` (shared by every
replica). With SQLite the user state is this process's memory, rebuilt from the sink at start, and
with several workers each one reads on from its cursor what the others stored, so exclude_seen and
histories hold whichever worker took an event. With Redis (`sink.remote`) the user state lives in
Redis too, updated by the same atomic append, so there is nothing to rebuild or follow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from recforge.serve.events import EventStoreFull, StoredEvent
from recforge.serve.inference import RawId
from recforge.serve.telemetry import ServeMetrics
from recforge.serve.user_state import SeenEvent, UserStateStore

log = logging.getLogger("recforge.serve")


class EventSink(Protocol):
    # True for a store other machines write too (Redis): its health is asked on every readiness probe,
    # and the user state lives there as well, kept by append itself.
    remote: bool

    def append(self, events: Sequence[StoredEvent]) -> list[int]:
        """Store events durably before returning; the indexes of those newly stored (a retried event_id is
        stored once). Raises EventStoreFull when they cannot be stored."""

    def probe(self) -> None:
        """A real write that stores nothing: raises EventStoreFull while writes still fail."""

    def last_id(self) -> int:
        """Id of the newest stored event (0 when none): a cursor to read on from."""

    def since(self, after_id: int) -> tuple[list[SeenEvent], int]:
        """Events stored after a cursor (by any writer), and the new cursor."""

    def recent(self, limit: int, upto_id: int | None = None) -> list[SeenEvent]:
        """The newest `limit` events up to a cursor, oldest first."""

    def close(self) -> None: ...


class OnlineState:
    """One process's view of the sink and the user state. Every method but `read_user` (on the event loop)
    runs in the events thread."""

    def __init__(self, sink: EventSink, users: UserStateStore, metrics: ServeMetrics, shared: bool,
                 warm_events: int) -> None:
        self.sink = sink
        self.users = users
        self.metrics = metrics
        # Several writers (workers) share the sink: learn of their events by reading on from a cursor.
        self.shared = shared
        # Why the last batch could not be stored (disk full), until a write succeeds again: /readyz fails meanwhile.
        self.error: str | None = None
        self._cursor = sink.last_id()
        self.total = self._cursor
        users.add(sink.recent(warm_events, self._cursor))
        self._degraded_logged = float("-inf")

    async def read_user(self, user_id: RawId, request_id: str, history_length: int
                        ) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
        """(shown, clicked, degraded), with what the request is served with logged under request_id in the same
        call. A user state that cannot be read (Redis down) is served as none, so the request still answers
        (from what the models know without it), marked degraded; its served record is not logged then
        (counted in recforge_served_unrecorded_total)."""
        try:
            seen, clicked = await self.users.get(user_id, request_id, history_length)
        except Exception as exc:  # noqa: BLE001 - any failure of the store: answer without it
            self.metrics.degraded.inc()
            self.metrics.served_unrecorded.inc()
            now = time.monotonic()
            if now - self._degraded_logged >= 30.0:  # once per 30 s, not once per request, while it lasts
                log.warning("user state unreadable, serving without users' histories: %s", exc)
                self._degraded_logged = now
            return (), (), True
        return seen, clicked, False

    def store(self, events: Sequence[StoredEvent], seen: Sequence[SeenEvent]) -> int:
        """Durable first, then remembered for exclude_seen. Returns the number of events stored (by every
        worker)."""
        try:
            fresh = self.sink.append(events)
        except EventStoreFull as exc:
            self.error = str(exc)
            self.metrics.event_write_failures.inc()
            log.error("events not stored (answered 503): %s", exc)
            raise
        self.error = None
        if self.shared:
            self.sync()  # reads this batch back in order with whatever the other workers stored meanwhile
        elif self.sink.remote:
            self.total = self._cursor = self.sink.last_id()
        else:
            self.total += len(fresh)
            self._cursor = self.total
            self.users.add([seen[i] for i in fresh])
        for type_ in ("impression", "click"):
            count = sum(1 for i in fresh if events[i].type == type_)
            if count:
                self.metrics.events.labels(type_).inc(count)
        return self.total

    def unwritable(self) -> str | None:
        """Why events cannot be stored now, or None. After a failed write it tries a real write each time it
        is asked, so readiness recovers by itself once space is freed. A remote store is asked every time:
        it can fail (Redis down) while this process writes nothing."""
        if self.error is not None or self.sink.remote:
            try:
                self.sink.probe()
            except EventStoreFull as exc:
                self.error = str(exc)
            else:
                if self.error is not None:
                    log.info("the event store takes writes again")
                self.error = None
        return self.error

    def sync(self) -> None:
        """Remember the events stored since the last call by any worker (all of them write the same sink)."""
        rows, self._cursor = self.sink.since(self._cursor)
        self.users.add(rows)
        self.total = max(self.total, self._cursor)

    def close(self) -> None:
        self.sink.close()


def plain(value: Any) -> Any:
    """A numpy scalar as the Python value JSON and SQLite take."""
    return value.item() if hasattr(value, "item") else value

