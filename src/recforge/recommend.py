"""Two-stage recommendation: retrieve candidates from the item index, rank them, keep the top k.

Everything works on a batch of users at once: one user-tower pass, one index search, one ranker
call over every (user, candidate) pair. The inputs are plain callables and tensors (a scripted
module loaded from a bundle works as well as an eager one), which is why the serving side can
call this same function without any training code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from recforge.arrays import Csr, gather_ragged, in_sorted

if TYPE_CHECKING:
    # Only retrieval needs FAISS: a server that loads no retrieval bundle never imports it.
    from recforge.index import ItemIndex

# (categorical, numeric, history_values, history_offsets) -> [B] logits or [B, D] user vectors.
Encoder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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
