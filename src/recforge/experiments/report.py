"""One A/B report: SRM first, then per-metric lifts (optionally CUPED), Holm across the family, MDE.

The report is a plain JSON-ready dict so the CLI, the pipeline and notebooks all read the same
thing; NaN and infinity (e.g. a relative lift over a zero control) become null.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.stats import norm

from recforge.config import split_assignment
from recforge.experiments import stats
from recforge.experiments.outcomes import ExperimentData, VariantUsers, load_experiment

# metric -> (numerator, denominator) of per-user totals. CTR first: it is the primary metric.
Metric = Callable[[VariantUsers], tuple[NDArray[np.float64], NDArray[np.float64]]]
METRICS: dict[str, Metric] = {
    "ctr": lambda v: (v.clicks, v.impressions),
    "clicks_per_user": lambda v: (v.clicks, np.ones(v.users)),
    "impressions_per_user": lambda v: (v.impressions, np.ones(v.users)),
}
METHOD = ("unit: user; ratio metrics via the delta method; relative-lift CI via the delta method; "
          "two-sided z-test; Holm across all metrics and treatments; MDE at alpha and the given power "
          "(unadjusted for Holm)")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


def parse_weights(text: str | None, variants: list[str]) -> list[float] | None:
    """'control=50,treatment=50' -> weights in `variants` order (None: equal split)."""
    if not text:
        return None
    weights: dict[str, float] = {}
    form = "VARIANT=WEIGHT, e.g. control=50,treatment=50"
    for part in text.split(","):
        name, value = split_assignment(part, "--weights part", form)
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"--weights part {part!r} is not {form}") from None
    missing = [v for v in variants if v not in weights]
    extra = [w for w in weights if w not in variants]
    if missing or extra:
        raise ValueError(f"--weights must name exactly the variants found ({', '.join(variants)}); "
                         f"missing {missing or 'none'}, unknown {extra or 'none'}")
    return [weights[v] for v in variants]


def build_report(data: ExperimentData, control: str = "control", alpha: float = 0.05,
                 weights: Mapping[str, float] | None = None, cuped: bool = False, power: float = 0.8) -> dict:
    """The report for per-user totals already loaded (see `ab_report` for the log-reading entry)."""
    if control not in data.variants:
        raise ValueError(f"control variant {control!r} not found in experiment {data.experiment!r}; "
                         f"variants found: {', '.join(sorted(data.variants))} (pick one with --control)")
    order = [control] + sorted(v for v in data.variants if v != control)
    if len(order) < 2:
        raise ValueError(f"experiment {data.experiment!r} has only the variant {control!r}; nothing to compare")
    variants = {name: data.variants[name] for name in order}
    small = [f"{name} ({v.users})" for name, v in variants.items() if v.users < 2]
    if small:
        raise ValueError(f"experiment {data.experiment!r}: variant(s) {', '.join(small)} have fewer than 2 users "
                         "after exclusions; a variance needs at least 2")
    if weights is not None and set(weights) != set(order):
        raise ValueError(f"weights must name exactly the variants found ({', '.join(order)}), got {sorted(weights)}")
    if cuped and any(v.pre is None for v in variants.values()):
        raise ValueError("CUPED needs pre-period data: pass a pre-period end timestamp or a pre-period log")

    srm = stats.srm_check([v.users for v in variants.values()],
                          None if weights is None else [weights[name] for name in order])
    report: dict[str, Any] = {
        "experiment": data.experiment, "control": control, "alpha": alpha, "power": power,
        "method": METHOD, "rows": data.rows, "users_in_several_variants": data.users_in_several_variants,
        "srm": {"chi2": srm.chi2, "p_value": srm.p_value, "flagged": srm.flagged, "threshold": stats.SRM_THRESHOLD,
                "observed": dict(zip(order, srm.observed, strict=True)),
                "expected": dict(zip(order, srm.expected, strict=True))},
        "variants": {}, "comparisons": [], "cuped": {"enabled": cuped}, "mde": {}, "warnings": [],
    }
    if srm.flagged:
        report["warnings"].append(
            f"SAMPLE RATIO MISMATCH: users per variant {srm.observed} vs expected "
            f"{[round(e) for e in srm.expected]} (p = {srm.p_value:.2g} < {stats.SRM_THRESHOLD}); the assignment "
            "or logging is broken and the lifts below cannot be trusted")
    if data.users_in_several_variants:
        report["warnings"].append(f"{data.users_in_several_variants} users appeared in more than one variant "
                                  "and were excluded")

    z = float(norm.ppf(1 - alpha / 2))
    for name, v in variants.items():
        ctr = stats.ratio_estimate(v.clicks, v.impressions)
        report["variants"][name] = {
            "users": v.users, "impressions": int(v.impressions.sum()), "clicks": int(v.clicks.sum()),
            "ctr": ctr.value, "ctr_ci": [ctr.value - z * ctr.se, ctr.value + z * ctr.se],
            "clicks_per_user": float(v.clicks.mean()), "impressions_per_user": float(v.impressions.mean()),
        }

    comparisons = []
    for metric, parts in METRICS.items():
        estimates, extra = _estimates(variants, parts, cuped)
        if cuped:
            report["cuped"].setdefault("metrics", {})[metric] = extra
        base = estimates[control]
        for treatment in order[1:]:
            result = stats.lift(estimates[treatment], base, alpha)
            size = stats.mde_from_se(result.abs_se, base.value, alpha, power)
            comparisons.append({
                "metric": metric, "treatment": treatment, "control": control,
                "control_value": result.control, "treatment_value": result.treatment,
                "abs_lift": result.abs_lift, "abs_ci": list(result.abs_ci),
                "rel_lift": result.rel_lift, "rel_ci": list(result.rel_ci),
                "p_value": result.p_value, "cuped": cuped,
            })
            report["mde"].setdefault(metric, {})[treatment] = {"abs": size.abs, "rel": size.rel}
    adjusted = stats.holm([c["p_value"] for c in comparisons])
    for comparison, p_holm in zip(comparisons, adjusted, strict=True):
        comparison["p_holm"] = float(p_holm)
        comparison["significant"] = bool(p_holm < alpha)
    report["comparisons"] = comparisons
    if cuped:
        report["cuped"].update({"covariates": ["pre_clicks", "pre_impressions"], "theta": "pooled across variants",
                                "users_with_pre_period": data.pre_users})
    return _clean(report)


def _estimates(variants: dict[str, VariantUsers], parts: Metric,
               cuped: bool) -> tuple[dict[str, stats.RatioEstimate], dict[str, Any]]:
    if not cuped:
        return {name: stats.ratio_estimate(*parts(v)) for name, v in variants.items()}, {}
    pairs = [parts(v) for v in variants.values()]
    result = stats.cuped_adjust([p[0] for p in pairs], [p[1] for p in pairs], [v.pre for v in variants.values()])
    info = {"theta": result.theta, "variance_reduction": result.variance_reduction,
            "unadjusted": {name: e.value for name, e in zip(variants, result.raw, strict=True)}}
    return dict(zip(variants, result.adjusted, strict=True)), info


def ab_report(events_uri: str, experiment: str, control: str = "control", alpha: float = 0.05,
              weights: str | Mapping[str, float] | None = None, cuped: bool = False,
              pre_period_end: int | None = None, pre_events_uri: str | None = None, power: float = 0.8) -> dict:
    """Read the impression log and report `experiment` (control vs every other variant)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power}")
    if pre_period_end is not None and pre_events_uri is not None:
        raise ValueError("give either a pre-period end timestamp or a pre-period log, not both")
    if cuped and pre_period_end is None and pre_events_uri is None:
        raise ValueError("CUPED needs a pre-period: pass --pre-period-end TS or --pre-events URI")
    if not cuped and (pre_period_end is not None or pre_events_uri is not None):
        raise ValueError("a pre-period is only used by CUPED: add --cuped")
    data = load_experiment(events_uri, experiment, pre_period_end, pre_events_uri)
    if isinstance(weights, str) or weights is None:
        parsed = parse_weights(weights, list(data.variants))
        weights = None if parsed is None else dict(zip(data.variants, parsed, strict=True))
    report = build_report(data, control, alpha, weights, cuped, power)
    report["events"] = str(events_uri)
    if cuped:
        report["cuped"]["pre_period"] = (f"events before timestamp {pre_period_end}" if pre_period_end is not None
                                         else str(pre_events_uri))
    return report
