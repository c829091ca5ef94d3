"""A/B statistics as pure functions on per-user numpy arrays.

The randomization unit is the user, so every metric is computed from per-user totals. CTR is a
ratio metric, sum(clicks) / sum(impressions) over a variant's users: its numerator and denominator
are correlated per user, and treating impressions as independent trials would understate the
variance badly (heavy users contribute many correlated impressions). The delta method linearizes
the ratio of means around the sample means:

    R = mean(x) / mean(n),   L_i = (x_i - R n_i) / mean(n),   Var(R) ~= var(L) / N

which is exact to first order and is the standard estimator (Deng et al., "Applying the Delta
Method in Metric Analytics", KDD 2018). A per-user mean metric (clicks per user) is the special
case n_i = 1, so one code path serves both.

Relative lift T/C - 1 uses the delta method as well (not Fieller): with T and C independent,
Var(T/C) ~= Var(T)/C^2 + T^2 Var(C)/C^4. It is accurate when the control estimate is many standard
errors away from zero, which any experiment worth reading satisfies; the known-lift simulations
in the tests check its coverage.

CUPED (Deng et al., WSDM 2013) subtracts theta * (X - mean X) from each user's linearized metric,
with X the user's pre-period covariates and theta fitted by least squares pooled over all variants,
so it removes variance the pre-period already explains without moving the expected difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats as sps

FloatArray = NDArray[np.float64]

# Below this p-value the observed split is treated as broken randomization, not bad luck. The
# threshold is strict because SRM is checked on every experiment, every day.
SRM_THRESHOLD = 1e-3


@dataclass(frozen=True)
class RatioEstimate:
    """A ratio-of-means estimate with its delta-method variance (of the estimate, not per user)."""

    value: float
    variance: float
    users: int
    numerator: float
    denominator: float

    @property
    def se(self) -> float:
        return float(np.sqrt(self.variance))


@dataclass(frozen=True)
class LiftResult:
    """Treatment vs control: absolute and relative lift with CIs and a two-sided p-value."""

    control: float
    treatment: float
    abs_lift: float
    abs_se: float
    abs_ci: tuple[float, float]
    rel_lift: float
    rel_se: float
    rel_ci: tuple[float, float]
    z: float
    p_value: float
    alpha: float


@dataclass(frozen=True)
class SrmResult:
    chi2: float
    p_value: float
    flagged: bool
    observed: list[int]
    expected: list[float]


@dataclass(frozen=True)
class CupedResult:
    """Per-group CUPED-adjusted estimates, with the unadjusted ones for comparison."""

    theta: list[float]
    adjusted: list[RatioEstimate]
    raw: list[RatioEstimate]

    @property
    def variance_reduction(self) -> float:
        """Share of the estimates' variance removed, pooled over groups (0.3 = 30% less variance)."""
        raw = sum(e.variance for e in self.raw)
        return float(1.0 - sum(e.variance for e in self.adjusted) / raw) if raw > 0 else 0.0


@dataclass(frozen=True)
class Mde:
    """Smallest true lift detected with the given power at two-sided level alpha."""

    abs: float
    rel: float
    alpha: float
    power: float


def _per_user(num: ArrayLike, den: ArrayLike) -> tuple[FloatArray, FloatArray]:
    x = np.asarray(num, dtype=np.float64).ravel()
    n = np.asarray(den, dtype=np.float64).ravel()
    if x.shape != n.shape:
        raise ValueError(f"numerator and denominator need one value per user, got {x.size} and {n.size}")
    if x.size < 2:
        raise ValueError(f"a variance needs at least 2 users per variant, got {x.size}")
    if n.sum() <= 0:
        raise ValueError("the denominator sums to 0 (a variant with no impressions)")
    return x, n


def linearize(num: ArrayLike, den: ArrayLike) -> tuple[float, FloatArray]:
    """The ratio and each user's influence on it: var(influence)/N is the delta-method variance."""
    x, n = _per_user(num, den)
    ratio = x.sum() / n.sum()
    return float(ratio), (x - ratio * n) / n.mean()


def ratio_estimate(num: ArrayLike, den: ArrayLike) -> RatioEstimate:
    """sum(num) / sum(den) over users, with its delta-method variance."""
    ratio, influence = linearize(num, den)
    users = influence.size
    return RatioEstimate(value=ratio, variance=float(influence.var(ddof=1) / users), users=users,
                         numerator=float(np.sum(num)), denominator=float(np.sum(den)))


def lift(treatment: RatioEstimate, control: RatioEstimate, alpha: float = 0.05) -> LiftResult:
    """Lift between two independent estimates (raw or CUPED-adjusted): normal CIs, z-test."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    z_crit = float(sps.norm.ppf(1 - alpha / 2))
    t, c = treatment.value, control.value
    abs_lift = t - c
    abs_se = float(np.sqrt(treatment.variance + control.variance))
    if abs_se > 0:
        z = abs_lift / abs_se
        p_value = float(2 * sps.norm.sf(abs(z)))
    else:  # both variants constant: the difference is known exactly
        z = 0.0 if abs_lift == 0 else float(np.copysign(np.inf, abs_lift))
        p_value = 1.0 if abs_lift == 0 else 0.0
    if c != 0:
        rel_lift = t / c - 1
        rel_se = float(np.sqrt(treatment.variance / c**2 + t**2 * control.variance / c**4))
    else:
        rel_lift = rel_se = float("nan")
    return LiftResult(
        control=c, treatment=t, abs_lift=abs_lift, abs_se=abs_se,
        abs_ci=(abs_lift - z_crit * abs_se, abs_lift + z_crit * abs_se),
        rel_lift=rel_lift, rel_se=rel_se, rel_ci=(rel_lift - z_crit * rel_se, rel_lift + z_crit * rel_se),
        z=float(z), p_value=p_value, alpha=alpha,
    )


def ratio_lift(clicks_t: ArrayLike, imps_t: ArrayLike, clicks_c: ArrayLike, imps_c: ArrayLike,
               alpha: float = 0.05) -> LiftResult:
    """CTR lift of treatment over control from per-user clicks and impressions (user = unit)."""
    return lift(ratio_estimate(clicks_t, imps_t), ratio_estimate(clicks_c, imps_c), alpha)


def mean_lift(values_t: ArrayLike, values_c: ArrayLike, alpha: float = 0.05) -> LiftResult:
    """Lift of a per-user mean metric (clicks per user, ...): a ratio metric with denominator 1."""
    values_t, values_c = np.asarray(values_t), np.asarray(values_c)
    return ratio_lift(values_t, np.ones(values_t.size), values_c, np.ones(values_c.size), alpha)


def srm_check(counts: ArrayLike, weights: ArrayLike | None = None, threshold: float = SRM_THRESHOLD) -> SrmResult:
    """Chi-square goodness of fit of the users per variant against the intended split."""
    observed = np.asarray(counts, dtype=np.float64).ravel()
    if observed.size < 2:
        raise ValueError(f"a sample-ratio check needs at least 2 variants, got {observed.size}")
    w = np.ones_like(observed) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != observed.shape:
        raise ValueError(f"got {w.size} weights for {observed.size} variants")
    if np.any(w <= 0) or not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be positive, got {w.tolist()}")
    total = observed.sum()
    if total <= 0:
        raise ValueError("no users in any variant")
    expected = total * w / w.sum()
    chi2, p_value = sps.chisquare(observed, expected)
    return SrmResult(chi2=float(chi2), p_value=float(p_value), flagged=bool(p_value < threshold),
                     observed=[int(v) for v in observed], expected=expected.tolist())


def holm(pvalues: ArrayLike) -> FloatArray:
    """Holm step-down adjusted p-values (controls the family-wise error rate; NaNs stay NaN and
    are not counted in the family)."""
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    adjusted = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = valid.size
    if m == 0:
        return adjusted
    order = valid[np.argsort(p[valid], kind="stable")]
    stepped = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def cuped_adjust(nums: Sequence[ArrayLike], dens: Sequence[ArrayLike],
                 covariates: Sequence[ArrayLike]) -> CupedResult:
    """CUPED for ratio (or mean) metrics across groups, theta pooled over all groups.

    `nums[g]`, `dens[g]` are per-user totals of group g and `covariates[g]` its users' pre-period
    covariates, shape (users,) or (users, k). Each user's delta-method influence is regressed on
    the within-group-centered covariates; the adjusted estimate of group g is
    R_g - theta . (mean X_g - mean X_all), with variance var(L - theta . X) / N_g.
    """
    if not len(nums) == len(dens) == len(covariates):
        raise ValueError("cuped_adjust needs the same number of numerator, denominator and covariate groups")
    raws, influences, xs = [], [], []
    for num, den, cov in zip(nums, dens, covariates, strict=True):
        ratio, influence = linearize(num, den)
        x = np.asarray(cov, dtype=np.float64)
        x = x.reshape(-1, 1) if x.ndim == 1 else x
        if x.shape[0] != influence.size:
            raise ValueError(f"covariates have {x.shape[0]} rows for {influence.size} users")
        raws.append(ratio_estimate(num, den))
        influences.append(influence)
        xs.append(x)
    centered = np.concatenate([x - x.mean(axis=0) for x in xs])
    target = np.concatenate(influences)  # already mean zero within each group
    # Least squares on the pooled within-group deviations; lstsq copes with a constant covariate.
    theta, *_ = np.linalg.lstsq(centered, target, rcond=None)
    grand_mean = np.concatenate(xs).mean(axis=0)
    adjusted = []
    for raw, influence, x in zip(raws, influences, xs, strict=True):
        residual = influence - x @ theta
        adjusted.append(RatioEstimate(
            value=float(raw.value - (x.mean(axis=0) - grand_mean) @ theta),
            variance=float(residual.var(ddof=1) / residual.size), users=raw.users,
            numerator=raw.numerator, denominator=raw.denominator))
    return CupedResult(theta=theta.tolist(), adjusted=adjusted, raw=raws)


def mde_from_se(se: float, baseline: float, alpha: float = 0.05, power: float = 0.8) -> Mde:
    """Minimum detectable effect of a two-sided z-test whose estimate has standard error `se`."""
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power}")
    size = float((sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)) * se)
    return Mde(abs=size, rel=size / abs(baseline) if baseline else float("nan"), alpha=alpha, power=power)


def mde(clicks_t: ArrayLike, imps_t: ArrayLike, clicks_c: ArrayLike, imps_c: ArrayLike,
        alpha: float = 0.05, power: float = 0.8) -> Mde:
    """MDE of the CTR lift for this traffic and per-user variance (relative to the control CTR)."""
    t, c = ratio_estimate(clicks_t, imps_t), ratio_estimate(clicks_c, imps_c)
    return mde_from_se(float(np.sqrt(t.variance + c.variance)), c.value, alpha, power)
