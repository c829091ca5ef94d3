"""Honest evaluation: the same metrics for any scorer on the same held-out split.

`evaluate` takes anything with the model signature (categorical, numeric) -> logits: an eager
model, a scripted or loaded bundle, or the popularity baseline, so the numbers reported for a
model in training, in export and in serving come from one function. Retrieval is judged the same
way for every user encoder: `full_catalog_metrics` ranks the whole catalog, no sampled negatives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from recforge.arrays import Csr, pairs_to_csr, slice_users
from recforge.data.batches import SplitData, iterate_batches
from recforge.metrics import (
    auc,
    catalog_coverage,
    gauc_detail,
    hit_rate_at_k,
    logloss,
    mrr_at_k,
    ndcg_per_user,
    recall_per_user,
    sigmoid,
    standard_error,
    topk_from_scores,
)

# (categorical, numeric, history_values, history_offsets) -> logits: every model's signature.
Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def predict_logits(
    scorer: Scorer, data: SplitData, batch_size: int = 65536, device: torch.device | str | None = None
) -> np.ndarray:
    if isinstance(scorer, torch.nn.Module):
        scorer.eval()
        if device is None:
            tensors = [*scorer.parameters(), *scorer.buffers()]
            device = tensors[0].device if tensors else "cpu"
    device = device or "cpu"
    out = []
    for batch in iterate_batches(data, batch_size, shuffle=False):
        batch = batch.to(device)
        out.append(scorer(batch.categorical, batch.numeric, batch.history_values, batch.history_offsets)
                   .float().cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def ranking_metrics(labels: np.ndarray, logits: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """AUC, impression-weighted per-user GAUC, logloss, and how much of the data GAUC covers."""
    probs = sigmoid(logits)
    detail = gauc_detail(labels, logits, groups)
    return {
        "auc": auc(labels, logits),
        "gauc": detail["gauc"],
        "logloss": logloss(labels, probs),
        "gauc_users": float(detail["groups_used"]),
        "rows": float(len(labels)),
        "positive_rate": float(np.mean(labels)) if len(labels) else float("nan"),
    }


def evaluate(
    scorer: Scorer, data: SplitData, batch_size: int = 65536, device: torch.device | str | None = None
) -> dict[str, float]:
    return evaluate_parts(scorer, (data,), batch_size, device)


def evaluate_parts(
    scorer: Scorer, parts: Iterable[SplitData], batch_size: int = 65536, device: torch.device | str | None = None
) -> dict[str, float]:
    """`evaluate` over a split read in parts (its shards): only each row's label, logit and user key
    (24 bytes) are kept across parts, so the metrics are exact and the rows are never all in memory."""
    labels, logits, users = [], [], []
    for part in parts:
        logits.append(predict_logits(scorer, part, batch_size, device))
        labels.append(part.label.numpy().astype(np.float64))
        users.append(part.user_key)
        del part  # before the next part is read: one part in memory at a time, not two
    if len(labels) == 1:  # one part (a split in memory): no copies
        return ranking_metrics(labels[0], logits[0], users[0])
    if not labels:
        return ranking_metrics(np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64))
    return ranking_metrics(np.concatenate(labels), np.concatenate(logits), np.concatenate(users))


def full_catalog_metrics(
    score_chunk: Callable[[int, int], np.ndarray],
    num_users: int,
    truth: Csr,
    exclude: Csr,
    num_items: int,
    ks: tuple[int, ...] = (10, 20),
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall/NDCG/HitRate/MRR@k and coverage, ranking EVERY item for every user (no sampled negatives),
    with the standard error of recall and NDCG (`recall@k_se`: per-user std / sqrt(users)).

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
        recall, ndcg = recall_per_user(top, truth, k), ndcg_per_user(top, truth, k)
        out[f"recall@{k}"], out[f"recall@{k}_se"] = float(recall.mean()), standard_error(recall)
        out[f"ndcg@{k}"], out[f"ndcg@{k}_se"] = float(ndcg.mean()), standard_error(ndcg)
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


def retrieval_task(train: SplitData, data: SplitData, times: np.ndarray, item_column: int,
                   users_from: str = "all") -> RetrievalTask:
    """The users of `data` with at least one positive, queried at their first positive's moment.

    users_from="warm" keeps only users with a positive in `train` (user_key is the log-wide key, so
    a user the vocabulary calls unknown is still told apart from another).
    """
    if users_from not in ("all", "warm"):
        raise ValueError(f"retrieval users must be 'all' or 'warm', got {users_from!r}")
    positive = (data.label > 0).numpy()
    positive_rows = np.flatnonzero(positive)
    if users_from == "warm":
        warm = np.unique(train.user_key[(train.label > 0).numpy()])
        positive_rows = positive_rows[np.isin(data.user_key[positive_rows], warm)]
    if len(positive_rows) == 0:
        raise ValueError(f"split '{data.name}' has no positive rows ({users_from} users) to evaluate retrieval on")
    by_user_time = positive_rows[np.lexsort((times[positive_rows], data.user_key[positive_rows]))]
    users, first = np.unique(data.user_key[by_user_time], return_index=True)
    queries = data.select(torch.from_numpy(by_user_time[first]))
    truth = pairs_to_csr(np.searchsorted(users, data.user_key[positive_rows]),
                         data.categorical[positive_rows, item_column].numpy(), len(users))
    train_rows = np.flatnonzero((train.label > 0).numpy())
    train_users = train.user_key[train_rows]
    known = np.isin(train_users, users)
    exclude = pairs_to_csr(np.searchsorted(users, train_users[known]),
                           train.categorical[train_rows[known], item_column].numpy(), len(users))
    return RetrievalTask(users, queries, truth, exclude)
