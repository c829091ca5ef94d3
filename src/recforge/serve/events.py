"""Durable impression/click events, and their export into the event-log schema training reads.

Events land in SQLite in WAL mode with synchronous=FULL: a batch is one transaction, and the HTTP
200 goes out only after its commit reached the disk, so an accepted event survives kill -9 and a
power cut. SQLite (not a hand-rolled log) because the export needs a join (an impression's label is
whether a click with the same request and item arrived) and that join is one indexed query.

Ids keep their JSON type: they are stored as JSON text and come back as int or str.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from recforge.storage import atomic_open, write_json

DB_FILE = "events.sqlite"
EXPORT_REPORT = "_export.json"
# Columns every exported row has; a context key with one of these names is not exported (it would clash).
BASE_COLUMNS = ("user_id", "item_id", "timestamp", "position", "label", "request_id", "assignments", "model_version",
                "served_history")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,
    request_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    timestamp REAL NOT NULL,
    context TEXT NOT NULL,
    assignments TEXT NOT NULL,
    model_version TEXT,
    item_features TEXT NOT NULL,
    received REAL NOT NULL,
    event_id TEXT,
    served TEXT
);
CREATE INDEX IF NOT EXISTS events_join ON events (request_id, item_id, type);
CREATE INDEX IF NOT EXISTS events_time ON events (type, timestamp);
"""


class StoredEvent(NamedTuple):
    """One event as stored: ids and dicts already JSON-encoded by `encode_event`."""

    type: str
    request_id: str
    user_id: str
    item_id: str
    position: int
    timestamp: float
    context: str
    assignments: str
    model_version: str | None
    item_features: str
    # The client's id of the event: a retried batch (after a timeout) stores each event once.
    event_id: str | None = None
    # An impression's "what was served": the online features its request was answered with (JSON, see
    # user_state.served_record), so training can learn from what the models actually saw.
    served: str | None = None


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def encode_event(type_: str, request_id: str, user_id: int | str, item_id: int | str, position: int,
                 timestamp: float, context: dict[str, Any] | None, assignments: dict[str, str] | None,
                 model_version: str | None, item_features: dict[str, Any] | None,
                 event_id: str | None = None, served: str | None = None) -> StoredEvent:
    return StoredEvent(type_, request_id, _dumps(user_id), _dumps(item_id), int(position), float(timestamp),
                       _dumps(context or {}), _dumps(assignments or {}), model_version, _dumps(item_features or {}),
                       event_id, served)


class EventStoreFull(OSError):
    """The store cannot take writes (disk or database full, read-only file system): nothing of the batch was
    stored. The condition is outside recforge and passes when space is freed; the caller answers "try again"."""

    # What a client is told (the full reason, with paths, goes to the log and to /readyz's admin answer).
    public = "the event store cannot write (disk full); retry later"


# SQLite result codes (extended codes carry the primary one in the low byte) that mean "no room to write"
# or "cannot write here now", as opposed to a bad batch: SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_READONLY.
_UNWRITABLE = {10, 13, 14, 8}


def _unwritable(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _UNWRITABLE


def timestamp_problem(timestamp: float, now: float, max_ahead_s: float, max_age_s: float) -> str | None:
    """Why an event time is not accepted against the server's clock `now`, or None: stored times are bounded
    by the clock of the server that takes them, not by the client's."""
    if timestamp > now + max_ahead_s:
        return (f"must not be more than {max_ahead_s:g}s ahead of the server's clock "
                f"({timestamp - now:.0f}s ahead; setting event_max_ahead_s)")
    if timestamp < now - max_age_s:
        return (f"must not be more than {max_age_s:g}s behind the server's clock "
                f"({now - timestamp:.0f}s behind; setting event_max_age_s)")
    return None


def create_schema(db: sqlite3.Connection) -> None:
    """The events table and its indexes (the server's store, and the lake export's working copy)."""
    db.executescript(_SCHEMA)
    columns = {row[1] for row in db.execute("PRAGMA table_info(events)")}
    for column in ("event_id", "served"):  # a store written before events carried them
        if column not in columns:
            db.execute(f"ALTER TABLE events ADD COLUMN {column} TEXT")
    db.execute("CREATE UNIQUE INDEX IF NOT EXISTS events_event_id ON events (event_id) WHERE event_id IS NOT NULL")


class EventStore:
    """Append-only event storage in `directory`; safe to share between threads."""

    remote = False  # one machine's file: the user state is this process's memory, fed by OnlineState

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / DB_FILE
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise OSError(f"{self.path}: SQLite refused WAL mode (got {mode}); put events_dir on a local disk")
        self._db.execute("PRAGMA synchronous=FULL")
        create_schema(self._db)

    def append(self, events: Sequence[StoredEvent]) -> list[int]:
        """Store a batch atomically and durably (all or nothing); returns the indexes of the events newly
        stored (an event whose event_id is already stored, or repeated in the batch, is stored once).

        Raises EventStoreFull when the disk (or the database) has no room: SQLite may already have rolled the
        transaction back itself then, so the rollback here runs only if one is still open (a second ROLLBACK
        would fail with "no transaction is active" and hide the real reason).
        """
        received = time.time()
        with self._write() as db:
            # Known ids are looked up first rather than left to INSERT OR IGNORE, which would burn AUTOINCREMENT
            # ids: ids stay dense, so the newest id remains the number stored (last_id) that workers sync by.
            fresh, batch_ids = [], set()
            for i, event in enumerate(events):
                if event.event_id is not None:
                    if event.event_id in batch_ids or db.execute(
                            "SELECT 1 FROM events WHERE event_id = ?", (event.event_id,)).fetchone():
                        continue
                    batch_ids.add(event.event_id)
                fresh.append(i)
            db.executemany(
                "INSERT INTO events (type, request_id, user_id, item_id, position, timestamp, context, assignments, "
                "model_version, item_features, event_id, served, received) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(*events[i], received) for i in fresh])
        return fresh

    def probe(self) -> None:
        """Raise EventStoreFull unless a write can commit now: a committed transaction that grows the file by a
        few pages and gives them back, so it needs the same room (pages and WAL space) a small batch would."""
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS write_probe (data BLOB)")
            db.execute("INSERT INTO write_probe VALUES (zeroblob(16384))")
            db.execute("DELETE FROM write_probe")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back (if SQLite has not done so itself)
        when it raises; a full disk or read-only store comes out as EventStoreFull."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                if _unwritable(exc):
                    raise EventStoreFull(f"{self.path}: cannot store events: {exc}") from exc
                raise

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def last_id(self) -> int:
        """The id of the newest event, which is the number stored: rows are only ever appended, and ids are
        AUTOINCREMENT (dense, never reused). Unlike COUNT(*) it costs one index lookup, and it sees the rows
        every process sharing the file has committed."""
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])

    def since(self, after_id: int, limit: int = 100_000) -> tuple[list[tuple[str, Any, Any]], int]:
        """Events newer than `after_id` as (type, user_id, item_id), oldest first, and the id to continue from:
        how one server process learns what the others stored."""
        with self._lock:
            rows = self._db.execute("SELECT id, type, user_id, item_id FROM events WHERE id > ? ORDER BY id LIMIT ?",
                                    (int(after_id), int(limit))).fetchall()
        last = rows[-1][0] if rows else after_id
        return [(t, json.loads(u), json.loads(i)) for _, t, u, i in rows], int(last)

    def recent(self, limit: int, upto_id: int | None = None) -> list[tuple[str, Any, Any]]:
        """The last `limit` events (up to id `upto_id`) as (type, user_id, item_id), oldest first: to rebuild
        per-user memory."""
        with self._lock:
            rows = self._db.execute("SELECT type, user_id, item_id FROM events WHERE id <= ? ORDER BY id DESC LIMIT ?",
                                    (2**63 - 1 if upto_id is None else int(upto_id), int(limit))).fetchall()
        return [(t, json.loads(u), json.loads(i)) for t, u, i in reversed(rows)]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def parse_day(value: str | date | None, name: str) -> date | None:
    if value is None or isinstance(value, date):
        return value
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"--{name} {value!r} is not a date; use YYYY-MM-DD (UTC)") from None


_EPOCH = date(1970, 1, 1)


def _day_start(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def _arrow_column(values: list[Any]) -> pa.Array:
    """Ints stay int64, numbers with a fraction become float64, anything else (or a mix) is text."""
    present = [v for v in values if v is not None]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.array(values, type=pa.int64())
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pa.array([None if v is None else float(v) for v in values], type=pa.float64())
    return pa.array([None if v is None else str(v) for v in values], type=pa.string())


@dataclass(frozen=True)
class ExportReport:
    events_total: int
    impressions: int
    clicks: int
    exported_rows: int
    duplicate_impressions: int
    days: dict[str, int]
    files: list[str]


# The time an event is exported and partitioned at: the client's timestamp, but never later than when the
# server received it. A client clock set years ahead (or a row stored before the server bounded timestamps)
# must not create a far-future day file that a pipeline would take for the newest data.
_TRUSTED_TIME = "MIN(i.timestamp, i.received)"

_EXPORT_QUERY = f"""
SELECT i.user_id, i.item_id, {_TRUSTED_TIME}, i.position, i.context, i.item_features, i.request_id,
       i.assignments, i.model_version, i.served,
       EXISTS (SELECT 1 FROM events c WHERE c.request_id = i.request_id AND c.item_id = i.item_id
               AND c.type = 'click') AS label
FROM events i
WHERE i.type = 'impression' AND {_TRUSTED_TIME} >= ? AND {_TRUSTED_TIME} < ?
  AND i.id = (SELECT MIN(d.id) FROM events d WHERE d.request_id = i.request_id AND d.item_id = i.item_id
              AND d.type = 'impression')
ORDER BY {_TRUSTED_TIME}, i.id
"""
_EXPORT_DAYS = f"""
SELECT DISTINCT CAST({_TRUSTED_TIME} / 86400 AS INTEGER) FROM events i
WHERE i.type = 'impression' AND {_TRUSTED_TIME} >= ? AND {_TRUSTED_TIME} < ? ORDER BY 1
"""


def _rows_to_table(rows: Iterable[tuple[Any, ...]]) -> pa.Table:
    cols: dict[str, list[Any]] = {name: [] for name in BASE_COLUMNS}
    extra: dict[str, list[Any]] = {}
    for n, (user, item, ts, position, context, features, request_id, assignments, version, served, label) in (
            enumerate(rows, start=1)):
        side = {**{k: v for k, v in json.loads(context).items() if k not in BASE_COLUMNS}, **json.loads(features)}
        for key, value in side.items():
            extra.setdefault(key, [None] * (n - 1)).append(value)
        for column in extra.values():
            if len(column) < n:
                column.append(None)
        cols["user_id"].append(json.loads(user))
        cols["item_id"].append(json.loads(item))
        cols["timestamp"].append(int(ts))
        cols["position"].append(int(position))
        cols["label"].append(int(label))
        cols["request_id"].append(request_id)
        cols["assignments"].append(assignments)
        cols["model_version"].append(version)
        cols["served_history"].append(None if served is None else json.loads(served)["history"])
    arrays = {"user_id": _arrow_column(cols["user_id"]), "item_id": _arrow_column(cols["item_id"]),
              "timestamp": pa.array(cols["timestamp"], pa.int64())}
    arrays.update({key: _arrow_column(values) for key, values in sorted(extra.items())})
    arrays.update({"position": pa.array(cols["position"], pa.int64()), "label": pa.array(cols["label"], pa.int64()),
                   "request_id": pa.array(cols["request_id"], pa.string()),
                   "assignments": pa.array(cols["assignments"], pa.string()),
                   "model_version": pa.array(cols["model_version"], pa.string()),
                   "served_history": pa.array(cols["served_history"], pa.list_(pa.string()))})
    return pa.table(arrays)


def export_report(events_dir: str | Path, out_dir: str | Path, since: str | date | None = None,
                  until: str | date | None = None) -> ExportReport:
    """Write one parquet file per UTC day of impressions (labelled by matching clicks) under `out_dir`.

    An impression's day (and exported timestamp) is its client time, capped at the time the server received
    it (`_TRUSTED_TIME`). `since`/`until` are inclusive UTC dates; a day's file is always rewritten whole from every
    impression of that day (atomically), so re-running never duplicates rows. Repeated impressions
    of the same (request_id, item_id) are exported once.
    """
    db_path = Path(events_dir) / DB_FILE
    if not db_path.is_file():
        raise FileNotFoundError(f"no event store at {db_path}; pass the --events-dir the server wrote to")
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
    try:
        return export_from_db(db, out_dir, since, until)
    finally:
        db.close()


def export_from_db(db: sqlite3.Connection, out_dir: str | Path, since: str | date | None = None,
                   until: str | date | None = None) -> ExportReport:
    """The export of `export_report` from an open events database (the server's, or the lake's copy)."""
    first, last = parse_day(since, "since"), parse_day(until, "until")
    out = Path(out_dir)
    # One read transaction: the totals and every day's rows come from the same snapshot, so events the
    # server commits meanwhile are in neither (WAL readers see the database as of their first read).
    db.execute("BEGIN")
    try:
        totals = dict(db.execute("SELECT type, COUNT(*) FROM events GROUP BY type").fetchall())
        files: list[str] = []
        days: dict[str, int] = {}
        lo = _day_start(first) if first else float("-inf")
        hi = _day_start(last + timedelta(days=1)) if last else float("inf")
        for (number,) in db.execute(_EXPORT_DAYS, (lo, hi)).fetchall():
            day = _EPOCH + timedelta(days=int(number))
            rows = db.execute(_EXPORT_QUERY, (_day_start(day), _day_start(day + timedelta(days=1)))).fetchall()
            if rows:
                target = out / f"{day.isoformat()}.parquet"
                with atomic_open(target, "wb") as handle:
                    pq.write_table(_rows_to_table(rows), handle)
                files.append(str(target))
                days[day.isoformat()] = len(rows)
    finally:
        db.execute("COMMIT")
    impressions = int(totals.get("impression", 0))
    exported = sum(days.values())
    in_range = impressions if first is None and last is None else exported
    report = ExportReport(events_total=sum(int(v) for v in totals.values()), impressions=impressions,
                          clicks=int(totals.get("click", 0)), exported_rows=exported,
                          duplicate_impressions=max(0, in_range - exported), days=days, files=files)
    if files:
        write_json(out / EXPORT_REPORT, report.__dict__)
    return report


def export_log(events_dir: str | Path, out_dir: str | Path, since: str | date | None = None,
               until: str | date | None = None) -> list[Path]:
    """`export_report` for callers that only need the files written."""
    return [Path(p) for p in export_report(events_dir, out_dir, since, until).files]
