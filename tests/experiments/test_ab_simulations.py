"""Seeded simulations: the tests hold their nominal error rates and the CIs their coverage.

400 experiments per check, 2,000 heterogeneous users per arm (Beta CTR, Gamma activity). The
binomial standard error of a rate over 400 runs is ~0.011, so the bands below are about +-2 SE.
"""

from __future__ import annotations

import numpy as np
import pytest
from _ab_synth import CTR_MEAN, users

from recforge.experiments import stats

SIMS, USERS = 400, 2000
LIFT = 0.05


def _pre(u: dict[str, np.ndarray], s: int) -> np.ndarray:
    return np.stack([u["pre_clicks"][s], u["pre_imps"][s]], axis=1)


def _run(control: dict, treatment: dict, cuped: bool = False) -> tuple[list[stats.LiftResult], list[float]]:
    results, reductions = [], []
    for s in range(SIMS):
        if cuped:
            adj = stats.cuped_adjust([treatment["clicks"][s], control["clicks"][s]],
                                     [treatment["imps"][s], control["imps"][s]], [_pre(treatment, s), _pre(control, s)])
            results.append(stats.lift(adj.adjusted[0], adj.adjusted[1]))
            reductions.append(adj.variance_reduction)
        else:
            results.append(stats.ratio_lift(treatment["clicks"][s], treatment["imps"][s],
                                            control["clicks"][s], control["imps"][s]))
    return results, reductions


@pytest.fixture(scope="module")
def aa():
    rng = np.random.default_rng(20240601)
    return users(rng, (SIMS, USERS)), users(rng, (SIMS, USERS))


@pytest.fixture(scope="module")
def known_lift():
    rng = np.random.default_rng(20240602)
    return users(rng, (SIMS, USERS)), users(rng, (SIMS, USERS), lift=LIFT)


def _rejections(results: list[stats.LiftResult]) -> float:
    return float(np.mean([r.p_value < 0.05 for r in results]))


def _coverage(results: list[stats.LiftResult]) -> tuple[float, float]:
    true_abs = CTR_MEAN * LIFT  # impressions are independent of CTR, so population CTR = mean CTR
    abs_cov = np.mean([r.abs_ci[0] <= true_abs <= r.abs_ci[1] for r in results])
    rel_cov = np.mean([r.rel_ci[0] <= LIFT <= r.rel_ci[1] for r in results])
    return float(abs_cov), float(rel_cov)


def test_aa_false_positive_rate_is_alpha(aa):
    results, _ = _run(*aa)
    assert 0.03 <= _rejections(results) <= 0.07


def test_known_lift_cis_cover_the_truth(known_lift):
    results, _ = _run(*known_lift)
    abs_cov, rel_cov = _coverage(results)
    assert 0.92 <= abs_cov <= 0.98
    assert 0.92 <= rel_cov <= 0.98
    # Unbiased: the average estimate sits within 3 standard errors of the truth.
    rel = np.array([r.rel_lift for r in results])
    assert abs(rel.mean() - LIFT) < 3 * rel.std() / np.sqrt(SIMS)


def test_cuped_reduces_variance_and_stays_unbiased(aa, known_lift):
    aa_results, reductions = _run(*aa, cuped=True)
    assert 0.03 <= _rejections(aa_results) <= 0.07
    assert np.mean(reductions) > 0.3  # the pre-period shares each user's CTR and activity
    raw, _ = _run(*known_lift)
    adjusted, _ = _run(*known_lift, cuped=True)
    abs_cov, rel_cov = _coverage(adjusted)
    assert 0.92 <= abs_cov <= 0.98 and 0.92 <= rel_cov <= 0.98
    # Narrower CIs, so more power at the same true lift.
    assert np.mean([r.abs_se for r in adjusted]) < 0.85 * np.mean([r.abs_se for r in raw])
    assert _rejections(adjusted) > _rejections(raw)
    rel = np.array([r.rel_lift for r in adjusted])
    assert abs(rel.mean() - LIFT) < 3 * rel.std() / np.sqrt(SIMS)


def test_cuped_with_an_unrelated_covariate_changes_nothing_much(aa):
    control, treatment = aa
    rng = np.random.default_rng(9)
    noise = rng.normal(size=(2, USERS))
    adj = stats.cuped_adjust([treatment["clicks"][0], control["clicks"][0]],
                             [treatment["imps"][0], control["imps"][0]], [noise[0], noise[1]])
    assert abs(adj.variance_reduction) < 0.01


def test_mde_is_detected_with_the_stated_power():
    rng = np.random.default_rng(11)
    pilot_c, pilot_t = users(rng, (USERS,)), users(rng, (USERS,))
    size = stats.mde(pilot_t["clicks"], pilot_t["imps"], pilot_c["clicks"], pilot_c["imps"], power=0.8)
    control, treatment = users(rng, (SIMS, USERS)), users(rng, (SIMS, USERS), lift=size.rel)
    results = [stats.ratio_lift(treatment["clicks"][s], treatment["imps"][s], control["clicks"][s],
                                control["imps"][s]) for s in range(SIMS)]
    assert 0.72 <= _rejections(results) <= 0.88


def test_holm_keeps_the_family_wise_error_rate_across_metrics_and_treatments():
    """A/A/A with three correlated metrics: six tests per experiment, at most ~5% with any false alarm."""
    rng = np.random.default_rng(12)
    arms = [users(rng, (SIMS, 800)) for _ in range(3)]
    raw_any, holm_any = 0, 0
    for s in range(SIMS):
        pvalues = []
        for t in arms[1:]:
            c = arms[0]
            pvalues.append(stats.ratio_lift(t["clicks"][s], t["imps"][s], c["clicks"][s], c["imps"][s]).p_value)
            pvalues.append(stats.mean_lift(t["clicks"][s], c["clicks"][s]).p_value)
            pvalues.append(stats.mean_lift(t["imps"][s], c["imps"][s]).p_value)
        raw_any += min(pvalues) < 0.05
        holm_any += np.nanmin(stats.holm(pvalues)) < 0.05
    assert holm_any / SIMS <= 0.07
    assert raw_any / SIMS > 0.12  # without the correction the family fails far more often
