"""The gate: may a challenger replace the champion? Paired statistics over users, and guardrails.

Why paired over users: both models score the same holdout rows, so per-user differences cancel
the (large) user-to-user variation that an unpaired comparison of two GAUCs would have to beat.
Users are the resampling unit because rows of one user are not independent.
Everything here is pure numpy on arrays the evaluate step saved, so it is cheap to test.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from recforge.metrics import logloss, sigmoid
from recforge.pipeline.settings import GateSettings

_BOOTSTRAP_CHUNK = 256


def _group_order(users: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by user then score, the sorted users, and where each user's block starts."""
    by_score = np.argsort(scores, kind="stable")
    order = by_score[np.argsort(users[by_score], kind="stable")]
    g = users[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    return order, g, starts


def per_user_auc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, AUC) for every user with both a positive and a negative row; ties count one half."""
    y = np.asarray(labels, dtype=np.float64) > 0.5
    s = np.asarray(scores, dtype=np.float64)
    u = np.asarray(users)
    if len(s) == 0:
        return u[:0], np.zeros(0)
    order, g, starts = _group_order(u, s)
    ys, ss = y[order], s[order]
    # Runs of equal (user, score): each positive in a run beats the negatives below it in its
    # user and ties with half of the negatives inside the run.
    run_start = np.flatnonzero(np.r_[True, (g[1:] != g[:-1]) | (ss[1:] != ss[:-1])])
    pos_run = np.add.reduceat(ys.astype(np.int64), run_start)
    neg_run = np.diff(np.r_[run_start, len(s)]) - pos_run
    run_user = np.searchsorted(starts, run_start, side="right") - 1
    neg_before = np.cumsum(neg_run) - neg_run
    first_run_of_user = np.searchsorted(run_start, starts)
    neg_below = neg_before - neg_before[first_run_of_user][run_user]
    n_users = len(starts)
    wins = np.bincount(run_user, weights=pos_run * (neg_below + 0.5 * neg_run), minlength=n_users)
    pos = np.bincount(run_user, weights=pos_run, minlength=n_users)
    neg = np.bincount(run_user, weights=neg_run, minlength=n_users)
    used = (pos > 0) & (neg > 0)
    return g[starts][used], wins[used] / (pos[used] * neg[used])


def per_user_ndcg(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, NDCG of the user's rows ranked by score) for users with both classes."""
    y = (np.asarray(labels, dtype=np.float64) > 0.5).astype(np.float64)
    s = np.asarray(scores, dtype=np.float64)
    u = np.asarray(users)
    if len(s) == 0:
        return u[:0], np.zeros(0)
    order, g, starts = _group_order(u, -s)  # best score first within each user
    rank = np.arange(len(s)) - np.repeat(starts, np.diff(np.r_[starts, len(s)]))
    discount = 1.0 / np.log2(rank + 2.0)
    dcg = np.add.reduceat(y[order] * discount, starts)
    pos = np.add.reduceat(y[order], starts)
    sizes = np.diff(np.r_[starts, len(s)])
    # The ideal ranking puts a user's `pos` positives first: the sum of the first `pos` discounts.
    cum = np.cumsum(1.0 / np.log2(np.arange(int(sizes.max())) + 2.0))
    ideal = np.where(pos > 0, cum[np.maximum(pos.astype(np.int64) - 1, 0)], 1.0)
    used = (pos > 0) & (pos < sizes)
    return g[starts][used], (dcg / ideal)[used]


@dataclass(frozen=True)
class PairedTest:
    """Challenger minus reference, per user; p is one-sided (H1: the challenger is better)."""

    test: str
    n_users: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    alpha: float
    challenger_mean: float
    reference_mean: float

    def significant(self, min_improvement: float = 0.0) -> bool:
        return self.p_value < self.alpha and self.mean_diff > min_improvement

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, samples: int = 2000, seed: int = 0,
                     alpha: float = 0.05) -> PairedTest:
    """Resample users with replacement; CI = percentile interval of the mean difference.

    p = share of resampled means at or below zero (with the +1 correction, so never exactly 0).
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    if n < 2:
        raise ValueError(f"a paired test needs at least 2 users with both classes, got {n}")
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, _BOOTSTRAP_CHUNK):
        stop = min(samples, start + _BOOTSTRAP_CHUNK)
        means[start:stop] = d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    p = (1.0 + float(np.sum(means <= 0.0))) / (samples + 1.0)
    return PairedTest("paired_bootstrap", n, float(d.mean()), float(low), float(high), p, alpha,
                      float(np.mean(a)), float(np.mean(b)))


def paired_ttest(a: np.ndarray, b: np.ndarray, alpha: float = 0.05) -> PairedTest:
    """Paired t-test on per-user differences; CI is the two-sided t interval of the mean."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    if n < 2:
        raise ValueError(f"a paired test needs at least 2 users with both classes, got {n}")
    se = float(d.std(ddof=1) / np.sqrt(n))
    mean = float(d.mean())
    if se == 0.0:
        p = 0.0 if mean > 0 else 1.0
        low = high = mean
    else:
        p = float(stats.t.sf(mean / se, df=n - 1))
        half = float(stats.t.ppf(1 - alpha / 2, df=n - 1)) * se
        low, high = mean - half, mean + half
    return PairedTest("paired_ttest", n, mean, low, high, p, alpha, float(np.mean(a)), float(np.mean(b)))


PRIMARY = {"user_auc": per_user_auc, "user_ndcg": per_user_ndcg}


def compare_primary(labels: np.ndarray, users: np.ndarray, challenger: np.ndarray, reference: np.ndarray,
                    settings: GateSettings) -> PairedTest:
    """The paired test of the primary per-user metric over users both scorers have a value for."""
    metric = PRIMARY[settings.primary]
    users_a, values_a = metric(labels, challenger, users)
    users_b, values_b = metric(labels, reference, users)
    common, ia, ib = np.intersect1d(users_a, users_b, assume_unique=True, return_indices=True)
    a, b = values_a[ia], values_b[ib]
    if settings.test == "ttest":
        return paired_ttest(a, b, settings.alpha)
    return paired_bootstrap(a, b, settings.bootstrap_samples, settings.seed, settings.alpha)


def guardrail_metrics(labels: np.ndarray, logits: np.ndarray, item_known: np.ndarray) -> dict[str, float]:
    """logloss, calibration (mean predicted / observed CTR) and item coverage on the holdout."""
    y = np.asarray(labels, dtype=np.float64)
    p = sigmoid(np.asarray(logits, dtype=np.float64))
    observed = float(y.mean()) if len(y) else float("nan")
    return {"logloss": logloss(y, p), "calibration": float(p.mean()) / observed if observed > 0 else float("nan"),
            "coverage": float(np.mean(item_known)) if len(item_known) else float("nan")}


def check_guardrails(challenger: dict[str, float], reference: dict[str, float],
                     settings: GateSettings) -> dict[str, dict[str, Any]]:
    """Each guardrail: may the challenger be this much worse than the reference? (within tolerance)"""
    cal_c, cal_r = abs(challenger["calibration"] - 1.0), abs(reference["calibration"] - 1.0)
    return {
        "logloss": {"ok": bool(challenger["logloss"] <= reference["logloss"] + settings.logloss_tolerance),
                    "challenger": challenger["logloss"], "reference": reference["logloss"],
                    "tolerance": settings.logloss_tolerance, "rule": "challenger <= reference + tolerance"},
        "calibration": {"ok": bool(cal_c <= cal_r + settings.calibration_tolerance),
                        "challenger": challenger["calibration"], "reference": reference["calibration"],
                        "tolerance": settings.calibration_tolerance,
                        "rule": "|challenger - 1| <= |reference - 1| + tolerance"},
        "coverage": {"ok": bool(challenger["coverage"] >= reference["coverage"] - settings.coverage_tolerance),
                     "challenger": challenger["coverage"], "reference": reference["coverage"],
                     "tolerance": settings.coverage_tolerance, "rule": "challenger >= reference - tolerance"},
    }


def decide(scores: dict[str, np.ndarray], settings: GateSettings, *, parity_ok: bool, parity_detail: Any,
           champion_version: int | None) -> dict[str, Any]:
    """The gate decision from the evaluate step's saved holdout scores.

    With a champion: guardrails against it, and a significant paired improvement on the primary
    metric. Without one (the first run): guardrails against the popularity baseline; the paired
    test against popularity is reported but not required.
    """
    labels, users = scores["label"], scores["user_key"]
    has_champion = champion_version is not None and "champion" in scores
    reference_name = "champion" if has_champion else "popularity"
    reference_known = scores["champion_item_known"] if has_champion else scores["challenger_item_known"]
    challenger_g = guardrail_metrics(labels, scores["challenger"], scores["challenger_item_known"])
    reference_g = guardrail_metrics(labels, scores[reference_name], reference_known)
    checks = check_guardrails(challenger_g, reference_g, settings)
    checks["parity"] = {"ok": bool(parity_ok), "detail": parity_detail}
    reasons = [f"export parity failed: {parity_detail}"] if not parity_ok else []
    reasons += [f"guardrail {name}: challenger {c['challenger']:.5f} vs {reference_name} {c['reference']:.5f} "
                f"breaks '{c['rule']}' (tolerance {c['tolerance']})"
                for name, c in checks.items() if name != "parity" and not c["ok"]]
    test: PairedTest | None = None
    try:
        test = compare_primary(labels, users, scores["challenger"], scores[reference_name], settings)
    except ValueError as exc:
        if has_champion:
            reasons.append(f"paired test impossible: {exc}")
    if has_champion and test is not None:
        if test.n_users < settings.min_users:
            reasons.append(f"only {test.n_users} users with both classes (gate.min_users={settings.min_users})")
        elif not test.significant(settings.min_improvement):
            reasons.append(f"{settings.primary} improvement not significant: mean diff {test.mean_diff:+.5f} "
                           f"(CI {test.ci_low:+.5f}..{test.ci_high:+.5f}), p={test.p_value:.4f} "
                           f"(alpha {settings.alpha}, min improvement {settings.min_improvement})")
    passed = not reasons
    summary = ("pass" if passed else "refuse") + (
        "" if has_champion else " (no champion: compared with the popularity baseline)")
    return {
        "decision": "pass" if passed else "refuse",
        "summary": summary,
        "no_champion": not has_champion,
        "reference": reference_name,
        "champion_version": champion_version if has_champion else None,
        "reasons": reasons,
        "checks": checks,
        "primary": settings.primary,
        "paired_test": test.to_dict() if test is not None else None,
        "guardrails": {"challenger": challenger_g, reference_name: reference_g},
    }
