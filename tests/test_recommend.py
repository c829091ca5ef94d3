"""Two-stage recommendation on hand-built towers whose right answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recforge.evaluate import full_catalog_metrics
from recforge.index import ItemIndex
from recforge.metrics import recall_at_k
from recforge.recommend import Requests, rank, recommend, retrieve

ITEMS = 50
DIM = 4


def _item_vectors() -> np.ndarray:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(ITEMS, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _requests(users: list[int]) -> Requests:
    categorical = torch.zeros((len(users), 3), dtype=torch.long)
    categorical[:, 0] = torch.tensor(users)
    return Requests(categorical, torch.zeros((len(users), 0)), torch.zeros(0, dtype=torch.long),
                    torch.zeros(0, dtype=torch.long))


def _user_encoder(vectors: np.ndarray):
    table = torch.from_numpy(vectors)

    def encode(categorical, numeric, values, offsets):
        return table[categorical[:, 0]]  # user u looks exactly like item u

    return encode


def test_retrieve_finds_the_nearest_items_and_skips_excluded():
    vectors = _item_vectors()
    index = ItemIndex.build(vectors, kind="flat", metric="ip")
    ids, scores = retrieve(_requests([3, 7]), _user_encoder(vectors), index, num_candidates=5)
    assert ids[:, 0].tolist() == [3, 7]  # a vector's nearest neighbour is itself
    exact = np.argsort(-(vectors[[3, 7]] @ vectors.T), axis=1)[:, :5]
    assert np.array_equal(ids.numpy(), exact)
    exclude = (np.array([0, 2, 3]), np.array([3, int(exact[0, 1]), 7]))
    ids2, _ = retrieve(_requests([3, 7]), _user_encoder(vectors), index, num_candidates=5, exclude=exclude)
    assert 3 not in ids2[0].tolist() and int(exact[0, 1]) not in ids2[0].tolist() and 7 not in ids2[1].tolist()
    assert ids2[0].tolist() == [i for i in exact_full(vectors, 3) if i not in (3, int(exact[0, 1]))][:5]


def exact_full(vectors: np.ndarray, user: int) -> list[int]:
    return np.argsort(-(vectors[user] @ vectors.T)).tolist()


def test_rank_scores_every_pair_in_one_call_and_orders_by_the_ranker():
    vectors = _item_vectors()
    index = ItemIndex.build(vectors, kind="flat", metric="ip")
    calls = []
    item_features = torch.stack([torch.arange(ITEMS), torch.arange(ITEMS) % 5], dim=1)

    def ranker(categorical, numeric, values, offsets):
        calls.append(categorical.shape[0])
        return -categorical[:, 1].float()  # prefers small item ids, ignoring retrieval

    result = recommend(_requests([3, 7]), _user_encoder(vectors), index, ranker, [1, 2], item_features,
                       k=3, num_candidates=10)
    assert calls == [20]  # 2 users x 10 candidates, one batched call
    candidates, _ = retrieve(_requests([3, 7]), _user_encoder(vectors), index, num_candidates=10)
    for row in range(2):
        assert result.items[row].tolist() == sorted(candidates[row].tolist())[:3]
    assert torch.all(result.ranking_scores[:, :-1] >= result.ranking_scores[:, 1:])
    # the item features reach the ranker in the item columns
    seen = rank(_requests([3]), torch.tensor([[4, 9]]), lambda c, n, v, o: c[:, 2].float(), [1, 2], item_features)
    assert seen.tolist() == [[4.0, 4.0]]


def test_k_larger_than_candidates_is_refused():
    vectors = _item_vectors()
    index = ItemIndex.build(vectors, kind="flat")
    with pytest.raises(ValueError, match="cannot exceed"):
        recommend(_requests([1]), _user_encoder(vectors), index, lambda *a: a[0][:, 1].float(), [1],
                  torch.arange(ITEMS)[:, None], k=20, num_candidates=10)


def test_full_catalog_metrics_rank_every_item_and_exclude_training_items():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(30, 40))
    truth_items = [rng.choice(np.arange(1, 40), 3, replace=False) for _ in range(30)]
    truth = (np.arange(0, 91, 3), np.concatenate(truth_items))
    best = np.argsort(-scores, axis=1)[:, :2]  # exclude each user's two best items
    exclude = (np.arange(0, 61, 2), np.sort(best, axis=1).reshape(-1))
    out = full_catalog_metrics(lambda a, b: scores[a:b], 30, truth, exclude, 40, ks=(5,), chunk=7)
    masked = scores.copy()
    masked[:, 0] = -np.inf
    np.put_along_axis(masked, best, -np.inf, axis=1)
    top = np.argsort(-masked, axis=1, kind="stable")[:, :5]
    assert out["recall@5"] == pytest.approx(recall_at_k(top, truth, 5))
    assert out["users"] == 30
