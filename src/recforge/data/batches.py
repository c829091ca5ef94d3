"""Typed batches sliced from in-memory tensors.

A prepared split is loaded once (from memory-mappable .npy files) into tensors; an epoch is a
seeded permutation of row indices cut into slices, and a batch is one `index_select` per tensor.
There is no per-row Python and no DataLoader worker machinery: at recommender batch sizes a
per-sample Dataset costs more than the model step itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recforge.arrays import gather_ragged
from recforge.data.shards import concat_shards, split_shards

_EMPTY = torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class Batch:
    categorical: torch.Tensor  # [B, F] int64, field-local indices (0 = unknown)
    numeric: torch.Tensor  # [B, N] float32, standardized
    label: torch.Tensor  # [B] float32 in {0, 1}
    # The user's clicked items before each event (item-vocabulary indices), ragged:
    # row i is history_values[history_offsets[i]:history_offsets[i + 1]]. Empty when not prepared.
    history_values: torch.Tensor = _EMPTY
    history_offsets: torch.Tensor = _EMPTY

    def _map(self, fn) -> Batch:  # noqa: ANN001 - a tensor -> tensor function
        return Batch(fn(self.categorical), fn(self.numeric), fn(self.label), fn(self.history_values),
                     fn(self.history_offsets))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return int(self.label.shape[0])


@dataclass(frozen=True)
class SplitData:
    """One split (train/valid/test) of a prepared dataset, held as CPU tensors."""

    name: str
    categorical: torch.Tensor
    numeric: torch.Tensor
    label: torch.Tensor
    # Grouping key for per-user metrics: a dense id over ALL users of the log, so users unseen in
    # training (who share the unknown embedding row) still form separate groups.
    user_key: np.ndarray
    history_values: torch.Tensor | None = None
    history_offsets: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @classmethod
    def load(cls, prepared_dir: str | Path, split: str) -> SplitData:
        """The whole split in memory: every shard of it (data.shards), concatenated in order."""
        columns = concat_shards(split_shards(prepared_dir, split))
        return cls.from_columns(split, columns)

    @classmethod
    def each_shard(cls, prepared_dir: str | Path, split: str) -> Iterator[SplitData]:
        """The split one shard at a time, each in memory only while the caller holds it: what a
        streamed run evaluates with, so its memory stays one shard whatever the split's size."""
        for shard in split_shards(prepared_dir, split):
            yield cls.from_columns(split, shard.load())

    @classmethod
    def from_columns(cls, split: str, columns: dict[str, np.ndarray]) -> SplitData:
        def tensor(name: str) -> torch.Tensor:
            # Copy out of the memory map: training reads every row each epoch, and a private copy
            # keeps torch from warning about (and writing through) a read-only mapping.
            return torch.from_numpy(np.array(columns[name]))

        has_history = "history_values" in columns
        return cls(
            name=split,
            categorical=tensor("categorical"),
            numeric=tensor("numeric"),
            label=tensor("label"),
            user_key=np.array(columns["user_key"]),
            history_values=tensor("history_values") if has_history else None,
            history_offsets=tensor("history_offsets") if has_history else None,
        )

    def select(self, rows: torch.Tensor) -> SplitData:
        """A new split holding only `rows` (e.g. the positives, for retrieval training)."""
        values, offsets = (None, None)
        if self.history_values is not None and self.history_offsets is not None:
            values, offsets = gather_ragged(self.history_values, self.history_offsets, rows)
        return SplitData(self.name, self.categorical[rows], self.numeric[rows], self.label[rows],
                         self.user_key[rows.numpy()], values, offsets)

    def batch(self, index: torch.Tensor) -> Batch:
        batch = Batch(
            self.categorical.index_select(0, index),
            self.numeric.index_select(0, index),
            self.label.index_select(0, index),
        )
        if self.history_values is None or self.history_offsets is None:
            return batch
        values, offsets = gather_ragged(self.history_values, self.history_offsets, index)
        return Batch(batch.categorical, batch.numeric, batch.label, values, offsets)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The row order of one epoch, a pure function of (seed, epoch): what makes resume exact."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def shard_indices(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of an epoch: every rank gets the same number of rows (DDP needs equal steps)."""
    if world_size == 1:
        return order
    per_rank = len(order) // world_size
    return order[rank : per_rank * world_size : world_size]


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    per_rank = n if world_size == 1 else n // world_size
    return (per_rank + batch_size - 1) // batch_size


def iterate_batches(
    data: SplitData,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    start_sample: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """Yield this rank's batches of one epoch, skipping the first `start_sample` rows of the epoch's order.

    The position is counted in rows of the global order, not in steps, so a run checkpointed
    with one number of processes can resume with another: the remaining rows are re-sharded.
    """
    n = len(data)
    order = epoch_permutation(n, seed, epoch) if shuffle else torch.arange(n)
    order = shard_indices(order[start_sample:], rank, world_size)
    for start in range(0, len(order), batch_size):
        batch = data.batch(order[start : start + batch_size])
        yield batch.pin_memory() if pin_memory else batch
