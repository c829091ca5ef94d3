"""Users' online state seeded from the log (`recforge features materialize`), so the first request after
a deploy reads the history the training data holds, not only what the replicas saw since they started.

It writes the keys the append script of redis_state.py keeps, `{prefix}:u:{user}:shown` and
`{prefix}:u:{user}:clicked` (raw ids, oldest first, capped), replacing each seeded user's lists whole.

Replicas keep taking events meanwhile. The log holds every event up to its newest timestamp
(`log_until`); an event in the stream timed after that is not in it, so seeding a user without it
would drop it. Such events are added on top, in stream order, from two places: the stream read
here batch by batch, and, inside the seeding script itself (atomic with the replace), whatever
arrived since that read. An event that lands after the script is appended by the server's own
script as usual. So a user's lists end as the log's history followed by every later event, whichever
way the race goes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import redis

# ARGV: prefix, cap, ttl, since (stream id, exclusive), log_until, n users; then per user: id, n shown, n clicked,
# the shown ids, the clicked ids. Returns the last stream id the script read.
_SEED = """
local prefix, cap, ttl, since, log_until, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4],
  tonumber(ARGV[5]), tonumber(ARGV[6])
local users = {}
local o = 7
local function push(key, first, count)
  local j = first
  while j < first + count do
    local last = math.min(j + 999, first + count - 1)
    redis.call('RPUSH', key, unpack(ARGV, j, last))
    j = last + 1
  end
end
for _ = 1, n do
  local user, n_shown, n_clicked = ARGV[o], tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2])
  o = o + 3
  users[user] = true
  local shown, clicked = prefix .. ':u:' .. user .. ':shown', prefix .. ':u:' .. user .. ':clicked'
  redis.call('DEL', shown, clicked)
  push(shown, o, n_shown)
  o = o + n_shown
  push(clicked, o, n_clicked)
  o = o + n_clicked
end
local last = since
for _, entry in ipairs(redis.call('XRANGE', prefix .. ':events', '(' .. since, '+')) do
  last = entry[1]
  local f = {}
  for k = 1, #entry[2], 2 do f[entry[2][k]] = entry[2][k + 1] end
  if f.user and users[f.user] and tonumber(f.ts) > log_until then
    redis.call('RPUSH', prefix .. ':u:' .. f.user .. ':shown', f.item)
    if f.kind == 'click' then redis.call('RPUSH', prefix .. ':u:' .. f.user .. ':clicked', f.item) end
  end
end
for user in pairs(users) do
  for _, kind in ipairs({'shown', 'clicked'}) do
    local key = prefix .. ':u:' .. user .. ':' .. kind
    redis.call('LTRIM', key, -cap, -1)
    if ttl > 0 then redis.call('EXPIRE', key, ttl) end
  end
end
return last
"""


class UserStateSeeder:
    """Replaces users' lists with the log's, batch by batch, keeping every event the log does not hold.

    `since` is the stream id to start reading the stream from (exclusive): any id older than the oldest
    event that could be timed after the log (events may be timed up to event_max_ahead_s after arrival).
    """

    def __init__(self, client: redis.Redis, prefix: str, cap: int, ttl_s: int, log_until: float, since: str) -> None:
        self.client = client
        self.prefix = prefix
        self.cap = cap
        self.ttl_s = ttl_s
        self.log_until = log_until
        self.since = since
        self.later: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        self.later_events = 0
        self._script = client.register_script(_SEED)

    def read_stream(self, count: int = 10_000) -> None:
        """Take in the stream's entries since the last read: those timed after the log, by user."""
        stream = f"{self.prefix}:events"
        while True:
            entries = self.client.xrange(stream, min=f"({self.since}", max="+", count=count)
            if not entries:
                return
            for entry_id, fields in entries:
                self.since = entry_id
                if "user" in fields and float(fields["ts"]) > self.log_until:
                    shown, clicked = self.later[fields["user"]]
                    shown.append(fields["item"])
                    if fields["kind"] == "click":
                        clicked.append(fields["item"])
                    self.later_events += 1
            if len(entries) < count:
                return

    def seed(self, users: Sequence[str], shown: Sequence[Sequence[str]], clicked: Sequence[Sequence[str]]) -> None:
        """One batch: each user's lists become the log's, then the later events, atomically."""
        self.read_stream()
        argv: list[str | int | float] = [self.prefix, self.cap, self.ttl_s, self.since, repr(float(self.log_until)),
                                         len(users)]
        for user, user_shown, user_clicked in zip(users, shown, clicked, strict=True):
            later_shown, later_clicked = self.later.get(user, ((), ()))
            user_shown = [*user_shown, *later_shown][-self.cap:] if self.cap else []
            user_clicked = [*user_clicked, *later_clicked][-self.cap:] if self.cap else []
            argv += [user, len(user_shown), len(user_clicked), *user_shown, *user_clicked]
        self.since = self._script(keys=[], args=argv)


def stream_start(log_until: float, max_ahead_s: float) -> str:
    """The exclusive stream id to read from: entries older than this cannot be timed after `log_until`."""
    return f"{max(0, int((log_until - max_ahead_s) * 1000) - 1)}-0"
