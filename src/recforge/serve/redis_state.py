"""The online plane on Redis (`serve --state redis://HOST:PORT/DB`): one event stream, one user state and
one canary board shared by every server replica.

Why one Redis and not each replica's own SQLite file and memory: behind a load balancer a user's next
request lands on any replica, and a history that only the replica which took the click remembers is
training/serving skew for every model that reads histories and for exclude_seen. Here every accepted
event goes, in one server-side script (atomic: all of it or none of it), to

  {prefix}:events               a Redis Stream: the one log of every replica's accepted events
  {prefix}:u:{user}:shown       the user's recently shown items, capped at seen_per_user, oldest first
  {prefix}:u:{user}:clicked     the user's recently clicked items, the same way
  {prefix}:eid:{event_id}       a marker that makes a retried event (same event_id) a no-op, kept event_id_ttl_s
  {prefix}:events:total         the number of events stored by every replica

and the HTTP 200 goes out only after the script returned, which with `appendonly yes` and
`appendfsync always` means Redis has written it to its append-only file and fsynced it; with
redis_wait_replicas > 0, also only after WAIT saw that many replicas take it (docs/online-state.md).

Keys are not declared per script call, so this runs on a standalone Redis (with replicas, or a
Sentinel-managed primary), not on Redis Cluster.

Credentials and TLS come from the environment (never the URL: a URL is a flag, and flags show in `ps`):
RECFORGE_REDIS_USERNAME, RECFORGE_REDIS_PASSWORD (or RECFORGE_REDIS_PASSWORD_FILE, a mounted secret),
and for rediss:// URLs RECFORGE_REDIS_TLS_CA_FILE, RECFORGE_REDIS_TLS_CERT_FILE, RECFORGE_REDIS_TLS_KEY_FILE.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio

from recforge.serve.canary import CanaryStats, CanaryThresholds, breach_reason, window_stats
from recforge.serve.events import EventStoreFull, StoredEvent
from recforge.serve.inference import RawId
from recforge.serve.telemetry import ServeMetrics
from recforge.serve.user_state import SeenEvent

log = logging.getLogger("recforge.serve")

USERNAME_ENV = "RECFORGE_REDIS_USERNAME"
PASSWORD_ENV = "RECFORGE_REDIS_PASSWORD"
PASSWORD_FILE_ENV = "RECFORGE_REDIS_PASSWORD_FILE"
TLS_ENV = {"ssl_ca_certs": "RECFORGE_REDIS_TLS_CA_FILE", "ssl_certfile": "RECFORGE_REDIS_TLS_CERT_FILE",
           "ssl_keyfile": "RECFORGE_REDIS_TLS_KEY_FILE"}


class RedisUnavailable(EventStoreFull):
    """Redis did not take the write (unreachable, out of memory, its append-only file failing, replicas not
    acknowledging in time): nothing the client may count on was stored, it is answered 503 and retried."""

    public = "the shared event store (Redis) did not take them; retry later with the same event_id"


def is_redis_url(state: str) -> bool:
    return state.startswith(("redis://", "rediss://"))


def connection_options(url: str, env: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments for redis.Redis.from_url: the URL's host, port and db, the environment's secrets.

    A URL carrying a password is refused (it would be on a command line or in a settings dump); TLS file
    settings without a rediss:// URL are refused too (they would silently not be used).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"state {url!r}: expected redis://HOST:PORT/DB or rediss://HOST:PORT/DB")
    if parts.password is not None or parts.username is not None:
        raise ValueError(f"state {url.split('@')[-1]!r}: credentials in the URL would show in `ps`; set "
                         f"{USERNAME_ENV} and {PASSWORD_ENV} (or {PASSWORD_FILE_ENV}) instead")
    db = parts.path.strip("/") or "0"
    if not db.isdigit():
        raise ValueError(f"state {url!r}: the database must be a number (redis://HOST:PORT/0), not {db!r}")
    options: dict[str, Any] = {}
    password, path = env.get(PASSWORD_ENV), env.get(PASSWORD_FILE_ENV)
    if password is not None and path is not None:
        raise ValueError(f"set {PASSWORD_ENV} or {PASSWORD_FILE_ENV}, not both")
    if path is not None:
        try:
            password = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{PASSWORD_FILE_ENV}={path}: cannot read the Redis password ({exc})") from None
    if password:
        options["password"] = password
    if env.get(USERNAME_ENV):
        options["username"] = env[USERNAME_ENV]
    tls = {key: env[name] for key, name in TLS_ENV.items() if env.get(name)}
    if tls and parts.scheme != "rediss":
        raise ValueError(f"{', '.join(TLS_ENV[k] for k in tls)} set but state is {parts.scheme}://: use rediss://")
    options.update(tls)
    return options


# One call stores a batch: per event, skip it if its event_id was seen, else append it to the stream and to
# its user's capped lists. Returns {stored total, 1/0 per event}. A script runs atomically in Redis, so a
# replica killed mid-call leaves all of the batch or none of it. Besides the stored event (`event`), an entry
# carries its user, item, type and time as plain fields (what feature_store reads back without parsing), and
# an impression carries `served`: the features its request was served with (see record_served), when any.
_APPEND = """
local prefix, ttl, per_user, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local stream = prefix .. ':events'
local fresh = {}
local added = 0
for i = 0, n - 1 do
  local o = 5 + i * 7
  local event_id, user, item, kind = ARGV[o], ARGV[o + 1], ARGV[o + 2], ARGV[o + 3]
  local ts, request_id, body = ARGV[o + 4], ARGV[o + 5], ARGV[o + 6]
  local new = true
  if event_id ~= '' then
    new = redis.call('SET', prefix .. ':eid:' .. event_id, '1', 'NX', 'EX', ttl)
  end
  if new then
    local served = false
    if kind == 'impression' and request_id ~= '' then
      served = redis.call('GET', prefix .. ':served:' .. request_id)
    end
    if served then
      redis.call('XADD', stream, '*', 'event', body, 'user', user, 'item', item, 'kind', kind, 'ts', ts,
                 'served', served)
    else
      redis.call('XADD', stream, '*', 'event', body, 'user', user, 'item', item, 'kind', kind, 'ts', ts)
    end
    if per_user > 0 then
      local shown = prefix .. ':u:' .. user .. ':shown'
      redis.call('RPUSH', shown, item)
      redis.call('LTRIM', shown, -per_user, -1)
      if kind == 'click' then
        local clicked = prefix .. ':u:' .. user .. ':clicked'
        redis.call('RPUSH', clicked, item)
        redis.call('LTRIM', clicked, -per_user, -1)
      end
    end
    added = added + 1
    fresh[#fresh + 1] = 1
  else
    fresh[#fresh + 1] = 0
  end
end
return {redis.call('INCRBY', prefix .. ':events:total', added), fresh}
"""


# One call per batch of concurrent requests (see UserReads): per request, the user's two lists as one JSON
# string (one bulk reply to parse instead of hundreds of list items; cjson writes an empty list as {}), and,
# with a request id, the request's served record -- the last history_length clicks, as JSON that
# user_state.served_record would write -- kept served_ttl_s for the append script to attach to the request's
# impressions.
_READ = """
local prefix, ttl, count = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
for r = 0, count - 1 do
  local user, request_id, n = ARGV[4 + r * 3], ARGV[5 + r * 3], tonumber(ARGV[6 + r * 3])
  local shown = redis.call('LRANGE', prefix .. ':u:' .. user .. ':shown', 0, -1)
  local clicked = redis.call('LRANGE', prefix .. ':u:' .. user .. ':clicked', 0, -1)
  if request_id ~= '' then
    local history = {}
    for i = math.max(1, #clicked - n + 1), #clicked do history[#history + 1] = cjson.encode(clicked[i]) end
    redis.call('SET', prefix .. ':served:' .. request_id,
               '{"history":[' .. table.concat(history, ',') .. ']}', 'EX', ttl)
  end
  out[#out + 1] = cjson.encode({shown, clicked})
end
return out
"""


def user_key(user: RawId) -> str:
    """The user's part of a key: str() of the raw id, as the in-process state keys it (42 and "42" are one user)."""
    return str(user)


def event_body(event: StoredEvent, received: float) -> str:
    """One stream entry's `event` field: the stored event as JSON (ids and dicts already JSON text)."""
    return json.dumps({**event._asdict(), "received": received}, separators=(",", ":"))


@dataclass(frozen=True)
class RedisSettings:
    url: str
    prefix: str
    seen_per_user: int
    event_id_ttl_s: int
    wait_replicas: int
    wait_timeout_ms: int
    user_ttl_s: int
    options: Mapping[str, Any]
    served_ttl_s: int = 900


class RedisPlane:
    """The connections to the shared Redis: a blocking client for the events thread and the background loops,
    an asyncio client for the per-request reads on the event loop."""

    def __init__(self, settings: RedisSettings, metrics: ServeMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        common = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0, "health_check_interval": 10,
                  **settings.options}
        self.client = redis.Redis.from_url(settings.url, decode_responses=True, **common)
        self.aclient = redis.asyncio.Redis.from_url(settings.url, decode_responses=True, **common)
        self._append = self.client.register_script(_APPEND)
        self.read_script = self.aclient.register_script(_READ)
        self.events = EventsStream(self)
        self.users = RedisUserState(self)
        self.canary = RedisCanaryBoard(self)

    def key(self, *parts: str) -> str:
        return ":".join((self.settings.prefix, *parts))

    def timed(self, operation: str, call: Any, *args: Any) -> Any:
        """A blocking Redis call, its latency and failure in the metrics; errors pass through."""
        started = time.perf_counter()
        try:
            return call(*args)
        except redis.RedisError:
            self.metrics.redis_errors.labels(operation).inc()
            raise
        finally:
            self.metrics.redis_latency.labels(operation).observe(time.perf_counter() - started)

    def durability(self) -> str | None:
        """Why acknowledged events could be lost on a Redis crash (append-only file off or not fsynced per
        write), or None; None too when the server does not let CONFIG be read (managed services)."""
        try:
            config = self.client.config_get("append*")
        except redis.RedisError:
            return None
        if config.get("appendonly") != "yes" or config.get("appendfsync") != "always":
            return (f"Redis at {self.settings.url} runs appendonly={config.get('appendonly')} "
                    f"appendfsync={config.get('appendfsync')}: an acknowledged event can be lost if Redis dies; "
                    "set appendonly yes and appendfsync always (docs/online-state.md)")
        return None

    def close(self) -> None:
        self.client.close()


class EventsStream:
    """The EventSink on the shared stream (see online.EventSink)."""

    # The user lists live in Redis and the script keeps them: this sink has no per-process memory to warm.
    remote = True

    def __init__(self, plane: RedisPlane) -> None:
        self.plane = plane
        self._lock = threading.Lock()
        self._total = 0

    def append(self, events: Sequence[StoredEvent]) -> list[int]:
        s = self.plane.settings
        received = time.time()
        argv: list[Any] = [s.prefix, s.event_id_ttl_s, s.seen_per_user, len(events)]
        for event in events:
            argv += [event.event_id or "", user_key(json.loads(event.user_id)), str(json.loads(event.item_id)),
                     event.type, repr(float(event.timestamp)), event.request_id, event_body(event, received)]
        try:
            total, fresh = self.plane.timed("append", self.plane._append, [], argv)
            if s.user_ttl_s and s.seen_per_user:
                self._expire_users(events)
            if s.wait_replicas:
                acked = self.plane.timed("wait", self.plane.client.wait, s.wait_replicas, s.wait_timeout_ms)
                if acked < s.wait_replicas:
                    raise RedisUnavailable(
                        f"events stored on the Redis primary but only {acked} of {s.wait_replicas} replica(s) "
                        f"acknowledged them within {s.wait_timeout_ms} ms; retry with the same event_id")
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis at {s.url} did not store the events: {exc}") from exc
        with self._lock:
            self._total = int(total)
        return [i for i, new in enumerate(fresh) if int(new)]

    def _expire_users(self, events: Sequence[StoredEvent]) -> None:
        """Users who stop coming back leave Redis after user_ttl_s (their lists would otherwise stay forever)."""
        ttl = self.plane.settings.user_ttl_s
        pipe = self.plane.client.pipeline(transaction=False)
        for user in {user_key(json.loads(e.user_id)) for e in events}:
            pipe.expire(self.plane.key("u", user, "shown"), ttl)
            pipe.expire(self.plane.key("u", user, "clicked"), ttl)
        pipe.execute()

    def probe(self) -> None:
        """A real write (out of memory and a failing append-only file refuse writes, not PINGs)."""
        try:
            self.plane.timed("probe", self.plane.client.set, self.plane.key("probe"), "1", 5)
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis at {self.plane.settings.url} takes no writes: {exc}") from exc

    def last_id(self) -> int:
        """Events stored by every replica; 0 while Redis cannot be read (the next append sets it)."""
        with contextlib.suppress(redis.RedisError):
            self._total = int(self.plane.client.get(self.plane.key("events", "total")) or 0)
        return self._total

    def since(self, after_id: int) -> tuple[list[SeenEvent], int]:
        return [], self.last_id()

    def recent(self, limit: int, upto_id: int | None = None) -> list[SeenEvent]:
        return []

    def close(self) -> None:
        self.plane.close()


class UserReads:
    """The user reads of concurrent requests, coalesced into one script call per batch.

    Why: on a small host the Redis client's own work per command (pool checkout, packing, parsing) costs more
    CPU than the model's scoring, and it is paid by the same cores that serve. A read joins the batch being
    gathered; one batch is in flight at a time per process, so under load a batch holds the requests that
    arrived during the previous round trip (one command, one fsync of their served records), and a lone
    request goes out on the next turn of the event loop, without waiting for company.
    """

    MAX_BATCH = 128  # bounds one script's time inside Redis, which serves nothing else meanwhile

    def __init__(self, plane: RedisPlane) -> None:
        self.plane = plane
        self._pending: list[tuple[str, str, int, asyncio.Future]] = []
        self._sender: asyncio.Task | None = None

    async def read(self, user: RawId, request_id: str, history_length: int) -> tuple[list[str], list[str]]:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((user_key(user), request_id, history_length, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())
        return await future

    async def _send(self) -> None:
        plane = self.plane
        while self._pending:
            batch, self._pending = self._pending[:self.MAX_BATCH], self._pending[self.MAX_BATCH:]
            args: list[Any] = [plane.settings.prefix, plane.settings.served_ttl_s, len(batch)]
            for user, request_id, history_length, _ in batch:
                args += [user, request_id, history_length]
            try:
                replies = await plane.read_script(keys=[], args=args)
            except BaseException as exc:  # every waiting request gets the failure (redis.RedisError: degraded)
                failure = exc if isinstance(exc, Exception) else redis.ConnectionError("the Redis read was cancelled")
                for *_, future in batch + (self._pending if failure is not exc else []):
                    if not future.done():
                        future.set_exception(failure)
                if failure is not exc:
                    raise
                continue
            for reply, (*_, future) in zip(replies, batch, strict=True):
                if not future.done():  # a request cancelled while waiting drops its reply
                    shown, clicked = json.loads(reply)
                    future.set_result((shown, clicked))


class RedisUserState:
    """The UserStateStore in Redis: what every replica reads in the same request after an event."""

    def __init__(self, plane: RedisPlane) -> None:
        self.plane = plane
        self.reads = UserReads(plane)

    def add(self, events: Sequence[SeenEvent]) -> None:
        """Nothing to do: the append script updated the lists with the events, atomically."""

    async def get(self, user: RawId, request_id: str = "", history_length: int = 0
                  ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(shown, clicked) of a user, oldest first, with the request's served record written, in one round trip
        shared with the requests in flight beside it; raises redis.RedisError when Redis cannot be read."""
        metrics = self.plane.metrics
        started = time.perf_counter()
        try:
            shown, clicked = await self.reads.read(user, request_id, history_length)
        except redis.RedisError:
            metrics.redis_errors.labels("user_state").inc()
            raise
        finally:
            metrics.redis_latency.labels("user_state").observe(time.perf_counter() - started)
        return tuple(shown), tuple(clicked)

    def served(self, request_id: str) -> str | None:
        return None  # the append script attaches it, from whichever replica served the request


class RedisCanaryBoard:
    """Canary windows on global traffic, and one decision per breached version that every replica obeys.

    Each replica buffers its canary requests' outcomes and flushes them every sync (a few times a
    second) into per-second buckets: `{prefix}:canary:{kind}:{version}:{second}` (a list of
    "ok latency_ms" entries, expiring after the window). On the same sync it reads the window of every
    active canary version, and a breach is claimed with HSETNX of `{kind}:{version}` in the hash
    `{prefix}:canary:banned`: the one replica that wins moves the registry alias; every replica reads the
    hash (one HGETALL: its size is the number of banned versions, whatever else the keyspace holds) and
    stops routing to them.
    """

    def __init__(self, plane: RedisPlane) -> None:
        self.plane = plane
        self._lock = threading.Lock()
        self._pending: list[tuple[str, int, bool, float, float]] = []

    def observe(self, kind: str, version: int, ok: bool, latency_s: float) -> None:
        with self._lock:
            self._pending.append((kind, version, ok, latency_s, time.time()))

    def _flush(self, window_s: float) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        client, ttl = self.plane.client, int(window_s) + 60
        pipe = client.pipeline(transaction=False)
        for kind, version, ok, latency_s, at in pending:
            bucket = self.plane.key("canary", kind, str(version), str(int(at)))
            pipe.rpush(bucket, f"{int(ok)} {latency_s * 1000.0:.3f}")
            pipe.expire(bucket, ttl)
            pipe.sadd(self.plane.key("canary", "active"), f"{kind}:{version}")
        try:
            pipe.execute()
        except redis.RedisError:
            with self._lock:  # kept for the next sync: outcomes are not dropped while Redis blinks
                self._pending = pending + self._pending
            raise

    def window(self, kind: str, version: int, window_s: float, now: float | None = None) -> CanaryStats:
        """The global window of one canary version, every replica's requests in it."""
        now = time.time() if now is None else now
        first, last = int(now - window_s) + 1, int(now)
        pipe = self.plane.client.pipeline(transaction=False)
        for second in range(first, last + 1):
            pipe.lrange(self.plane.key("canary", kind, str(version), str(second)), 0, -1)
        observations = []
        for entries in pipe.execute():
            for entry in entries:
                ok, latency_ms = entry.split(" ")
                observations.append((ok == "1", float(latency_ms) / 1000.0))
        return window_stats(observations)

    def sync(self, thresholds: CanaryThresholds) -> tuple[dict[tuple[str, int], str], list[tuple[str, int, str]]]:
        """Flush this replica's outcomes, decide on global windows. Returns (every banned version with its
        reason, the breaches this replica claimed and must roll back)."""
        self._flush(thresholds.window_s)
        client = self.plane.client
        claimed = []
        banned = self.banned()
        for member in client.smembers(self.plane.key("canary", "active")):
            kind, version = member.rsplit(":", 1)
            if (kind, int(version)) in banned:
                continue
            reason = breach_reason(self.window(kind, int(version), thresholds.window_s), thresholds)
            if reason is None:
                continue
            if client.hsetnx(self.plane.key("canary", "banned"), f"{kind}:{version}", reason):
                claimed.append((kind, int(version), reason))
            banned[(kind, int(version))] = reason
        return banned, claimed

    def banned(self) -> dict[tuple[str, int], str]:
        out = {}
        for member, reason in self.plane.client.hgetall(self.plane.key("canary", "banned")).items():
            kind, version = member.rsplit(":", 1)
            out[(kind, int(version))] = reason
        return out

    def stats(self, window_s: float) -> dict[str, Any]:
        out = {}
        for member in sorted(self.plane.client.smembers(self.plane.key("canary", "active"))):
            kind, version = member.rsplit(":", 1)
            out[member] = self.window(kind, int(version), window_s).__dict__
        return out


def open_plane(settings: Any, metrics: ServeMetrics, environ: Mapping[str, str] | None = None) -> RedisPlane:
    """The plane for a server's settings (state=redis://...), credentials from the environment. Redis need not
    be up yet: the server starts, answers degraded and /readyz says why until it is."""
    env = os.environ if environ is None else environ
    plane = RedisPlane(RedisSettings(
        url=settings.state, prefix=settings.redis_prefix, seen_per_user=settings.seen_per_user,
        event_id_ttl_s=settings.event_id_ttl_s, wait_replicas=settings.redis_wait_replicas,
        wait_timeout_ms=settings.redis_wait_timeout_ms, user_ttl_s=settings.user_state_ttl_s,
        options=connection_options(settings.state, env), served_ttl_s=settings.served_ttl_s), metrics)
    warning = plane.durability()
    if warning:
        log.warning("%s", warning)
    return plane
