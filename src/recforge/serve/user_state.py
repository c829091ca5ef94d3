"""Per-user online state: the items a user was recently shown and clicked, for exclude_seen and histories.

`UserStateStore` is what the server needs of such a store; `MemoryUserState` keeps it in this
process (bounded, least recently active users dropped first); `redis_state.RedisUserState` keeps it in
the Redis every replica shares. `get` is a coroutine because it runs on the event loop once per
request: a remote store must not block the loop while it waits on the network.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Protocol

from recforge.serve.inference import RawId

# (event type, user id, item id) of an accepted event.
SeenEvent = tuple[str, RawId, RawId]


class UserStateStore(Protocol):
    def add(self, events: Sequence[SeenEvent]) -> None:
        """Remember accepted events, oldest first."""

    async def get(self, user: RawId, request_id: str = "", history_length: int = 0
                  ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(items recently shown, items recently clicked) of a user, oldest first; empty when unknown. With a
        request_id, also logs what that request is served with (served_record of the last history_length
        clicks) for the impressions that will name it, in the same call. Raises when the store cannot be read
        (the caller serves without the history, marked degraded)."""

    def served(self, request_id: str) -> str | None:
        """The served record to store with an impression of `request_id` in this process, or None: unknown
        (expired, another process served it) or attached by the store itself (Redis, in its append script)."""


class MemoryUserState:
    """Bounded per-user memory of items from accepted events: what to exclude, and the click history."""

    def __init__(self, per_user: int, users: int, served_records: int = 100_000) -> None:
        self.per_user = per_user
        self.users = users
        self.served_records = served_records
        self._data: OrderedDict[str, tuple[deque[str], deque[str]]] = OrderedDict()
        self._served: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, events: Sequence[SeenEvent]) -> None:
        if not self.per_user or not self.users:
            return
        with self._lock:
            for type_, user, item in events:
                key = str(user)
                entry = self._data.get(key)
                if entry is None:
                    entry = self._data[key] = (deque(maxlen=self.per_user), deque(maxlen=self.per_user))
                else:
                    self._data.move_to_end(key)
                entry[0].append(str(item))
                if type_ == "click":
                    entry[1].append(str(item))
            while len(self._data) > self.users:
                self._data.popitem(last=False)

    async def get(self, user: RawId, request_id: str = "", history_length: int = 0
                  ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        with self._lock:
            entry = self._data.get(str(user))
            shown, clicked = (tuple(entry[0]), tuple(entry[1])) if entry else ((), ())
            if request_id and self.served_records:
                self._served[request_id] = served_record(clicked[-history_length:] if history_length else ())
                while len(self._served) > self.served_records:
                    self._served.popitem(last=False)
            return shown, clicked

    def served(self, request_id: str) -> str | None:
        with self._lock:
            return self._served.get(request_id)


def served_record(history: Sequence[str]) -> str:
    """What an impression stores as `served`: the raw item ids of the history the models read (the user's last
    clicks, cut to the longest history_length among the request's models). Only a read that succeeded writes
    one, so a degraded answer leaves its impressions without a record (served_history null)."""
    return json.dumps({"history": list(history)}, separators=(",", ":"))
