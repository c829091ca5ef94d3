"""Full-catalog retrieval metrics: hand-computed examples, exclusion, and a slow per-user reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recforge.arrays import slice_users
from recforge.metrics import (
    catalog_coverage,
    hit_rate_at_k,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    topk_from_scores,
)


def _csr(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in rows])
    return indptr, np.array([i for r in rows for i in r], dtype=np.int64)


# ---------------------------------------------------------------- top-k


def test_topk_hand_example_and_exclusion():
    scores = np.array([[0.1, 0.9, 0.5, 0.3], [0.4, 0.2, 0.8, 0.6]])
    assert topk_from_scores(scores, 2).tolist() == [[1, 2], [2, 3]]
    # User 0 already has item 1 (and 2), user 1 has nothing to exclude.
    assert topk_from_scores(scores, 2, exclude=_csr([[1, 2], []])).tolist() == [[3, 0], [2, 3]]
    assert scores[0, 1] == 0.9  # the caller's scores are left as they were


def test_topk_pads_with_minus_one_when_too_few_items_remain():
    scores = np.array([[3.0, 1.0, 2.0]])
    assert topk_from_scores(scores, 5).tolist() == [[0, 2, 1, -1, -1]]
    assert topk_from_scores(scores, 3, exclude=_csr([[0, 2]])).tolist() == [[1, -1, -1]]


def test_topk_breaks_ties_by_lower_item_id():
    scores = np.array([[1.0, 5.0, 5.0, 0.0, 5.0]])
    assert topk_from_scores(scores, 3).tolist() == [[1, 2, 4]]


def test_topk_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        topk_from_scores(np.array([[0.1, np.nan]]), 1)
    with pytest.raises(ValueError, match="only 2 items"):
        topk_from_scores(np.zeros((1, 2)), 1, exclude=_csr([[5]]))
    with pytest.raises(ValueError, match="indptr"):
        topk_from_scores(np.zeros((2, 2)), 1, exclude=_csr([[0]]))


def test_excluded_training_items_never_appear_and_chunks_agree():
    rng = np.random.default_rng(0)
    users, items, k = 300, 500, 20
    scores = rng.normal(size=(users, items)).astype(np.float32)
    train = [sorted(rng.choice(items, rng.integers(0, 60), replace=False).tolist()) for _ in range(users)]
    # Make the training items the best-scored ones, so exclusion is what keeps them out.
    for u, row in enumerate(train):
        scores[u, row] += 10.0
    exclude = _csr(train)
    top = topk_from_scores(scores, k, exclude=exclude)
    assert top.shape == (users, k) and (top >= 0).all()
    for u, row in enumerate(train):
        assert not set(top[u].tolist()) & set(row)
    # Chunk by chunk (what full-catalog evaluation does) gives the same lists.
    chunks = [topk_from_scores(scores[s : s + 64], k, exclude=slice_users(exclude, s, min(s + 64, users)))
              for s in range(0, users, 64)]
    assert np.array_equal(np.concatenate(chunks), top)


# ---------------------------------------------------------------- metrics: hand-computed

# user 0: top [3, 1, 4], truth {1, 9}       -> hit at rank 2
# user 1: top [2, 0, 5], truth {5}          -> hit at rank 3
# user 2: top [7, 8, 9], truth {}           -> no ground truth: left out of every mean
# user 3: top [6, 1, 0], truth {0, 1, 6, 2} -> hits at ranks 1, 2, 3
# user 4: top [5, 6, 7], truth {8}          -> no hit
TOP = np.array([[3, 1, 4], [2, 0, 5], [7, 8, 9], [6, 1, 0], [5, 6, 7]])
TRUTH = _csr([[1, 9], [5], [], [0, 1, 6, 2], [8]])
D2, D3, D4 = 1 / math.log2(3), 1 / math.log2(4), 1.0  # discounts of ranks 2, 3 (rank 1: 1/log2(2) = 1)


def test_recall_hand_example():
    # (1/2 + 1/1 + 3/4 + 0) / 4 users with truth
    assert recall_at_k(TOP, TRUTH) == pytest.approx((0.5 + 1 + 0.75 + 0) / 4)
    assert recall_at_k(TOP, TRUTH, k=1) == pytest.approx((0 + 0 + 1 / 4 + 0) / 4)


def test_ndcg_hand_example():
    user0 = D2 / (1 + D2)  # ideal: min(3, 2) = 2 relevant at ranks 1, 2
    user1 = D3 / 1  # ideal: 1 relevant at rank 1
    user3 = (1 + D2 + D3) / (1 + D2 + D3)  # ideal: min(3, 4) = 3, all ranks relevant
    assert ndcg_at_k(TOP, TRUTH) == pytest.approx((user0 + user1 + user3 + 0) / 4)
    assert ndcg_at_k(TOP, TRUTH) == pytest.approx(0.4717133, abs=1e-7)
    assert ndcg_at_k(TOP, TRUTH, k=1) == pytest.approx(0.25)


def test_hit_rate_and_mrr_hand_example():
    assert hit_rate_at_k(TOP, TRUTH) == pytest.approx(3 / 4)
    assert mrr_at_k(TOP, TRUTH) == pytest.approx((1 / 2 + 1 / 3 + 1 + 0) / 4)
    assert mrr_at_k(TOP, TRUTH, k=2) == pytest.approx((1 / 2 + 0 + 1 + 0) / 4)


def test_catalog_coverage_hand_example():
    assert catalog_coverage(TOP, 20) == pytest.approx(10 / 20)  # items 0..9 are recommended to someone
    assert catalog_coverage(np.array([[0, -1], [0, 3]]), 4) == pytest.approx(2 / 4)  # -1 is an empty slot
    with pytest.raises(ValueError, match="outside a catalog"):
        catalog_coverage(TOP, 5)


def test_empty_slots_and_repeated_truth_do_not_count():
    top = np.array([[-1, 4], [2, -1]])
    # User 0's truth lists 4 twice: one relevant item. Keys are user * base + item with base 5 here,
    # so user 1's empty slot (-1) has key 4, which is user 0's item 4: it must not count as a hit.
    truth = _csr([[4, 4], [1]])
    assert recall_at_k(top, truth) == pytest.approx((1 + 0) / 2)
    assert hit_rate_at_k(np.array([[-1, -1]]), _csr([[0]])) == 0.0


def test_metrics_need_some_user_with_truth():
    with pytest.raises(ValueError, match="none of the 2 users"):
        recall_at_k(np.array([[0], [1]]), _csr([[], []]))
    with pytest.raises(ValueError, match="k must lie"):
        recall_at_k(TOP, TRUTH, k=4)


# ---------------------------------------------------------------- metrics: against a slow reference


def _slow(top: np.ndarray, truth_rows: list[list[int]], k: int) -> dict[str, float]:
    sums = {"recall": 0.0, "ndcg": 0.0, "hit": 0.0, "mrr": 0.0}
    users = 0
    for u, rel in enumerate(truth_rows):
        rel = set(rel)
        if not rel:
            continue
        users += 1
        ranked = top[u, :k].tolist()
        hits = [i in rel for i in ranked]
        sums["recall"] += sum(hits) / len(rel)
        dcg = sum(1 / math.log2(r + 2) for r, h in enumerate(hits) if h)
        sums["ndcg"] += dcg / sum(1 / math.log2(r + 2) for r in range(min(k, len(rel))))
        sums["hit"] += float(any(hits))
        sums["mrr"] += next((1 / (r + 1) for r, h in enumerate(hits) if h), 0.0)
    return {name: total / users for name, total in sums.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_a_per_user_loop(seed):
    rng = np.random.default_rng(seed)
    users, items = 400, 60
    scores = rng.normal(size=(users, items))
    truth_rows = [rng.choice(items, rng.integers(0, 12), replace=False).tolist() for _ in range(users)]
    truth = _csr(truth_rows)
    top = topk_from_scores(scores, 20)
    for k in (1, 5, 20):
        slow = _slow(top, truth_rows, k)
        assert recall_at_k(top, truth, k) == pytest.approx(slow["recall"], rel=1e-12)
        assert ndcg_at_k(top, truth, k) == pytest.approx(slow["ndcg"], rel=1e-12)
        assert hit_rate_at_k(top, truth, k) == pytest.approx(slow["hit"], rel=1e-12)
        assert mrr_at_k(top, truth, k) == pytest.approx(slow["mrr"], rel=1e-12)
    # The top-k itself against a full sort per user (continuous scores: no ties).
    assert np.array_equal(top, np.argsort(-scores, axis=1, kind="stable")[:, :20])


def test_a_retrieval_task_of_warm_users_leaves_out_users_without_a_training_positive():
    import torch

    from recforge.data.batches import SplitData
    from recforge.evaluate import retrieval_task

    def split(name, users, items, labels):
        return SplitData(name, torch.tensor([[u, i] for u, i in zip(users, items, strict=True)]),
                         torch.zeros((len(users), 0)), torch.tensor(labels, dtype=torch.float32),
                         np.array(users, dtype=np.int64))

    train = split("train", [1, 1, 2, 3], [5, 6, 5, 7], [1, 0, 0, 1])  # user 2 has no training positive
    test = split("test", [1, 2, 3, 4, 4], [7, 6, 5, 5, 6], [1, 1, 1, 1, 0])  # user 4 is new
    times = np.arange(5)
    everyone = retrieval_task(train, test, times, 1)
    warm = retrieval_task(train, test, times, 1, "warm")
    assert everyone.users.tolist() == [1, 2, 3, 4] and warm.users.tolist() == [1, 3]
    assert warm.truth[1].tolist() == [7, 5]  # each warm user's own test positives
    assert warm.exclude[1].tolist() == [5, 7]
    with pytest.raises(ValueError, match="'all' or 'warm'"):
        retrieval_task(train, test, times, 1, "cold")


def test_standard_errors_are_the_per_user_std_over_root_n():
    from recforge.evaluate import full_catalog_metrics
    from recforge.metrics import ndcg_per_user, recall_per_user, standard_error

    rng = np.random.default_rng(5)
    scores = rng.normal(size=(40, 30))
    truth = (np.arange(0, 81, 2), rng.integers(1, 30, 80))  # two items per user
    exclude = (np.zeros(41, dtype=np.int64), np.zeros(0, dtype=np.int64))
    out = full_catalog_metrics(lambda a, b: scores[a:b], 40, truth, exclude, 30, ks=(5,))
    top = np.argsort(-np.where(np.arange(30) == 0, -np.inf, scores), axis=1, kind="stable")[:, :5]
    recall = recall_per_user(top, truth, 5)
    assert out["recall@5"] == pytest.approx(recall.mean())
    assert out["recall@5_se"] == pytest.approx(recall.std(ddof=1) / np.sqrt(40))
    assert out["recall@5_se"] == pytest.approx(standard_error(recall))
    assert out["ndcg@5_se"] == pytest.approx(standard_error(ndcg_per_user(top, truth, 5)))
    assert standard_error(np.array([0.3])) == 0.0
