"""Training batches streamed from a split's shards in bounded memory (`train.data_loading: stream`).

The in-memory path (data.batches) holds a whole split as tensors, so the largest trainable split is
the host's RAM. A stream holds, per rank, one memory-mapped shard and a shuffle buffer of
`train.shuffle_buffer` rows; peak memory is about buffer + one shard whatever the split's size.

An epoch of one rank, every step a pure function of (seed, epoch, rank, world size):

1. The shards are put in a seeded order (`shard_order`) and dealt round-robin to the ranks
   (`deal`): each rank opens only its own shards, one at a time.
2. Within a shard the rows (or, for retrieval objectives, the positive rows) are read in a seeded
   order; one rank's rows, shard after shard, are its *stream*, a position being an index into it.
3. The buffer is filled with the first `shuffle_buffer` rows of the stream; each step draws a batch
   of buffer slots with a generator seeded by (seed, epoch, rank) and refills them with the next rows.
   When the stream runs out, what is left in the buffer is shuffled once and drained in batches.

Which positions go into which slot and out in which batch (`_Ledger`) is kept apart from the rows
themselves (`_Buffer`), so a resumed run replays the ledger up to the saved step (integers only, no
reads) and then reads just the rows its buffer held: resume is exact without saving the buffer.
The deal depends on the number of ranks, so a mid-epoch position means nothing under another world
size; the trainer refuses such a resume.

Every rank takes the same number of steps (DDP all-reduces every step), computed from per-shard row
counts alone, with no communication: `steps` is the smallest rank's row count in batches. A rank
with more rows stops there; the rows it did not reach this epoch (the tail of its last shards and
what its buffer still held) are trained in other epochs, because the shard order, and so the deal,
changes every epoch. Shards of equal size in a multiple of the world size lose nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recforge.data.batches import Batch
from recforge.data.shards import ShardInfo, split_shards

# Ops of a ledger step, applied in order to the buffer: ("keep", index) reorders/shrinks it,
# ("take", slots) emits a batch, ("put", slots, start) refills slots with stream rows start.. .
Op = tuple[Any, ...]


def shard_order(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The order the shards of a split are dealt in this epoch: the same on every rank."""
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(n_shards)


def deal(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's shards, in the order it reads them: every world_size-th of the epoch's order."""
    return order[rank::world_size]


@dataclass(frozen=True)
class ShardStream:
    """A split as shards to stream; `positives_only` keeps the rows with label > 0 (retrieval training).

    `rows[i]` is what shard i contributes (its rows, or its positives): the per-rank step counts are
    computed from these alone.
    """

    shards: tuple[ShardInfo, ...]
    rows: tuple[int, ...]
    shuffle_buffer: int
    positives_only: bool = False

    @classmethod
    def open(cls, prepared_dir: str | Path, split: str, shuffle_buffer: int) -> ShardStream:
        shards = tuple(split_shards(prepared_dir, split))
        return cls(shards, tuple(s.rows for s in shards), shuffle_buffer)

    def __len__(self) -> int:
        return sum(self.rows)

    def positives(self) -> ShardStream:
        """The stream of positive rows: counts them per shard, reading one label column at a time."""
        counts = tuple(int(np.count_nonzero(np.asarray(s.load()["label"]) > 0)) for s in self.shards)
        return ShardStream(self.shards, counts, self.shuffle_buffer, positives_only=True)

    def column_counts(self, column: int, minlength: int) -> np.ndarray:
        """bincount of one categorical column over the stream's rows, one shard at a time."""
        counts = np.zeros(minlength, dtype=np.int64)
        for shard in self.shards:
            columns = shard.load()
            values = np.asarray(columns["categorical"][:, column])
            if self.positives_only:
                values = values[np.asarray(columns["label"]) > 0]
            counts += np.bincount(values, minlength=minlength)[:minlength]
        return counts

    def epoch(self, *, seed: int, epoch: int, rank: int, world_size: int, batch_size: int) -> StreamEpoch:
        if len(self.shards) < world_size:
            raise ValueError(
                f"the split has {len(self.shards)} shard(s), fewer than the {world_size} processes that would share "
                "them: prepare it again with a smaller data.shard_rows, or use train.data_loading=memory")
        order = shard_order(len(self.shards), seed, epoch)
        per_rank = [sum(self.rows[i] for i in deal(order, r, world_size)) for r in range(world_size)]
        if min(per_rank) == 0:
            raise ValueError(f"epoch {epoch}: a process would get no training rows from its shards {per_rank}")
        steps = -(-min(per_rank) // batch_size)
        return StreamEpoch(self, seed, epoch, rank, batch_size, deal(order, rank, world_size), steps)


@dataclass(frozen=True)
class StreamEpoch:
    """One rank's epoch of a ShardStream: `steps` batches, from any step on (`batches(start_step)`)."""

    source: ShardStream
    seed: int
    epoch: int
    rank: int
    batch_size: int
    shard_ids: np.ndarray  # this rank's shards, in reading order
    steps: int

    @property
    def total(self) -> int:
        return sum(self.source.rows[i] for i in self.shard_ids)

    @property
    def capacity(self) -> int:
        """Buffer rows: train.shuffle_buffer, at least one batch (a batch is drawn from it), at most the stream."""
        return min(max(self.source.shuffle_buffer, self.batch_size), self.total)

    def _ledger(self) -> _Ledger:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 0xB0F])
        return _Ledger(self.total, self.capacity, self.batch_size, rng)

    def positions(self, start_step: int = 0) -> Iterator[np.ndarray]:
        """Stream positions of each batch from `start_step` on: the bookkeeping alone, no rows read."""
        ledger = self._ledger()
        ledger.prologue()
        for step in range(self.steps):
            ledger.step()
            if step >= start_step:
                yield ledger.taken

    def batches(self, start_step: int = 0, pin_memory: bool = False) -> Iterator[Batch]:
        """This rank's batches from `start_step` on (earlier steps are replayed in the ledger only)."""
        ledger = self._ledger()
        reader = _Reader(self)
        buffer = _Buffer(self.capacity, self.source.shards[int(self.shard_ids[0])])
        ops = ledger.prologue()
        if start_step:
            for _ in range(start_step):
                ledger.step()
            buffer.put(np.arange(len(ledger.buf)), reader.gather(ledger.buf))
        else:
            _apply(ops, buffer, reader)
        for _ in range(start_step, self.steps):
            batch = _apply(ledger.step(), buffer, reader)
            assert batch is not None
            yield batch.pin_memory() if pin_memory else batch


def _apply(ops: list[Op], buffer: _Buffer, reader: _Reader) -> Batch | None:
    """Carry a ledger step out on the rows: the batch it takes, if any."""
    batch = None
    for op in ops:
        if op[0] == "keep":
            buffer.keep(op[1])
        elif op[0] == "take":
            batch = buffer.take(op[1])
        else:
            slots, start = op[1], op[2]
            buffer.put(slots, reader.read(start, len(slots)))
    return batch


@dataclass
class _Ledger:
    """Which stream position sits in which buffer slot, and what each step takes and refills."""

    total: int
    capacity: int
    batch_size: int
    rng: np.random.Generator
    buf: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    next: int = 0  # the first stream position not yet in the buffer
    cursor: int | None = None  # set once draining: the next slot to emit
    taken: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # the last step's positions

    def prologue(self) -> list[Op]:
        fill = min(self.capacity, self.total)
        self.buf, self.next = np.arange(fill, dtype=np.int64), fill
        return [("put", np.arange(fill), 0)]

    def step(self) -> list[Op]:
        ops: list[Op] = []
        if self.cursor is None and self.next >= self.total:  # the stream ran out: shuffle what is left once
            keep = self.rng.permutation(len(self.buf))
            self.buf, self.cursor = self.buf[keep], 0
            ops.append(("keep", keep))
        if self.cursor is not None:
            slots = np.arange(self.cursor, min(self.cursor + self.batch_size, len(self.buf)))
            self.cursor += len(slots)
            self.taken = self.buf[slots]
            return [*ops, ("take", slots)]
        slots = self.rng.choice(len(self.buf), size=self.batch_size, replace=False)
        self.taken = self.buf[slots]
        ops.append(("take", slots))
        new = min(len(slots), self.total - self.next)
        self.buf[slots[:new]] = np.arange(self.next, self.next + new)
        ops.append(("put", slots[:new], self.next))
        self.next += new
        if new < len(slots):  # the slots nothing refilled leave the buffer
            keep = np.delete(np.arange(len(self.buf)), slots[new:])
            self.buf = self.buf[keep]
            ops.append(("keep", keep))
        return ops


@dataclass
class _Rows:
    """Some rows of a shard as numpy columns; histories as concatenated values + one length per row."""

    categorical: np.ndarray
    numeric: np.ndarray
    label: np.ndarray
    history_values: np.ndarray | None = None
    history_lengths: np.ndarray | None = None

    @staticmethod
    def concat(parts: list[_Rows]) -> _Rows:
        if len(parts) == 1:
            return parts[0]
        history = parts[0].history_values is not None
        return _Rows(*(np.concatenate([getattr(p, name) for p in parts])
                       for name in ("categorical", "numeric", "label")),
                     np.concatenate([p.history_values for p in parts]) if history else None,  # type: ignore[misc]
                     np.concatenate([p.history_lengths for p in parts]) if history else None)  # type: ignore[misc]


class _OpenShard:
    """One memory-mapped shard and the seeded order its (positive) rows are streamed in."""

    def __init__(self, stream: StreamEpoch, shard_id: int) -> None:
        shard = stream.source.shards[shard_id]
        # Plain ndarray views of the mappings: np.memmap's own indexing costs more than the gather.
        self.columns = {name: np.asarray(values) for name, values in shard.load(mmap=True).items()}
        rows = np.arange(shard.rows)
        if stream.source.positives_only:
            rows = np.flatnonzero(np.asarray(self.columns["label"]) > 0)
        self.order = np.random.default_rng([stream.seed, stream.epoch, shard.index, 0x0DE]).permutation(rows)

    def take(self, local: np.ndarray) -> _Rows:
        """Rows at stream positions `local` (within this shard), copied out of the mapping."""
        rows = self.order[local]
        c = self.columns
        out = _Rows(np.asarray(c["categorical"][rows]), np.asarray(c["numeric"][rows]), np.asarray(c["label"][rows]))
        if "history_offsets" in c:
            offsets = c["history_offsets"]
            starts, lengths = np.asarray(offsets[rows]), np.asarray(offsets[rows + 1]) - np.asarray(offsets[rows])
            within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            out.history_values = np.asarray(c["history_values"][np.repeat(starts, lengths) + within])
            out.history_lengths = lengths
        return out


class _Reader:
    """Reads a rank's stream forward, holding one shard open at a time."""

    def __init__(self, stream: StreamEpoch) -> None:
        self.stream = stream
        sizes = [stream.source.rows[i] for i in stream.shard_ids]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._index = -1
        self._open: _OpenShard | None = None

    def _shard(self, index: int) -> _OpenShard:
        if index != self._index:
            self._open = None  # unmap the previous shard before mapping the next
            self._open, self._index = _OpenShard(self.stream, int(self.stream.shard_ids[index])), index
        assert self._open is not None
        return self._open

    def read(self, start: int, n: int) -> _Rows:
        """Stream positions [start, start + n), crossing shard boundaries as needed."""
        return self.gather(np.arange(start, start + n))

    def gather(self, positions: np.ndarray) -> _Rows:
        """Rows at any stream positions, in their order: each shard holding some is opened once, in turn."""
        if len(positions) == 0:
            return self._shard(0).take(np.zeros(0, dtype=np.int64))
        first = int(np.searchsorted(self.starts, positions.min(), side="right")) - 1
        if positions.max() < self.starts[first + 1]:  # the usual read: all in one shard
            return self._shard(first).take(positions - self.starts[first])
        owner = np.searchsorted(self.starts, positions, side="right") - 1
        by_shard = np.argsort(owner, kind="stable")
        parts, order = [], []
        for index in np.unique(owner):
            picked = by_shard[owner[by_shard] == index]
            parts.append(self._shard(int(index)).take(positions[picked] - self.starts[index]))
            order.append(picked)
        rows, order = _Rows.concat(parts), np.concatenate(order)
        if np.array_equal(order, np.arange(len(positions))):  # forward reads come in order already
            return rows
        return _reorder(rows, np.argsort(order, kind="stable"))


def _reorder(rows: _Rows, index: np.ndarray) -> _Rows:
    out = _Rows(rows.categorical[index], rows.numeric[index], rows.label[index])
    if rows.history_values is not None and rows.history_lengths is not None:
        out.history_values, out.history_lengths = _ragged_take(rows.history_values, rows.history_lengths, index)
    return out


def _ragged_take(values: np.ndarray, lengths: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = (np.cumsum(lengths) - lengths)[index]
    picked = lengths[index]
    within = np.arange(int(picked.sum())) - np.repeat(np.cumsum(picked) - picked, picked)
    return values[np.repeat(starts, picked) + within], picked


class _Buffer:
    """The shuffle buffer's rows: fixed-width columns of `capacity` slots, histories padded per slot."""

    def __init__(self, capacity: int, like: ShardInfo) -> None:
        def width(name: str) -> int:
            return int(like.columns[name]["shape"][1])

        self.categorical = np.zeros((capacity, width("categorical")), dtype=np.int64)
        self.numeric = np.zeros((capacity, width("numeric")), dtype=np.float32)
        self.label = np.zeros(capacity, dtype=np.float32)
        self.history: np.ndarray | None = np.zeros((capacity, 0), dtype=np.int64) if like.has_history else None
        self.lengths = np.zeros(capacity, dtype=np.int64)

    def put(self, slots: np.ndarray, rows: _Rows) -> None:
        self.categorical[slots] = rows.categorical
        self.numeric[slots] = rows.numeric
        self.label[slots] = rows.label
        if self.history is None or rows.history_values is None or rows.history_lengths is None:
            return
        lengths = rows.history_lengths
        longest = int(lengths.max()) if len(lengths) else 0
        if longest > self.history.shape[1]:  # a longer history than seen so far: widen the padding
            self.history = np.pad(self.history, ((0, 0), (0, longest - self.history.shape[1])))
        row = np.repeat(np.arange(len(lengths)), lengths)
        within = np.arange(len(rows.history_values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        self.history[slots[row], within] = rows.history_values
        self.lengths[slots] = lengths

    def keep(self, index: np.ndarray) -> None:
        self.categorical, self.numeric, self.label = self.categorical[index], self.numeric[index], self.label[index]
        self.lengths = self.lengths[index]
        if self.history is not None:
            self.history = self.history[index]

    def take(self, slots: np.ndarray) -> Batch:
        categorical = torch.from_numpy(self.categorical[slots])
        numeric, label = torch.from_numpy(self.numeric[slots]), torch.from_numpy(self.label[slots])
        if self.history is None:
            return Batch(categorical, numeric, label)
        lengths = self.lengths[slots]
        padded = self.history[slots]
        values = padded[np.arange(padded.shape[1]) < lengths[:, None]]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return Batch(categorical, numeric, label, torch.from_numpy(values), torch.from_numpy(offsets))
