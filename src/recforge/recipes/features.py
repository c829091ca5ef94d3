"""`recforge features materialize`: every user's history in the log, into the Redis the servers read.

The histories come from the rule training rows were built with (data.history: clicks strictly before,
the newest `length` of them), over the log read and validated the way `data prepare` reads it (the
same quarantine, so a row prepare drops is not a click here either), as of just after the log's last
event. A server on that Redis then answers a user's next request with the history the next training
row of that user will hold: no training/serving skew for history-reading models and exclude_seen.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recforge.config import Config
from recforge.data.history import latest_histories
from recforge.data.prepare import make_labels
from recforge.recipes.prepare import validate_source
from recforge.serve.feature_store import UserStateSeeder, stream_start
from recforge.serve.settings import ServeSettings


@dataclass(frozen=True)
class MaterializeReport:
    users: int
    events: int
    quarantined: int
    clicks_written: int
    shown_written: int
    later_events: int
    log_until: float
    seconds: float


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """Dense codes of a raw id column and the ids as the server keys them (str of the JSON value)."""
    encoded = pc.dictionary_encode(column).combine_chunks()
    return encoded.indices.to_numpy().astype(np.int64), [str(v) for v in encoded.dictionary.to_pylist()]


def materialize_features(cfg: Config, state: str, prefix: str = "recforge", length: int | None = None,
                         batch_users: int = 500, environ: dict[str, str] | None = None) -> MaterializeReport:
    """Seed `{prefix}:u:{user}:shown|clicked` of every user in cfg's log (see feature_store)."""
    import redis

    from recforge.serve.redis_state import connection_options

    started = time.time()
    defaults = {name: field.default for name, field in ServeSettings.model_fields.items()}
    length = defaults["seen_per_user"] if length is None else length
    if length < max(1, cfg.data.history_length):
        raise ValueError(f"length {length} is shorter than data.history_length {cfg.data.history_length}: "
                         "the models would read histories cut short")
    with tempfile.TemporaryDirectory(prefix="recforge-materialize-") as tmp:
        outcome = validate_source(cfg, Path(tmp))
    table, schema = outcome.result.clean, cfg.data.schema_
    if table.num_rows == 0:
        raise ValueError("no valid events in the log: every row was quarantined (run `recforge data validate`)")
    times = table.column(schema.time).to_numpy().astype(np.int64)
    user_code, user_ids = _codes(table.column(schema.user))
    item_code, item_ids = _codes(table.column(schema.item))
    labels = make_labels(table, schema)
    users, clicked_values, clicked_offsets = latest_histories(user_code, times, item_code, labels, length)
    _, shown_values, shown_offsets = latest_histories(user_code, times, item_code, np.ones_like(labels), length)
    log_until = float(times.max())
    options = connection_options(state, dict(os.environ if environ is None else environ))
    client = redis.Redis.from_url(state, decode_responses=True, socket_timeout=30.0, **options)
    items = np.asarray(item_ids, dtype=object)
    try:
        seeder = UserStateSeeder(client, prefix, cap=length, ttl_s=defaults["user_state_ttl_s"], log_until=log_until,
                                 since=stream_start(log_until, defaults["event_max_ahead_s"]))
        for first in range(0, len(users), batch_users):
            rows = range(first, min(first + batch_users, len(users)))
            seeder.seed([user_ids[users[r]] for r in rows],
                        [items[shown_values[shown_offsets[r]:shown_offsets[r + 1]]].tolist() for r in rows],
                        [items[clicked_values[clicked_offsets[r]:clicked_offsets[r + 1]]].tolist() for r in rows])
    except redis.RedisError as exc:
        raise OSError(f"Redis at {state}: {exc}; users seeded so far hold the log's history, run it again") from exc
    finally:
        client.close()
    return MaterializeReport(users=len(users), events=table.num_rows, quarantined=outcome.result.quarantine.num_rows,
                             clicks_written=int(clicked_offsets[-1]), shown_written=int(shown_offsets[-1]),
                             later_events=seeder.later_events, log_until=log_until,
                             seconds=round(time.time() - started, 3))
