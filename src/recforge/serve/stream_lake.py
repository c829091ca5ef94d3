"""The shared event stream into the data lake, each event exactly once (`recforge events ingest`).

Every replica on `--state redis://...` appends to one Redis Stream ({prefix}:events). This reads it
through the consumer group `lake` into Parquet part files, local or on s3://:

    {lake}/day=YYYY-MM-DD/part-{first id}-{last id}.parquet

A round, and why each step is safe to die in:

1. Read up to `batch` entries: first this consumer's pending ones (delivered to a run that died
   before acknowledging them), then new ones.
2. Entries at or below the lake's high-water mark (the largest last id in a part file's name) are
   already in the lake: they are acknowledged without being written again.
3. The rest are cut into runs of one *arrival* day (the UTC day of the entry id, which is Redis's
   clock when the event was stored: monotonic in the id, unlike a client's timestamp) and each run
   is written as one part file, in id order, each write atomic (temp file then rename; one PUT on
   S3). A crash between two files leaves a high-water mark at the end of the first: the second
   run is still pending, and is written on the next round.
4. Only then the entries are acknowledged, and the stream is trimmed (XTRIM MINID) to the oldest
   entry the lake does not hold: never past the high-water mark, never past a pending entry.

One ingest runs at a time per stream (a lease in Redis, renewed every round): two would both write
the same pending entries. Which day an event *belongs to* for training (its trusted time:
min(client time, server time)) is the export's business (`export_lake`), which reads arrival days
from the first asked for on, since an event can only arrive on or after the day it happened.
"""

from __future__ import annotations

import io
import json
import os
import re
import sqlite3
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import redis

from recforge import storage
from recforge.serve.events import ExportReport, create_schema, export_from_db, parse_day

GROUP = "lake"
CONSUMER = "ingest"
_PART = re.compile(r"^part-(\d+-\d+)-(\d+-\d+)\.parquet$")
_DAY = re.compile(r"^day=(\d{4}-\d{2}-\d{2})$")
# The columns of a raw part file: the stream id, then the stored event as the server wrote it.
RAW_COLUMNS = ("stream_id", "type", "request_id", "user_id", "item_id", "position", "timestamp", "context",
               "assignments", "model_version", "item_features", "event_id", "received", "served")


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, seq = stream_id.split("-")
    return int(ms), int(seq)


def arrival_day(stream_id: str) -> str:
    return datetime.fromtimestamp(_id_key(stream_id)[0] / 1000.0, tz=UTC).date().isoformat()


def high_water(lake: str | Path) -> str | None:
    """The largest stream id the lake holds: the last id in the newest arrival day's part file names."""
    days = sorted(name for name in storage.list_dir(lake) if _DAY.match(name))
    for day in reversed(days):
        ends = [m.group(2) for name in storage.list_dir(storage.join(lake, day)) if (m := _PART.match(name))]
        if ends:
            return max(ends, key=_id_key)
    return None


@dataclass
class IngestReport:
    read: int = 0
    written: int = 0
    already_in_lake: int = 0
    files: list[str] = field(default_factory=list)
    trimmed: int = 0
    high_water: str | None = None


class LeaseHeld(RuntimeError):
    """Another ingest holds the stream's lease."""


class StreamIngest:
    """Moves a stream's entries into the lake; see the module docstring for the order of steps."""

    def __init__(self, client: redis.Redis, lake: str | Path, prefix: str = "recforge", batch: int = 10_000,
                 lease_s: float = 60.0) -> None:
        self.client = client
        self.lake = lake
        self.stream = f"{prefix}:events"
        self.lease_key = f"{prefix}:lake:lease"
        self.batch = batch
        self.lease_s = lease_s
        self.token = uuid.uuid4().hex

    def _take_lease(self) -> None:
        ms = int(self.lease_s * 1000)
        if self.client.set(self.lease_key, self.token, nx=True, px=ms):
            return
        if self.client.get(self.lease_key) == self.token:
            self.client.pexpire(self.lease_key, ms)
            return
        raise LeaseHeld(f"another `recforge events ingest` holds {self.lease_key} (it renews it every round; "
                        f"it lapses {self.lease_s:g}s after that run stops)")

    def _release_lease(self) -> None:
        # Only our own lease: compare and delete in one step.
        self.client.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end "
                         "return 0", 1, self.lease_key, self.token)

    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _read(self) -> list[tuple[str, dict[str, str]]]:
        """Pending entries of this consumer first (a crashed run's), then new ones."""
        for start in ("0", ">"):
            reply = self.client.xreadgroup(GROUP, CONSUMER, {self.stream: start}, count=self.batch)
            entries = reply[0][1] if reply else []
            gone = [i for i, f in entries if f is None]  # pending, but trimmed from the stream (by hand)
            if gone:
                self.client.xack(self.stream, GROUP, *gone)
            entries = [(i, f) for i, f in entries if f is not None]
            if entries:
                return entries
        return []

    def run(self, max_rounds: int | None = None, on_step: Callable[[str], None] | None = None) -> IngestReport:
        """Rounds until the stream holds nothing new (or max_rounds). `on_step` is told each step as it is
        done ("read", "file", "ack", "trim"), for the crash tests."""
        step = on_step or (lambda _name: None)
        report = IngestReport()
        self._take_lease()
        self._ensure_group()
        try:
            rounds = 0
            while max_rounds is None or rounds < max_rounds:
                rounds += 1
                self._take_lease()
                entries = self._read()
                if not entries:
                    break
                step("read")
                report.read += len(entries)
                mark = high_water(self.lake)
                fresh = [(i, f) for i, f in entries if mark is None or _id_key(i) > _id_key(mark)]
                report.already_in_lake += len(entries) - len(fresh)
                for run in _day_runs(fresh):
                    report.files.append(self._write(run))
                    report.written += len(run)
                    step("file")
                self.client.xack(self.stream, GROUP, *[i for i, _ in entries])
                step("ack")
                report.trimmed += self._trim()
                step("trim")
            report.high_water = high_water(self.lake)
        finally:
            self._release_lease()
        return report

    def _write(self, run: list[tuple[str, dict[str, str]]]) -> str:
        # `served` is the entry's own field: the append script attached it from the request's served record.
        rows = [{**json.loads(fields["event"]), "served": fields.get("served")} for _, fields in run]
        table = pa.table({
            "stream_id": pa.array([i for i, _ in run], pa.string()),
            **{name: pa.array([r.get(name) for r in rows], kind) for name, kind in (
                ("type", pa.string()), ("request_id", pa.string()), ("user_id", pa.string()),
                ("item_id", pa.string()), ("position", pa.int64()), ("timestamp", pa.float64()),
                ("context", pa.string()), ("assignments", pa.string()), ("model_version", pa.string()),
                ("item_features", pa.string()), ("event_id", pa.string()), ("received", pa.float64()),
                ("served", pa.string()))}})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        first, last = run[0][0], run[-1][0]
        target = storage.join(self.lake, f"day={arrival_day(first)}", f"part-{first}-{last}.parquet")
        storage.put_bytes(target, buffer.getvalue())
        return str(target)

    def _trim(self) -> int:
        """Drop entries the lake holds and no consumer still owes: below min(high-water + 1, oldest pending)."""
        mark = high_water(self.lake)
        if mark is None:
            return 0
        ms, seq = _id_key(mark)
        bound = f"{ms}-{seq + 1}"
        pending = self.client.xpending(self.stream, GROUP)
        if pending and pending.get("pending") and pending.get("min"):
            bound = min(bound, pending["min"], key=_id_key)
        return int(self.client.xtrim(self.stream, minid=bound, approximate=False))


def _day_runs(entries: list[tuple[str, dict[str, str]]]) -> list[list[tuple[str, dict[str, str]]]]:
    runs: list[list[tuple[str, dict[str, str]]]] = []
    for entry in entries:
        if runs and arrival_day(runs[-1][-1][0]) == arrival_day(entry[0]):
            runs[-1].append(entry)
        else:
            runs.append([entry])
    return runs


def lake_files(lake: str | Path, first_arrival: date | None = None) -> list[str | Path]:
    """Part files of arrival days from `first_arrival` on (all when None), in stream order."""
    out: list[tuple[tuple[int, int], str | Path]] = []
    for day in storage.list_dir(lake):
        m = _DAY.match(day)
        if not m or (first_arrival is not None and date.fromisoformat(m.group(1)) < first_arrival):
            continue
        for name in storage.list_dir(storage.join(lake, day)):
            if (p := _PART.match(name)):
                out.append((_id_key(p.group(1)), storage.join(lake, day, name)))
    return [path for _, path in sorted(out, key=lambda item: item[0])]


def export_lake(lake: str | Path, out_dir: str | Path, since: str | date | None = None,
                until: str | date | None = None) -> ExportReport:
    """Day files of labelled impressions from the lake, by the same query as `events.export_report`.

    The lake's raw events are loaded, in stream order, into a temporary SQLite file of the server's schema,
    and the one export query runs on it: the label (a click with the same request and item), the
    duplicate-impression rule and the trusted time are the same code whichever state the server ran.
    """
    first = parse_day(since, "since")
    files = lake_files(lake, first)
    if not files and not storage.list_dir(lake):
        raise FileNotFoundError(f"no lake at {lake}: run `recforge events ingest --lake {lake}` first")
    with tempfile.TemporaryDirectory(prefix="recforge-lake-export-") as tmp:
        db_path = Path(tmp) / "events.sqlite"
        db = sqlite3.connect(db_path, isolation_level=None)
        try:
            _load(db, files)
            return export_from_db(db, out_dir, since, until)
        finally:
            db.close()


def _load(db: sqlite3.Connection, files: list[str | Path]) -> None:
    create_schema(db)
    db.execute("BEGIN")
    for path in files:
        table = pq.read_table(io.BytesIO(storage.get_bytes(path)))
        # Part files written before impressions carried `served` have no such column: None for each row.
        columns = [table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
                   for name in RAW_COLUMNS[1:]]
        db.executemany("INSERT INTO events (type, request_id, user_id, item_id, position, timestamp, context, "
                       "assignments, model_version, item_features, event_id, received, served) "
                       "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", zip(*columns, strict=True))
    db.execute("COMMIT")


def ingest_stream(url: str, lake: str | Path, prefix: str = "recforge", batch: int = 10_000,
                  environ: dict[str, str] | None = None) -> IngestReport:
    """`recforge events ingest`: the stream at `url` (credentials from RECFORGE_REDIS_*) into `lake`."""
    from recforge.serve.redis_state import connection_options

    options = connection_options(url, dict(os.environ if environ is None else environ))
    client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=30.0, **options)
    try:
        return StreamIngest(client, lake, prefix, batch).run()
    except redis.RedisError as exc:  # nothing acknowledged that the lake does not hold: run it again
        raise OSError(f"Redis at {url}: {exc}; the lake holds every event acknowledged so far, run the ingest "
                      "again") from exc
    finally:
        client.close()
