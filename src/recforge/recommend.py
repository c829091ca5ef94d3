"""Two-stage recommendation: retrieve candidates from the item index, rank them, keep the top k.

Everything works on a batch of users at once: one user-tower pass, one index search, one ranker
call over every (user, candidate) pair. The inputs are plain callables and tensors (a scripted
module loaded from a bundle works as well as an eager one), which is why the serving side can
call this same function without any training code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from recforge.data.batches import SplitData, gather_ragged
from recforge.index import ItemIndex
from recforge.metrics import (
    catalog_coverage,
    hit_rate_at_k,
    in_sorted,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    slice_users,
    topk_from_scores,
)

# (categorical, numeric, history_values, history_offsets) -> [B] logits or [B, D] user vectors.
Encoder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Csr = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Requests:
    """A batch of users in the ranking layout: the item columns are filled in per candidate."""

    categorical: torch.Tensor  # [B, F]
    numeric: torch.Tensor  # [B, N]
    history_values: torch.Tensor  # ragged, see data.batches.Batch
    history_offsets: torch.Tensor  # [B + 1], or empty when there are no histories


@dataclass(frozen=True)
class Recommendations:
    items: torch.Tensor  # [B, k] item indices (-1 where fewer than k candidates were left)
    ranking_scores: torch.Tensor  # [B, k] ranker logits
    retrieval_scores: torch.Tensor  # [B, k] index scores of the same items


def retrieve(
    requests: Requests,
    user_encoder: Encoder,
    index: ItemIndex,
    num_candidates: int,
    exclude: Csr | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, num_candidates] candidate items and their retrieval scores (-1 / -inf where the catalog ran out).

    Excluded items (e.g. what the user has already seen) are removed after the search, so the
    search asks for as many extra items as the longest exclusion list.
    """
    with torch.no_grad():
        vectors = user_encoder(requests.categorical, requests.numeric, requests.history_values,
                               requests.history_offsets).float().cpu().numpy()
    extra = int(np.diff(exclude[0]).max()) if exclude is not None and len(exclude[0]) > 1 else 0
    scores, ids = index.search(vectors, num_candidates + extra)
    if exclude is not None and extra:
        indptr, indices = exclude
        owner = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        # One vectorized membership test over all (user, item) pairs: key = user * span + item.
        span = int(max(ids.max(initial=0), indices.max(initial=0))) + 1
        keys = np.sort(owner * span + indices)
        banned = (ids >= 0) & in_sorted(keys, np.arange(len(ids))[:, None] * span + np.maximum(ids, 0))
        scores = np.where(banned, -np.inf, scores)
        ids = np.where(banned, -1, ids)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :num_candidates]
        scores = np.take_along_axis(scores, order, 1)
        ids = np.take_along_axis(ids, order, 1)
    return torch.from_numpy(ids[:, :num_candidates].astype(np.int64)), torch.from_numpy(
        scores[:, :num_candidates].astype(np.float32))


def rank(
    requests: Requests,
    candidates: torch.Tensor,
    ranker: Encoder,
    item_columns: list[int],
    item_features: torch.Tensor,
) -> torch.Tensor:
    """Ranker logits [B, C] for every (user, candidate) pair, in ONE call of the ranker.

    `item_features[i]` holds item i's values for `item_columns` (item id first, then its features).
    """
    batch, count = candidates.shape
    rows = torch.arange(batch).repeat_interleave(count)
    safe = candidates.clamp(min=0).reshape(-1)
    categorical = requests.categorical.index_select(0, rows).clone()
    categorical[:, item_columns] = item_features.index_select(0, safe)
    numeric = requests.numeric.index_select(0, rows)
    if requests.history_offsets.numel() == batch + 1:
        values, offsets = gather_ragged(requests.history_values, requests.history_offsets, rows)
    else:
        values, offsets = requests.history_values, requests.history_offsets
    with torch.no_grad():
        logits = ranker(categorical, numeric, values, offsets).float().reshape(batch, count)
    return logits.masked_fill(candidates < 0, float("-inf"))


def recommend(
    requests: Requests,
    user_encoder: Encoder,
    index: ItemIndex,
    ranker: Encoder,
    item_columns: list[int],
    item_features: torch.Tensor,
    *,
    k: int = 10,
    num_candidates: int = 200,
    exclude: Csr | None = None,
) -> Recommendations:
    if k > num_candidates:
        raise ValueError(f"k ({k}) cannot exceed the number of candidates ({num_candidates})")
    candidates, retrieval_scores = retrieve(requests, user_encoder, index, num_candidates, exclude)
    logits = rank(requests, candidates, ranker, item_columns, item_features)
    top = torch.topk(logits, min(k, logits.shape[1]), dim=1)
    items = candidates.gather(1, top.indices)
    return Recommendations(
        items=items.masked_fill(torch.isinf(top.values), -1),
        ranking_scores=top.values,
        retrieval_scores=retrieval_scores.gather(1, top.indices),
    )


def full_catalog_metrics(
    score_chunk: Callable[[int, int], np.ndarray],
    num_users: int,
    truth: Csr,
    exclude: Csr,
    num_items: int,
    ks: tuple[int, ...] = (10, 20),
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall/NDCG/HitRate/MRR@k and coverage, ranking EVERY item for every user (no sampled negatives).

    `score_chunk(start, stop)` returns the [stop - start, num_items] scores of those users; users
    are scored a chunk at a time so the full score matrix never exists.
    """
    kmax = max(ks)
    tops = []
    for start in range(0, num_users, chunk):
        stop = min(start + chunk, num_users)
        scores = np.asarray(score_chunk(start, stop), dtype=np.float64)
        scores[:, 0] = -np.inf  # index 0 is the unknown item, never a recommendation
        tops.append(topk_from_scores(scores, kmax, slice_users(exclude, start, stop)))
    top = np.concatenate(tops) if tops else np.zeros((0, kmax), dtype=np.int64)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(top, truth, k)
        out[f"ndcg@{k}"] = ndcg_at_k(top, truth, k)
        out[f"hitrate@{k}"] = hit_rate_at_k(top, truth, k)
        out[f"mrr@{k}"] = mrr_at_k(top, truth, k)
        out[f"coverage@{k}"] = catalog_coverage(top[:, :k], num_items)
    out["users"] = float(num_users)
    return out


@dataclass(frozen=True)
class RetrievalTask:
    """Who is asked, with what, and what counts as a hit, for full-catalog evaluation of a split."""

    users: np.ndarray  # user keys, sorted
    queries: SplitData  # one row per user: their first row of the split (context + history before it)
    truth: Csr  # per user: items they clicked in the split
    exclude: Csr  # per user: items they clicked in training (never recommended back)


def pairs_to_csr(owner: np.ndarray, items: np.ndarray, num_owners: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique (owner, item) pairs as (indptr, indices), sorted by owner then item."""
    if len(owner) == 0:
        return np.zeros(num_owners + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    span = int(items.max()) + 1
    keys = np.unique(owner.astype(np.int64) * span + items)
    rows, cols = keys // span, keys % span
    indptr = np.zeros(num_owners + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=num_owners), out=indptr[1:])
    return indptr, cols.astype(np.int64)



def retrieval_task(train: SplitData, data: SplitData, times: np.ndarray, item_col: int) -> RetrievalTask:
    """The users of `data` with at least one positive, queried at their first positive's moment."""
    positive = (data.label > 0).numpy()
    positive_rows = np.flatnonzero(positive)
    if len(positive_rows) == 0:
        raise ValueError(f"split '{data.name}' has no positive rows to evaluate retrieval on")
    by_user_time = positive_rows[np.lexsort((times[positive_rows], data.user_key[positive_rows]))]
    users, first = np.unique(data.user_key[by_user_time], return_index=True)
    queries = data.select(torch.from_numpy(by_user_time[first]))
    truth = pairs_to_csr(np.searchsorted(users, data.user_key[positive_rows]),
                         data.categorical[positive_rows, item_col].numpy(), len(users))
    train_rows = np.flatnonzero((train.label > 0).numpy())
    train_users = train.user_key[train_rows]
    known = np.isin(train_users, users)
    exclude = pairs_to_csr(np.searchsorted(users, train_users[known]),
                           train.categorical[train_rows[known], item_col].numpy(), len(users))
    return RetrievalTask(users, queries, truth, exclude)
