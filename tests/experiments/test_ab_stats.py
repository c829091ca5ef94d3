"""Each A/B statistic against hand-computed values, scipy, or a bootstrap on a fixed dataset."""

from __future__ import annotations

import numpy as np
import pytest
from _ab_synth import users
from scipy import stats as sps

from recforge.experiments import stats

X = np.array([1.0, 0.0, 2.0, 1.0])
N = np.array([3.0, 2.0, 4.0, 1.0])


def test_ratio_estimate_matches_the_hand_computed_delta_method():
    est = stats.ratio_estimate(X, N)
    assert est.value == pytest.approx(0.4)
    # Influence (x - R n) / mean(n) = [-0.08, -0.32, 0.16, 0.24]; sample variance 0.064; / 4 users.
    assert est.variance == pytest.approx(0.016)
    # The textbook form: (1/N)(1/mu_n^2)(var_x - 2 R cov_xn + R^2 var_n).
    cov = np.cov(X, N)
    textbook = (cov[0, 0] - 2 * 0.4 * cov[0, 1] + 0.16 * cov[1, 1]) / N.mean() ** 2 / X.size
    assert est.variance == pytest.approx(textbook)


def test_delta_method_variance_agrees_with_a_bootstrap():
    rng = np.random.default_rng(3)
    u = users(rng, (1500,))
    est = stats.ratio_estimate(u["clicks"], u["imps"])
    idx = rng.integers(0, 1500, (4000, 1500))
    boot = u["clicks"][idx].sum(axis=1) / u["imps"][idx].sum(axis=1)
    assert est.variance == pytest.approx(boot.var(ddof=1), rel=0.08)
    # Treating impressions as independent trials understates it: that is why users are the unit.
    naive = est.value * (1 - est.value) / u["imps"].sum()
    assert naive < 0.8 * est.variance


def test_lift_ci_and_p_value_by_hand():
    t = stats.RatioEstimate(value=0.055, variance=0.001**2, users=100, numerator=0, denominator=0)
    c = stats.RatioEstimate(value=0.050, variance=0.0012**2, users=100, numerator=0, denominator=0)
    r = stats.lift(t, c, alpha=0.05)
    se = np.sqrt(0.001**2 + 0.0012**2)
    assert r.abs_lift == pytest.approx(0.005)
    assert r.abs_ci == pytest.approx((0.005 - 1.959964 * se, 0.005 + 1.959964 * se), rel=1e-6)
    assert r.p_value == pytest.approx(2 * sps.norm.sf(0.005 / se))
    rel_se = np.sqrt(0.001**2 / 0.05**2 + 0.055**2 * 0.0012**2 / 0.05**4)
    assert r.rel_lift == pytest.approx(0.1)
    assert r.rel_ci == pytest.approx((0.1 - 1.959964 * rel_se, 0.1 + 1.959964 * rel_se), rel=1e-6)


def test_mean_lift_is_the_unequal_variance_z_test():
    rng = np.random.default_rng(0)
    a, b = rng.poisson(3.0, 4000).astype(float), rng.poisson(3.1, 5000).astype(float)
    r = stats.mean_lift(a, b)
    se = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    assert r.abs_se == pytest.approx(se)
    welch = sps.ttest_ind(a, b, equal_var=False)
    assert r.p_value == pytest.approx(welch.pvalue, rel=0.01)  # t and z agree at this size


def test_constant_variants_and_a_zero_control_do_not_crash():
    same = stats.ratio_lift(np.zeros(5), np.ones(5), np.zeros(5), np.ones(5))
    assert same.p_value == 1.0 and same.abs_lift == 0.0
    assert np.isnan(same.rel_lift)
    with pytest.raises(ValueError, match="at least 2 users"):
        stats.ratio_estimate([1.0], [2.0])


def test_holm_against_a_known_example():
    adjusted = stats.holm([0.01, 0.04, 0.03, 0.005])
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> made monotone.
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    with_nan = stats.holm([0.01, np.nan, 0.02])
    assert with_nan[0] == pytest.approx(0.02) and np.isnan(with_nan[1]) and with_nan[2] == pytest.approx(0.02)


def test_srm_on_a_known_table():
    r = stats.srm_check([50_000, 50_500])
    assert r.chi2 == pytest.approx(2 * 250**2 / 50_250)
    assert r.p_value == pytest.approx(sps.chi2.sf(2 * 250**2 / 50_250, 1))
    assert not r.flagged


def test_srm_flags_52_48_and_not_50_50():
    assert stats.srm_check([52_000, 48_000]).flagged
    assert not stats.srm_check([50_000, 50_000]).flagged
    assert not stats.srm_check([50_090, 49_910]).flagged
    # The intended split comes from the weights: 30/70 is fine when 30/70 was asked for.
    assert not stats.srm_check([30_050, 69_950], [3, 7]).flagged
    assert stats.srm_check([30_050, 69_950]).flagged
    with pytest.raises(ValueError, match="weights"):
        stats.srm_check([10, 10], [1, 0])


def test_cuped_theta_is_pooled_least_squares_for_a_mean_metric():
    rng = np.random.default_rng(5)
    x1, x2 = rng.normal(0, 1, 300), rng.normal(0.5, 1, 400)
    y1, y2 = 2.0 * x1 + rng.normal(0, 1, 300), 2.0 * x2 + 1 + rng.normal(0, 1, 400)
    r = stats.cuped_adjust([y1, y2], [np.ones(300), np.ones(400)], [x1, x2])
    xc = np.concatenate([x1 - x1.mean(), x2 - x2.mean()])
    yc = np.concatenate([y1 - y1.mean(), y2 - y2.mean()])
    assert r.theta[0] == pytest.approx((xc @ yc) / (xc @ xc))
    grand = np.concatenate([x1, x2]).mean()
    assert r.adjusted[0].value == pytest.approx(y1.mean() - r.theta[0] * (x1.mean() - grand))
    assert r.variance_reduction > 0.7  # the covariate explains ~80% of the variance


def test_mde_by_hand():
    m = stats.mde_from_se(0.01, baseline=0.05, alpha=0.05, power=0.8)
    assert m.abs == pytest.approx((1.959964 + 0.841621) * 0.01, rel=1e-5)
    assert m.rel == pytest.approx(m.abs / 0.05)
    rng = np.random.default_rng(1)
    t, c = users(rng, (1000,)), users(rng, (1000,))
    direct = stats.mde(t["clicks"], t["imps"], c["clicks"], c["imps"])
    assert direct.abs == pytest.approx(2.801585 * stats.ratio_lift(t["clicks"], t["imps"], c["clicks"],
                                                                   c["imps"]).abs_se, rel=1e-5)
