"""A synthetic world with sequential structure: sessions with an intent, and item-to-item transitions.

The feed world (synthetic/world.py) has users with static tastes, so the order of their clicks
carries nothing a model could use beyond who they are. Here it does, the way consumption on a
content platform does: a user's log is a series of sessions; each session has an intent (a
category, usually one of the user's favourites); within a session the next item is, most of the
time, one of a few successors of the current item (the next episode, the follow-up article,
"watch next"), otherwise a popular item of the intent. A model that reads the sequence (SASRec)
can learn the transitions; popularity and a static user vector cannot, so the world tells them apart.

The log is implicit (every event is a consumption, no label column): user_id, item_id, timestamp,
category. Train on it with data.schema.label.kind=implicit, context [], item_features [category],
numeric [] (configs/synthetic/sasrec.yaml).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from recforge.config import GenerateConfig
from recforge.synthetic.world import SECONDS_PER_DAY, period_start

SEQUENCE_SCHEMA = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64()),
                             ("category", pa.int64())])
SUCCESSORS = 3  # successors per item
FOLLOW = 0.75  # chance that the next item of a session is a successor of the current one
_SUCCESSOR_PICK = np.array([0.6, 0.3, 0.1])
_FAVOURITE_INTENT = 0.8  # sessions whose intent is one of the user's three favourite categories
_SESSION_EVENTS = 6.0  # mean events per session (geometric)
_GAP_S = (30, 600)  # seconds between events of a session


def _successors(rng: np.random.Generator, category: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """[items, SUCCESSORS]: each item's successors, drawn mostly from its own category, never itself."""
    n = len(category)
    out = np.empty((n, SUCCESSORS), dtype=np.int64)
    by_category = {c: np.flatnonzero(category == c) for c in np.unique(category)}
    for item in range(n):
        pool = by_category[category[item]]
        pool = pool[pool != item]
        if len(pool) < SUCCESSORS or rng.random() < 0.1:
            pool = np.delete(np.arange(n), item)
        weights = popularity[pool] / popularity[pool].sum()
        out[item] = rng.choice(pool, SUCCESSORS, replace=False, p=weights)
    return out


def generate_sequences(cfg: GenerateConfig) -> pa.Table:
    """`cfg.events` events of `cfg.users` users over `cfg.days` days, sorted by time.

    Session-level draws (user, intent, length, start) and per-event coins are drawn in bulk; the one
    Python loop walks the events, because each next item depends on the current one.
    """
    rng = np.random.default_rng(cfg.seed)
    category = rng.integers(0, cfg.categories, cfg.items)
    popularity = rng.pareto(1.2, cfg.items) + 1.0
    successors = _successors(rng, category, popularity)
    present = [c for c in range(cfg.categories) if np.any(category == c)]
    members = {c: np.flatnonzero(category == c) for c in present}
    cumulative = {c: np.cumsum(popularity[members[c]]) / popularity[members[c]].sum() for c in present}
    favourites = np.stack([rng.choice(present, min(3, len(present)), replace=False) for _ in range(cfg.users)])
    activity = rng.pareto(1.5, cfg.users) + 1.0
    sessions = int(np.ceil(cfg.events / _SESSION_EVENTS * 1.5)) + 10
    session_user = rng.choice(cfg.users, sessions, p=activity / activity.sum())
    favourite = favourites[session_user, rng.integers(0, favourites.shape[1], sessions)]
    session_intent = np.where(rng.random(sessions) < _FAVOURITE_INTENT, favourite, rng.choice(present, sessions))
    lengths = rng.geometric(1.0 / _SESSION_EVENTS, sessions)
    lengths = lengths[:int(np.searchsorted(np.cumsum(lengths), cfg.events)) + 1]
    lengths[-1] -= int(lengths.sum()) - cfg.events  # exactly cfg.events events
    session_start = period_start(cfg) + rng.integers(0, cfg.days * SECONDS_PER_DAY, len(lengths))
    follow = rng.random(cfg.events) < FOLLOW
    pick = rng.choice(SUCCESSORS, cfg.events, p=_SUCCESSOR_PICK)
    uniform = rng.random(cfg.events)
    gaps = rng.integers(*_GAP_S, cfg.events)
    items = np.empty(cfg.events, dtype=np.int64)
    times = np.empty(cfg.events, dtype=np.int64)
    users = np.repeat(session_user[:len(lengths)], lengths)
    event = 0
    for session, length in enumerate(lengths.tolist()):
        intent = int(session_intent[session])
        moment = int(session_start[session])
        current = -1
        for step in range(length):
            if step == 0 or not follow[event]:
                current = int(members[intent][np.searchsorted(cumulative[intent], uniform[event])])
            else:
                current = int(successors[current, pick[event]])
            if step:
                moment += int(gaps[event])
            items[event], times[event] = current, moment
            event += 1
    end = period_start(cfg) + cfg.days * SECONDS_PER_DAY - 1
    table = pa.table({"user_id": users.astype(np.int64), "item_id": items, "timestamp": np.minimum(times, end),
                      "category": category[items]}, schema=SEQUENCE_SCHEMA)
    return table.take(np.argsort(table.column("timestamp").to_numpy(), kind="stable"))
