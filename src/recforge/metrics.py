"""Ranking and calibration metrics as pure functions on numpy arrays.

Evaluation runs on tens of millions of impressions, so every metric here is one or two sorts plus
vectorized reductions: no per-row or per-group Python. The library deliberately does not depend on
scikit-learn; the tests check these functions against it instead.

AUC is computed as the Mann-Whitney U statistic over runs of tied scores: within a run of equal
scores every positive beats the negatives of all lower runs and half of the negatives of its own
run. That is exactly the rank-sum formula with average ranks for ties, but it works with counts
instead of rank sums, which keeps the numbers small and extends directly to per-group AUC.
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
from numpy.typing import ArrayLike, NDArray

from recforge.arrays import CsrLike, check_csr, csr_owners, in_sorted

# Keeps Platt's Newton system well conditioned when scores separate the classes perfectly (the
# unpenalized slope would run off to infinity); applied to the slope on standardized scores.
_PLATT_RIDGE = 1e-4


class GaucDetail(TypedDict):
    gauc: float
    groups_used: int
    groups_total: int
    impressions_used: int
    impressions_total: int


def sigmoid(x: ArrayLike) -> NDArray[np.float64]:
    """Logistic function that never overflows: exp is only taken of non-positive numbers."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _binary_labels(labels: ArrayLike, n: int) -> NDArray[np.bool_]:
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must be a 1-d array of length {n}, got shape {y.shape}")
    if y.dtype == np.bool_:
        return y
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0/1 (or boolean) for ranking metrics")
    return y.astype(bool)


def _finite_scores(scores: ArrayLike, name: str = "scores") -> NDArray[np.float64]:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-d array, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} contain NaN or infinite values; AUC needs a total order")
    return s


def _tie_runs(*sorted_keys: NDArray) -> NDArray[np.intp]:
    """Start offsets of runs where all the (already sorted) keys are equal."""
    n = sorted_keys[0].shape[0]
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for key in sorted_keys:
        change[1:] |= key[1:] != key[:-1]
    return np.flatnonzero(change)


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC; tied scores count one half, as in the rank-sum formula with average ranks."""
    s = _finite_scores(scores)
    y = _binary_labels(labels, s.shape[0])
    n_pos = int(np.count_nonzero(y))
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        only = "positive" if n_neg == 0 else "negative"
        raise ValueError(f"AUC is undefined when only one class is present (all {y.shape[0]} labels {only})")
    # Order within a tie run does not matter (only run totals are used), so no stable sort needed.
    order = np.argsort(s)
    s_sorted = s[order]
    starts = _tie_runs(s_sorted)
    pos_run = np.add.reduceat(y[order].astype(np.int64), starts)
    neg_run = np.diff(np.append(starts, s.shape[0])) - pos_run
    neg_below = np.cumsum(neg_run) - neg_run
    u = np.dot(pos_run, neg_below) + 0.5 * np.dot(pos_run, neg_run)
    return float(u / (n_pos * n_neg))


def logloss(labels: ArrayLike, probs: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy; clipping keeps one confident mistake from making it infinite."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if p.ndim != 1 or p.shape != y.shape or p.shape[0] == 0:
        raise ValueError(
            f"labels and probs must be non-empty 1-d arrays of one length, got {y.shape}, {p.shape}"
        )
    if not np.all((y >= 0) & (y <= 1)):
        raise ValueError("labels must lie in [0, 1]")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contain NaN or infinite values")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def gauc_detail(labels: ArrayLike, scores: ArrayLike, groups: ArrayLike) -> GaucDetail:
    """Impression-weighted mean of per-group AUC, plus how much of the data it covers.

    Groups with a single class have no AUC and are skipped (as in the DIN paper), so the coverage
    numbers matter: a GAUC over 10% of the impressions says little about the other 90%.
    """
    s = _finite_scores(scores)
    n = s.shape[0]
    y = _binary_labels(labels, n)
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise ValueError(f"groups must be a 1-d array of length {n}, got shape {g.shape}")
    if g.dtype == object:
        # argsort cannot order arbitrary objects; dense codes keep group identity, which is all we need.
        g = np.unique(g, return_inverse=True)[1]

    # Sort by score, then stably by group: the same order as np.lexsort((s, g)), about 30% faster.
    by_score = np.argsort(s)
    order = by_score[np.argsort(g[by_score], kind="stable")]
    g_sorted = g[order]
    starts = _tie_runs(g_sorted, s[order])
    pos_run = np.add.reduceat(y[order].astype(np.int64), starts)
    neg_run = np.diff(np.append(starts, n)) - pos_run

    # Runs are sorted by group, so a group's runs are contiguous; number groups by counting changes.
    run_groups = g_sorted[starts]
    new_group = np.ones(starts.shape[0], dtype=bool)
    new_group[1:] = run_groups[1:] != run_groups[:-1]
    gid = np.cumsum(new_group) - 1
    n_groups = int(gid[-1]) + 1

    # Negatives below a run within its group = global negatives below it minus those of earlier groups.
    neg_below_global = np.cumsum(neg_run) - neg_run
    neg_below = neg_below_global - neg_below_global[new_group][gid]
    u = np.bincount(gid, weights=pos_run * (neg_below + 0.5 * neg_run), minlength=n_groups)
    pos = np.bincount(gid, weights=pos_run, minlength=n_groups)
    neg = np.bincount(gid, weights=neg_run, minlength=n_groups)

    used = (pos > 0) & (neg > 0)
    if not used.any():
        raise ValueError(
            f"GAUC is undefined: none of the {n_groups} groups has both a positive and a negative label"
        )
    weight = (pos + neg)[used]
    group_auc = u[used] / (pos[used] * neg[used])
    return GaucDetail(
        gauc=float(np.dot(weight, group_auc) / weight.sum()),
        groups_used=int(used.sum()),
        groups_total=n_groups,
        impressions_used=int(weight.sum()),
        impressions_total=n,
    )


def gauc(labels: ArrayLike, scores: ArrayLike, groups: ArrayLike) -> float:
    """Group (user) AUC: ranking quality within each user, which global AUC mixes with user bias."""
    return gauc_detail(labels, scores, groups)["gauc"]


def platt(scores: ArrayLike, a: float, b: float) -> NDArray[np.float64]:
    """Calibrated probabilities sigmoid(a * score + b) for parameters from `fit_platt`."""
    return sigmoid(a * np.asarray(scores, dtype=np.float64) + b)


def _platt_loss(z: NDArray[np.float64], y: NDArray[np.float64], a: float, b: float) -> float:
    t = a * z + b
    # log(1 + exp(t)) - y * t is the per-row cross-entropy; logaddexp keeps it finite.
    return float(np.mean(np.logaddexp(0.0, t) - y * t) + 0.5 * _PLATT_RIDGE * a * a)


def fit_platt(scores: ArrayLike, labels: ArrayLike, iters: int = 50) -> tuple[float, float]:
    """Fit (a, b) so that sigmoid(a * score + b) is a calibrated probability.

    Lets a score that is not a probability (a popularity count, a dot product) report an honest
    logloss. Newton's method on standardized scores converges in a handful of steps; a tiny ridge
    on the slope keeps it finite when the scores separate the classes, and step halving keeps
    every step downhill.
    """
    s = _finite_scores(scores)
    y = _binary_labels(labels, s.shape[0]).astype(np.float64)
    rate = float(y.mean())
    if rate in (0.0, 1.0):
        raise ValueError("fit_platt needs both positive and negative labels")
    mean, std = float(s.mean()), float(s.std())
    if std == 0.0:
        # A constant score carries no information: the best calibration is the base rate.
        return 0.0, float(np.log(rate / (1.0 - rate)))

    z = (s - mean) / std
    a, b = 0.0, float(np.log(rate / (1.0 - rate)))
    loss = _platt_loss(z, y, a, b)
    for _ in range(iters):
        p = sigmoid(a * z + b)
        r = p - y
        w = p * (1.0 - p)
        grad = np.array([np.mean(r * z) + _PLATT_RIDGE * a, np.mean(r)])
        hess = np.array(
            [[np.mean(w * z * z) + _PLATT_RIDGE, np.mean(w * z)], [np.mean(w * z), np.mean(w) + 1e-12]]
        )
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-10:
            new_a, new_b = a - t * float(step[0]), b - t * float(step[1])
            new_loss = _platt_loss(z, y, new_a, new_b)
            if new_loss <= loss:
                break
            t *= 0.5
        else:
            break
        converged = abs(new_a - a) + abs(new_b - b) < 1e-10
        a, b, loss = new_a, new_b, new_loss
        if converged:
            break
    # Undo the standardization: a*z + b = (a/std)*s + (b - a*mean/std).
    return a / std, b - a * mean / std


# ---------------------------------------------------------------- retrieval over the full catalog
#
# Per-user item sets (ground truth, items to exclude) are CSR pairs (indptr, indices): user u holds
# indices[indptr[u]:indptr[u + 1]], the layout of scipy.sparse.csr_matrix and of the ragged arrays in
# the data layer. Scoring every item for every user does not fit in memory for real catalogs, so
# callers score a chunk of users at a time, keep only `topk_from_scores` of each chunk ([U, k] ints),
# and compute the metrics once on the concatenated lists. Membership of a recommended item in a
# user's ground truth is one np.searchsorted of (user * base + item) keys into the sorted truth
# keys: no per-user Python, whatever the number of users.

def topk_from_scores(scores: ArrayLike, k: int, exclude: CsrLike | None = None) -> NDArray[np.int64]:
    """The k highest-scoring items of each user, best first: [users, items] scores -> [users, k] item ids.

    `exclude` (indptr, indices) removes items per user (typically what they interacted with in
    training, which retrieval should not re-recommend) by scoring them -inf. Slots that can only be
    filled with -inf-scored items (a user with fewer than k eligible items, or k > items) hold -1, so
    an excluded item never appears. Ties are broken by the lower item id within the top k; which of
    several tied items at the k-th place get in is unspecified. One argpartition (O(items)) plus a
    sort of the k survivors per user, all vectorized.
    """
    s = np.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be a 2-d [users, items] array, got shape {s.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; a ranking needs a total order (score excluded items -inf instead)")
    n_users, n_items = s.shape
    if exclude is not None:
        indptr, indices = check_csr(exclude, n_users, "exclude")
        if indices.shape[0]:
            if indices.max() >= n_items:
                raise ValueError(f"exclude holds item {int(indices.max())} but scores cover only {n_items} items")
            s = s.copy()  # never write into the caller's scores
            s[csr_owners(indptr), indices] = -np.inf
    take = min(k, n_items)
    out = np.full((n_users, k), -1, dtype=np.int64)
    if n_users == 0 or take == 0:
        return out
    # The `take` largest land (unordered) in the last columns; sorting them by id first makes the
    # stable descending sort that follows break ties by the lower id.
    candidates = np.sort(np.argpartition(s, n_items - take, axis=1)[:, n_items - take :], axis=1)
    top_scores = np.take_along_axis(s, candidates, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    ranked = np.take_along_axis(candidates, order, axis=1)
    ranked[np.take_along_axis(top_scores, order, axis=1) == -np.inf] = -1
    out[:, :take] = ranked
    return out


def _retrieval_hits(
    topk: ArrayLike, truth: CsrLike, k: int | None
) -> tuple[NDArray[np.bool_], NDArray[np.int64], int]:
    """(hit [users, k]: is the item at each rank relevant, distinct ground-truth items per user, k)."""
    top = np.asarray(topk)
    if top.ndim != 2 or not np.issubdtype(top.dtype, np.integer):
        raise ValueError(f"topk must be a 2-d integer [users, k] array of item ids, got {top.dtype} {top.shape}")
    k = top.shape[1] if k is None else k
    if not 1 <= k <= top.shape[1]:
        raise ValueError(f"k must lie in [1, {top.shape[1]}] (the length of the top-k lists), got {k}")
    top = top[:, :k].astype(np.int64, copy=False)
    n_users = top.shape[0]
    indptr, indices = check_csr(truth, n_users, "truth")
    # Keys user * base + item are unique per (user, item) for any base above every item id.
    base = max(int(top.max(initial=0)), int(indices.max(initial=0))) + 1
    truth_keys = np.unique(csr_owners(indptr) * base + indices)  # sorted; repeated truth items count once
    n_truth = np.bincount(truth_keys // base, minlength=n_users).astype(np.int64)
    keys = np.arange(n_users, dtype=np.int64)[:, None] * base + top
    hit = in_sorted(truth_keys, keys) & (top >= 0)  # -1 marks an empty slot, never a hit
    return hit, n_truth, k


def _users_with_truth(values: NDArray[np.float64], n_truth: NDArray[np.int64], name: str) -> NDArray[np.float64]:
    has_truth = n_truth > 0
    if not has_truth.any():
        raise ValueError(f"{name} is undefined: none of the {n_truth.shape[0]} users has a ground-truth item")
    return values[has_truth]


def _mean_over_users_with_truth(values: NDArray[np.float64], n_truth: NDArray[np.int64], name: str) -> float:
    return float(_users_with_truth(values, n_truth, name).mean())


def recall_per_user(topk: ArrayLike, truth: CsrLike, k: int | None = None) -> NDArray[np.float64]:
    """|relevant in top k| / |relevant| of each user that has ground truth (k defaults to topk's width).

    Top-k rows are expected to hold distinct items, as `topk_from_scores` returns them.
    """
    hit, n_truth, _ = _retrieval_hits(topk, truth, k)
    return _users_with_truth(hit.sum(axis=1) / np.maximum(n_truth, 1), n_truth, "recall@k")


def recall_at_k(topk: ArrayLike, truth: CsrLike, k: int | None = None) -> float:
    """Mean over users with ground truth of recall_per_user."""
    return float(recall_per_user(topk, truth, k).mean())


def ndcg_per_user(topk: ArrayLike, truth: CsrLike, k: int | None = None) -> NDArray[np.float64]:
    """Binary-relevance NDCG of each user with ground truth: DCG = sum of 1 / log2(rank + 1) over relevant
    ranks (1-based), divided by the DCG of an ideal list, which puts min(k, |relevant|) relevant items first."""
    hit, n_truth, k = _retrieval_hits(topk, truth, k)
    discounts = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    dcg = hit @ discounts
    ideal = np.cumsum(discounts)[np.clip(n_truth, 1, k) - 1]
    return _users_with_truth(dcg / ideal, n_truth, "ndcg@k")


def ndcg_at_k(topk: ArrayLike, truth: CsrLike, k: int | None = None) -> float:
    """Mean over users with ground truth of ndcg_per_user."""
    return float(ndcg_per_user(topk, truth, k).mean())


def standard_error(values: NDArray[np.float64]) -> float:
    """std / sqrt(n) of a mean over users (sample std; 0 for a single user): how far another draw of
    users could move it, what a difference between two models must clear to mean anything."""
    n = len(values)
    return float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0


def hit_rate_at_k(topk: ArrayLike, truth: CsrLike, k: int | None = None) -> float:
    """Share of users (with ground truth) that find at least one relevant item in their top k."""
    hit, n_truth, _ = _retrieval_hits(topk, truth, k)
    return _mean_over_users_with_truth(hit.any(axis=1).astype(np.float64), n_truth, "hit_rate@k")


def mrr_at_k(topk: ArrayLike, truth: CsrLike, k: int | None = None) -> float:
    """Mean reciprocal rank of the first relevant item, counting 0 when none is in the top k."""
    hit, n_truth, _ = _retrieval_hits(topk, truth, k)
    first = np.argmax(hit, axis=1)  # the first True; 0 for a row without any, masked just below
    reciprocal = np.where(hit.any(axis=1), 1.0 / (first + 1.0), 0.0)
    return _mean_over_users_with_truth(reciprocal, n_truth, "mrr@k")


def catalog_coverage(topk: ArrayLike, num_items: int) -> float:
    """Share of the catalog recommended to at least one user: low coverage means a few popular items
    crowd out the rest, which accuracy metrics alone do not show. Empty (-1) slots are ignored."""
    top = np.asarray(topk)
    if num_items < 1:
        raise ValueError(f"num_items must be at least 1, got {num_items}")
    items = top[top >= 0].astype(np.int64, copy=False)
    if items.shape[0] and items.max() >= num_items:
        raise ValueError(f"topk holds item {int(items.max())}, outside a catalog of {num_items} items")
    return float(np.count_nonzero(np.bincount(items, minlength=num_items)) / num_items)
