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
