"""The scenarios' human output: rich tables of the figures the JSON carries."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def ab_table(result: dict[str, Any]) -> Table:
    lo, hi = result["ci"]
    table = Table(title=f"A/B {result['experiment']}: winner {result['winner']} (Holm p {result['p_value']:.3g}); "
                        f"CTR lift {_pct(result['measured_lift'])} [{_pct(lo)}, {_pct(hi)}], "
                        f"ground truth predicts {_pct(result['expected_lift'])} "
                        f"[{_pct(result['expected_lift_ci'][0])}, {_pct(result['expected_lift_ci'][1])}]"
                        f" ({'inside' if result['expected_in_ci'] else 'OUTSIDE'} the CI)")
    for column in ("arm", "ranker", "users", "impressions", "clicks", "CTR", "CTR 95% CI", "truth CTR (served)",
                   "expected CTR (forced)"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for arm, v in result["arms"].items():
        table.add_row(arm, f"v{v['ranker_version']}", f"{v['users']:,}", f"{v['impressions']:,}", f"{v['clicks']:,}",
                      f"{v['ctr']:.4f}", f"[{v['ctr_ci'][0]:.4f}, {v['ctr_ci'][1]:.4f}]",
                      f"{v['truth_ctr_served']:.4f}", f"{v['expected_ctr']:.4f}")
    return table


def loop_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"closed loop: {len(result['days'])} simulated days, {result['requests_per_day']:,} "
                        f"requests/day; truth CTR {result['ctr_per_day'][0]:.4f} -> {result['ctr_per_day'][-1]:.4f}")
    for column in ("day", "date", "served (prod/canary)", "truth CTR", "first ranker's truth CTR", "lift vs first",
                   "measured CTR", "impressions accepted",
                   "in training", "promote", "gate", "reason"):
        table.add_column(column, justify="left" if column in ("date", "promote", "gate", "reason") else "right")
    for d in result["days"]:
        gate = d["gate"]
        decision = f"{gate['decision']}" + (f" v{gate['version']}" if gate.get("version") else "")
        if d["injected_weak"]:
            decision += " (weak)"
        reason = "; ".join(gate.get("reasons") or [])[:90] if gate["decision"] != "pass" else ""
        promote = d["promote"]["status"] + (f" v{d['promote']['version']}" if d["promote"]["status"] == "promoted"
                                            else "")
        canary = "-" if d["canary"] is None else f"v{d['canary']}"
        table.add_row(str(d["day"]), d["date"], f"v{d['production']}/{canary}", f"{d['ctr_truth']:.4f}",
                      f"{d['ctr_initial_model']:.4f}", _pct(d["lift_vs_initial"]),
                      f"{d['ctr_measured']:.4f}", f"{d['events_accepted']:,}", f"{d['events_in_training']:,}",
                      promote, decision, reason)
    return table
