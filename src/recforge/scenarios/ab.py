"""Scenario `ab`: a weak and a strong ranker A/B-tested on simulated users through the real server.

The measured side is the ordinary A/B analysis (recforge.experiments) of the events the server
logged. The predicted side comes from the ground truth: fresh requests from the same traffic are
served once with every user forced onto each arm (a one-variant experiment set through the admin
API), and each arm's expected CTR is the mean true click probability of what it showed. The report
should pick the strong arm, and its CTR lift CI should hold the predicted lift.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from recforge.experiments.plot import png_figure
from recforge.experiments.report import ab_report
from recforge.scenarios import harness
from recforge.scenarios.harness import Log
from recforge.scenarios.settings import SimulateConfig
from recforge.serve.events import export_report
from recforge.synthetic.online import DayTraffic, FeedClient, draw_requests, play_day

WEAK, STRONG = "weak", "strong"
# Random streams: traffic of the test, its clicks, and the prediction's traffic and clicks.
_TRAFFIC, _CLICKS, _PREDICT = 0, 1, 2


def _experiment(name: str, arms: dict[str, int]) -> dict[str, Any]:
    return {"name": name, "salt": f"{name}-salt",
            "variants": [{"name": arm, "weight": 1.0, "ranker": str(v)} for arm, v in arms.items()]}


def paired_lift(strong: DayTraffic, weak: DayTraffic, alpha: float) -> tuple[float, list[float]]:
    """Expected relative lift of `strong` over `weak` served on the same requests, with its CI.

    Each arm's expected CTR is a ratio of per-request sums (true click probabilities over impressions);
    the requests are independent draws from the traffic, so the ratio of the two ratios gets a
    delta-method standard error over requests, paired because both arms answered the same ones.
    """
    from scipy.stats import norm

    a, na = strong.probabilities.sum(1), (strong.items >= 0).sum(1).astype(np.float64)
    b, nb = weak.probabilities.sum(1), (weak.items >= 0).sum(1).astype(np.float64)
    ctr_a, ctr_b = a.sum() / na.sum(), b.sum() / nb.sum()
    ratio = ctr_a / ctr_b
    # Influence of each request on log(ctr_a) - log(ctr_b).
    influence = (a - ctr_a * na) / (ctr_a * na.mean()) - (b - ctr_b * nb) / (ctr_b * nb.mean())
    se_log = float(influence.std(ddof=1) / np.sqrt(len(a)))
    z = float(norm.ppf(1 - alpha / 2))
    return float(ratio - 1.0), [float(ratio * np.exp(-z * se_log) - 1.0), float(ratio * np.exp(z * se_log) - 1.0)]


def run_ab(cfg: SimulateConfig, log: Log) -> dict[str, Any]:
    began = time.perf_counter()
    root, world, registry = harness.offline_setup(cfg, log, "retrieval for the A/B")
    strong = harness.train_bundle(cfg, STRONG, cfg.ab.strong_overrides, log)
    weak = harness.train_bundle(cfg, WEAK, cfg.ab.weak_overrides, log)
    versions = {WEAK: harness.publish(registry, weak, "ranker", None, "weak arm"),
                STRONG: harness.publish(registry, strong, "ranker", "production", "strong arm")}
    setup_s = time.perf_counter() - began

    day = world.config.days  # the first day after the offline log
    seeds = np.random.SeedSequence([cfg.seed, day]).spawn(3)
    requests = draw_requests(world, cfg.requests_per_day, day, np.random.default_rng(seeds[_TRAFFIC]))
    predict = draw_requests(world, cfg.ab.predict_requests, day, np.random.default_rng(seeds[_PREDICT]))
    events_dir = root / "serve-events"
    with harness.running_server(cfg, registry, events_dir, log) as server, \
            FeedClient(server.url, cfg.concurrency, server.token) as client:
        client.set_experiments([_experiment(cfg.ab.experiment, versions)])
        started = time.perf_counter()
        traffic = play_day(client, world, requests, np.random.default_rng(seeds[_CLICKS]), k=cfg.k,
                           exclude_seen=cfg.exclude_seen, batch_requests=cfg.batch_requests)
        serve_s = time.perf_counter() - started
        log(f"A/B: {len(requests):,} requests, {traffic.impressions:,} impressions in {serve_s:.1f}s "
            f"({len(requests) / serve_s:.0f} requests/s)")
        forced_days: dict[str, DayTraffic] = {}
        for arm, version in versions.items():  # every user forced onto one arm; no events sent
            client.set_experiments([_experiment(cfg.ab.experiment, {arm: version})])
            forced = play_day(client, world, predict, np.random.default_rng(seeds[_PREDICT]), k=cfg.k,
                              exclude_seen=cfg.exclude_seen, batch_requests=cfg.batch_requests, send_events=False)
            if any(a.get(cfg.ab.experiment) != arm for a in forced.assignments):
                raise RuntimeError(f"the server did not route every request to arm {arm!r} while it was forced")
            forced_days[arm] = forced
        client.set_experiments([])

    exported = export_report(events_dir, root / "served")
    report = ab_report(str(root / "served"), cfg.ab.experiment, control=WEAK, alpha=cfg.ab.alpha)
    ctr = next(c for c in report["comparisons"] if c["metric"] == "ctr" and c["treatment"] == STRONG)
    measured, ci, p_value = ctr["rel_lift"], ctr["rel_ci"], ctr["p_holm"]
    expected = {arm: forced.expected_ctr for arm, forced in forced_days.items()}
    expected_lift, expected_ci = paired_lift(forced_days[STRONG], forced_days[WEAK], cfg.ab.alpha)
    winner = (STRONG if measured > 0 else WEAK) if ctr["significant"] else "none"
    arms = {}
    for arm in (WEAK, STRONG):
        mask = traffic.variant_mask(cfg.ab.experiment, arm)
        shown = traffic.items[mask] >= 0
        arms[arm] = {**report["variants"][arm], "ranker_version": versions[arm],
                     "truth_ctr_served": float(traffic.probabilities[mask].sum() / max(int(shown.sum()), 1)),
                     "expected_ctr": expected[arm]}
    return {
        "scenario": "ab", "experiment": cfg.ab.experiment, "control": WEAK, "winner": winner,
        "p_value": p_value, "p_value_unadjusted": ctr["p_value"], "measured_lift": measured, "ci": ci,
        "expected_lift": expected_lift, "expected_lift_ci": expected_ci,
        "expected_in_ci": bool(ci[0] <= expected_lift <= ci[1]),
        "alpha": cfg.ab.alpha, "arms": arms, "srm": report["srm"], "warnings": report["warnings"],
        "requests": len(requests), "predict_requests": len(predict), "day": day,
        "events_accepted": traffic.impressions_accepted + traffic.clicks_accepted,
        "impressions_exported": exported.exported_rows, "serve_seconds": round(serve_s, 2),
        "setup_seconds": round(setup_s, 2), "seconds": round(time.perf_counter() - began, 2),
        "workdir": str(root), "events": str(root / "served"), "report": report,
    }


def plot_ab(result: dict[str, Any], path: Path) -> Path:
    """Left: each arm's measured CTR (with CI) beside its ground-truth expected CTR. Right: lift vs prediction."""
    arms = list(result["arms"])
    with png_figure(path, 1, 2, figsize=(10, 4)) as (fig, (left, right)):
        x = np.arange(len(arms))
        ctr = [result["arms"][a]["ctr"] for a in arms]
        err = np.array([[c - result["arms"][a]["ctr_ci"][0], result["arms"][a]["ctr_ci"][1] - c]
                        for a, c in zip(arms, ctr, strict=True)]).T
        left.bar(x - 0.2, ctr, 0.4, yerr=err, capsize=4, label="measured (95% CI)")
        left.bar(x + 0.2, [result["arms"][a]["expected_ctr"] for a in arms], 0.4, label="ground-truth expected")
        left.set_xticks(x, arms)
        left.set_ylabel("CTR")
        left.legend(fontsize=8)
        left.set_title("CTR per arm")
        lo, hi = result["ci"]
        right.errorbar([0], [100 * result["measured_lift"]], yerr=[[100 * (result["measured_lift"] - lo)],
                                                                   [100 * (hi - result["measured_lift"])]],
                       fmt="o", capsize=6, label="measured lift (CI)")
        right.axhline(100 * result["expected_lift"], color="tab:orange", linestyle="--", label="expected lift")
        right.axhspan(100 * result["expected_lift_ci"][0], 100 * result["expected_lift_ci"][1], color="tab:orange",
                      alpha=0.15, label="expected lift CI (prediction sample)")
        right.axhline(0, color="grey", linewidth=0.8)
        right.set_xticks([])
        right.set_ylabel("relative CTR lift, strong vs weak (%)")
        right.set_title(f"winner: {result['winner']} (p={result['p_value']:.2g})")
        right.legend(fontsize=8)
    return path
