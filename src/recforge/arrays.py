"""Array layouts shared by every layer: CSR pairs, ragged (values, offsets) rows, sorted-key membership.

A leaf: the data layer, the metrics, the retrieval path and the server all speak these layouts, so
they live below all of them instead of in one of them (the data layer would otherwise import the
metrics, and the server the data layer).

Per-owner item sets (ground truth, items to exclude) are CSR pairs (indptr, indices): owner u holds
indices[indptr[u]:indptr[u + 1]], the layout of scipy.sparse.csr_matrix. Ragged rows (user histories)
are the same thing as torch tensors: values + offsets, ready for `EmbeddingBag`.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

CsrLike = tuple[ArrayLike, ArrayLike]
Csr = tuple[np.ndarray, np.ndarray]


def check_csr(pair: CsrLike, num_owners: int, name: str) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """`pair` as int64 (indptr, indices), or a ValueError naming `name` and what is wrong with it."""
    indptr = np.asarray(pair[0], dtype=np.int64)
    indices = np.asarray(pair[1], dtype=np.int64)
    if indptr.ndim != 1 or indptr.shape[0] != num_owners + 1:
        raise ValueError(f"{name} indptr must be 1-d of length users + 1 = {num_owners + 1}, got shape {indptr.shape}")
    if indices.ndim != 1 or indptr[0] != 0 or indptr[-1] != indices.shape[0] or np.any(np.diff(indptr) < 0):
        raise ValueError(
            f"{name} is not a valid (indptr, indices) pair: indptr must start at 0, never decrease and end at "
            f"len(indices) = {indices.shape[0]}"
        )
    if indices.shape[0] and indices.min() < 0:
        raise ValueError(f"{name} holds negative item indices")
    return indptr, indices


def csr_owners(indptr: NDArray[np.int64]) -> NDArray[np.int64]:
    """The owner of every stored entry (the row ids of a CSR matrix)."""
    return np.repeat(np.arange(indptr.shape[0] - 1, dtype=np.int64), np.diff(indptr))


def slice_users(pair: CsrLike, start: int, stop: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Users [start, stop) of a CSR pair, re-based to start at 0: the `exclude` of one chunk of users."""
    indptr = np.asarray(pair[0], dtype=np.int64)
    indices = np.asarray(pair[1], dtype=np.int64)
    if not 0 <= start <= stop <= indptr.shape[0] - 1:
        raise ValueError(f"user range [{start}, {stop}) is outside the {indptr.shape[0] - 1} users")
    return indptr[start : stop + 1] - indptr[start], indices[indptr[start] : indptr[stop]]


def pairs_to_csr(owner: np.ndarray, items: np.ndarray, num_owners: int) -> Csr:
    """Unique (owner, item) pairs as (indptr, indices), sorted by owner then item."""
    if len(owner) == 0:
        return np.zeros(num_owners + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    span = int(items.max()) + 1
    keys = np.unique(owner.astype(np.int64) * span + items)
    rows, cols = keys // span, keys % span
    indptr = np.zeros(num_owners + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=num_owners), out=indptr[1:])
    return indptr, cols.astype(np.int64)


def in_sorted(sorted_keys: NDArray[np.int64], query: NDArray[np.int64]) -> NDArray[np.bool_]:
    """Elementwise membership of `query` in the ascending array `sorted_keys` (one searchsorted).

    The (user, item) pair tests of retrieval, exclusion and negative sampling all encode pairs as
    user * base + item and ask this question.
    """
    if sorted_keys.shape[0] == 0:
        return np.zeros(np.shape(query), dtype=bool)
    position = np.minimum(np.searchsorted(sorted_keys, query), sorted_keys.shape[0] - 1)
    return sorted_keys[position] == query


def gather_ragged(
    values: torch.Tensor, offsets: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `index` of a ragged (values, offsets) array, as a new ragged array: three vector ops."""
    starts = offsets.index_select(0, index)
    lengths = offsets.index_select(0, index + 1) - starts
    new_offsets = torch.zeros(len(index) + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=new_offsets[1:])
    shift = torch.repeat_interleave(starts - new_offsets[:-1], lengths)
    return values.index_select(0, torch.arange(int(new_offsets[-1])) + shift), new_offsets
