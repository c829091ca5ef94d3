import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from recforge.metrics import auc, fit_platt, gauc, gauc_detail, logloss, platt, sigmoid

# ---------------------------------------------------------------- auc


def test_auc_hand_example():
    # Positives 0.35, 0.8; negatives 0.1, 0.4. Pairs won: 0.35>0.1, 0.8>0.1, 0.8>0.4; lost: 0.35<0.4.
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75, abs=1e-12)


def test_auc_ties_count_half():
    # Positives 0.5, 0.9; negatives 0.5, 0.2. Pairs: (0.5 vs 0.5) tie = 1/2, the other three won.
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(3.5 / 4, abs=1e-12)
    assert auc([0, 1, 1, 0, 1], [0.3] * 5) == pytest.approx(0.5, abs=1e-12)


def test_auc_extremes_and_label_types():
    assert auc([0, 0, 1, 1], [1, 2, 3, 4]) == 1.0
    assert auc([1, 1, 0, 0], [1, 2, 3, 4]) == 0.0
    scores = [0.2, 0.7, 0.1, 0.9]
    assert auc(np.array([False, True, False, True]), scores) == auc([0.0, 1.0, 0.0, 1.0], scores)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    n = 50_000
    labels = rng.integers(0, 2, n)
    # Only 13 distinct scores, correlated with the label: thousands of ties per value.
    scores = np.round(rng.normal(size=n) + 0.5 * labels, 1).clip(-0.6, 0.6)
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), rel=1e-9)


def test_auc_single_class_raises():
    with pytest.raises(ValueError, match="one class"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one class"):
        auc([0, 0], [0.1, 0.2])


def test_auc_rejects_bad_input():
    with pytest.raises(ValueError, match="0/1"):
        auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        auc([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="length"):
        auc([0, 1], [0.1, 0.2, 0.3])


# ---------------------------------------------------------------- logloss


def test_logloss_hand_example():
    # -(ln 0.8 + ln(1 - 0.4)) / 2
    expected = -(math.log(0.8) + math.log(0.6)) / 2
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(expected, rel=1e-12)


def test_logloss_clips_confident_mistakes():
    eps = 1e-7
    value = logloss([1, 0], [0.0, 1.0], eps=eps)
    assert math.isfinite(value)
    assert value == pytest.approx(-math.log(eps), rel=1e-6)


def test_logloss_matches_sklearn():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 20_000)
    probs = rng.uniform(0.01, 0.99, 20_000)
    assert logloss(labels, probs) == pytest.approx(log_loss(labels, probs), rel=1e-9)


# ---------------------------------------------------------------- gauc


def _gauc_reference(labels, scores, groups):
    """The obvious loop over users with sklearn, impression-weighted."""
    total = weight = 0.0
    for g in np.unique(groups):
        mask = groups == g
        y = labels[mask]
        if y.min() == y.max():
            continue
        total += mask.sum() * roc_auc_score(y, scores[mask])
        weight += mask.sum()
    return total / weight


def _random_groups(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.geometric(0.05, size=200)  # 1 .. ~100 impressions per group
    groups = np.repeat(np.arange(200) * 7 + 3, sizes)  # non-contiguous ids
    n = groups.shape[0]
    labels = (rng.random(n) < 0.3).astype(np.int64)
    labels[groups % 5 == 0] = 0  # a fifth of the groups have only negatives
    scores = rng.integers(0, 10, n) / 10.0  # heavy ties within groups
    perm = rng.permutation(n)  # interleave the groups
    return labels[perm], scores[perm], groups[perm]


@pytest.mark.parametrize("seed", [0, 1])
def test_gauc_matches_loop_over_users(seed):
    labels, scores, groups = _random_groups(seed)
    expected = _gauc_reference(labels, scores, groups)
    assert gauc(labels, scores, groups) == pytest.approx(expected, rel=1e-9)


def test_gauc_detail_counts_coverage():
    labels, scores, groups = _random_groups(0)
    detail = gauc_detail(labels, scores, groups)
    both = [g for g in np.unique(groups) if 0 < labels[groups == g].sum() < (groups == g).sum()]
    assert detail["groups_total"] == 200
    assert detail["groups_used"] == len(both)
    assert detail["impressions_used"] == int(np.isin(groups, both).sum())
    assert detail["impressions_total"] == labels.shape[0]
    assert detail["groups_used"] < detail["groups_total"]


def test_gauc_ignores_row_order_and_group_id_type():
    labels, scores, groups = _random_groups(1)
    base = gauc(labels, scores, groups)
    perm = np.random.default_rng(9).permutation(labels.shape[0])
    assert gauc(labels[perm], scores[perm], groups[perm]) == pytest.approx(base, rel=1e-12)
    as_text = np.array([f"user-{g}" for g in groups], dtype=object)
    assert gauc(labels, scores, as_text) == pytest.approx(base, rel=1e-12)


def test_gauc_weights_by_impressions():
    # Group a: 4 impressions, positive ranked first -> AUC 1. Group b: 2 impressions, inverted -> AUC 0.
    # Group c: positives only -> skipped. Weighted (4*1 + 2*0) / 6 = 2/3; an unweighted mean would be 1/2.
    groups = np.array(["a", "a", "a", "a", "b", "b", "c", "c"])
    labels = np.array([1, 0, 0, 0, 1, 0, 1, 1])
    scores = np.array([0.9, 0.1, 0.2, 0.3, 0.1, 0.9, 0.5, 0.6])
    detail = gauc_detail(labels, scores, groups)
    assert detail["gauc"] == pytest.approx(2 / 3, abs=1e-12)
    assert (detail["groups_used"], detail["groups_total"]) == (2, 3)
    assert (detail["impressions_used"], detail["impressions_total"]) == (6, 8)


def test_gauc_ties_within_group_count_half():
    # One group; positive and negative tie at 0.4, the other negative is below: (1/2 + 1) / 2.
    assert gauc([1, 0, 0], [0.4, 0.4, 0.1], [5, 5, 5]) == pytest.approx(0.75, abs=1e-12)


def test_gauc_without_mixed_group_raises():
    with pytest.raises(ValueError, match="both a positive and a negative"):
        gauc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4], [1, 1, 2, 2])


# ---------------------------------------------------------------- platt / sigmoid


def test_sigmoid_is_stable_at_extremes():
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        out = sigmoid(np.array([-1000.0, -1.0, 0.0, 1.0, 1000.0]))
    np.testing.assert_allclose(out, [0.0, 1 / (1 + math.e), 0.5, 1 / (1 + math.exp(-1)), 1.0], atol=1e-15)


def test_fit_platt_recovers_known_parameters():
    rng = np.random.default_rng(4)
    scores = rng.normal(1.0, 2.0, 200_000)
    labels = (rng.random(scores.shape[0]) < sigmoid(1.5 * scores - 0.7)).astype(np.int64)
    a, b = fit_platt(scores, labels)
    assert a == pytest.approx(1.5, abs=0.05)
    assert b == pytest.approx(-0.7, abs=0.05)


def test_platt_improves_logloss_of_popularity_score():
    # A popularity count is not a probability; after log1p + Platt it must beat the base rate.
    rng = np.random.default_rng(5)
    counts = rng.poisson(rng.gamma(1.0, 20.0, 30_000))
    labels = (rng.random(counts.shape[0]) < sigmoid(0.8 * np.log1p(counts) - 3.0)).astype(np.int64)
    score = np.log1p(counts)
    a, b = fit_platt(score, labels)
    calibrated = logloss(labels, platt(score, a, b))
    constant = logloss(labels, np.full(labels.shape[0], labels.mean()))
    assert calibrated < constant - 0.01
    # Calibrated: the mean prediction matches the base rate (a property of the logistic MLE).
    assert platt(score, a, b).mean() == pytest.approx(labels.mean(), abs=1e-3)


def test_fit_platt_stays_finite_on_separable_scores():
    a, b = fit_platt([0.0, 1.0, 2.0, 3.0], [0, 0, 1, 1])
    assert math.isfinite(a) and math.isfinite(b) and a > 0
    probs = platt([0.0, 3.0], a, b)
    assert probs[0] < 0.5 < probs[1]


def test_fit_platt_constant_scores_give_base_rate():
    a, b = fit_platt(np.full(4, 7.0), [1, 0, 0, 0])
    assert a == 0.0
    assert sigmoid(b) == pytest.approx(0.25, abs=1e-12)


def test_fit_platt_needs_both_classes():
    with pytest.raises(ValueError, match="both"):
        fit_platt([0.1, 0.2], [1, 1])
