"""The gate's statistics: per-user metrics against brute force, and the paired tests' behaviour."""

from __future__ import annotations

import numpy as np
import pytest

from recforge.metrics import auc, gauc
from recforge.pipeline.gate import (
    check_guardrails,
    decide,
    paired_bootstrap,
    paired_ttest,
    per_user_auc,
    per_user_ndcg,
)
from recforge.pipeline.settings import GateSettings


def _holdout(seed: int = 0, users: int = 300, rows_per_user: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(users), rows_per_user)
    signal = rng.normal(size=len(user))
    label = (signal + rng.normal(size=len(user)) > 1.0).astype(np.float64)
    return user, label, signal


def test_per_user_auc_matches_each_users_own_auc_with_ties():
    rng = np.random.default_rng(3)
    users = rng.integers(0, 25, size=400)
    labels = rng.integers(0, 2, size=400).astype(float)
    scores = rng.integers(0, 5, size=400).astype(float)  # many ties
    ids, values = per_user_auc(labels, scores, users)
    for uid, value in zip(ids, values, strict=True):
        mine = users == uid
        assert value == pytest.approx(auc(labels[mine], scores[mine]))
    both = [u for u in np.unique(users) if 0 < labels[users == u].mean() < 1]
    assert list(ids) == both  # single-class users are left out
    weights = np.array([np.sum(users == u) for u in ids])
    assert np.dot(weights, values) / weights.sum() == pytest.approx(gauc(labels, scores, users))


def test_per_user_ndcg_is_one_for_a_perfect_ranking_and_lower_otherwise():
    users = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    labels = np.array([1, 0, 0, 0, 1, 0, 1, 1])  # user 2 has no negative: left out
    perfect = labels.astype(float)
    ids, values = per_user_ndcg(labels, perfect, users)
    assert list(ids) == [0, 1] and np.allclose(values, 1.0)
    worst = -perfect
    _, low = per_user_ndcg(labels, worst, users)
    assert np.allclose(low, 1.0 / np.log2(4.0))  # the one positive ranked third of three


def test_paired_bootstrap_detects_a_real_improvement():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.8, size=400)
    better = base + 0.02 + rng.normal(0, 0.03, size=400)
    result = paired_bootstrap(better, base, samples=1000, seed=1)
    assert result.significant() and result.p_value < 0.01
    assert result.ci_low > 0 and result.ci_low < result.mean_diff < result.ci_high
    assert result.n_users == 400 and result.mean_diff == pytest.approx(np.mean(better - base))


def test_no_effect_gives_no_small_p_value():
    rng = np.random.default_rng(5)
    base = rng.uniform(0.5, 0.8, size=400)
    same = base + rng.normal(0, 0.03, size=400) - 0.0  # noise only
    same -= np.mean(same - base)  # exactly no mean difference
    boot = paired_bootstrap(same, base, samples=1000, seed=2)
    ttest = paired_ttest(same, base)
    assert boot.p_value > 0.2 and ttest.p_value > 0.2
    assert not boot.significant() and not ttest.significant()
    assert boot.ci_low < 0 < boot.ci_high and ttest.ci_low < 0 < ttest.ci_high


def test_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(9)
    a, b = rng.uniform(size=200), rng.uniform(size=200)
    assert paired_bootstrap(a, b, 500, seed=4) == paired_bootstrap(a, b, 500, seed=4)
    assert paired_bootstrap(a, b, 500, seed=4).ci_low != paired_bootstrap(a, b, 500, seed=5).ci_low


def test_ttest_agrees_with_scipy():
    from scipy import stats

    rng = np.random.default_rng(1)
    a, b = rng.normal(0.7, 0.1, 100), rng.normal(0.69, 0.1, 100)
    assert paired_ttest(a, b).p_value == pytest.approx(stats.ttest_rel(a, b, alternative="greater").pvalue)


def test_guardrails_allow_the_tolerance_and_no_more():
    settings = GateSettings(logloss_tolerance=0.01, calibration_tolerance=0.05, coverage_tolerance=0.0)
    ref = {"logloss": 0.40, "calibration": 1.02, "coverage": 0.95}
    ok = check_guardrails({"logloss": 0.409, "calibration": 0.94, "coverage": 0.95}, ref, settings)
    assert all(c["ok"] for c in ok.values())
    bad = check_guardrails({"logloss": 0.42, "calibration": 1.2, "coverage": 0.90}, ref, settings)
    assert not any(c["ok"] for c in bad.values())


def test_decide_refuses_a_challenger_that_is_no_better_than_the_champion():
    user, label, signal = _holdout()
    known = np.ones(len(label), dtype=bool)
    scores = {"label": label, "user_key": user, "challenger": signal - 1.5, "champion": signal - 1.5,
              "popularity": np.full(len(label), -1.5), "challenger_item_known": known, "champion_item_known": known}
    same = decide(scores, GateSettings(bootstrap_samples=300), parity_ok=True, parity_detail={},
                  champion_version=3)
    assert same["decision"] == "refuse" and same["champion_version"] == 3
    assert any("not significant" in r for r in same["reasons"])
    better = decide({**scores, "champion": signal - 1.5 + np.random.default_rng(99).normal(0, 1.5, len(label))},
                    GateSettings(bootstrap_samples=300, calibration_tolerance=1.0, logloss_tolerance=1.0),
                    parity_ok=True, parity_detail={}, champion_version=3)
    assert better["decision"] == "pass", better["reasons"]
    assert better["paired_test"]["p_value"] < 0.05 and better["paired_test"]["n_users"] > 100
    first = decide({k: v for k, v in scores.items() if k != "champion"}, GateSettings(calibration_tolerance=1.0,
                   logloss_tolerance=1.0), parity_ok=False, parity_detail="logits differ", champion_version=None)
    assert first["no_champion"] and first["reference"] == "popularity" and "no champion" in first["summary"]
    assert first["decision"] == "refuse" and "parity" in first["reasons"][0]
