"""`recforge simulate`: synthetic users play against the real server (A/B test or closed loop)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from recforge.cli.common import ConfigOpt, Overrides, fail, guarded, log, out


def simulate_cmd(
    scenario: Annotated[str, typer.Option("--scenario", help="ab: weak vs strong ranker A/B test; loop: simulated "
                                                            "days of serve -> events -> pipeline -> promote.")],
    config: ConfigOpt = None,
    overrides: Overrides = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG path (default: WORKDIR/<scenario>.png).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the figures.")] = False,
) -> None:
    """Synthetic users from the world's ground truth play against the real server (see configs/simulate/)."""
    from recforge import scenarios

    if scenario not in scenarios.SCENARIOS:
        fail(ValueError(f"--scenario must be one of {', '.join(scenarios.SCENARIOS)}, got {scenario!r}"))
    cfg = guarded(scenarios.load_simulate, config, overrides)
    result = guarded(scenarios.run_scenario, scenario, cfg, log)
    result["plot"] = str(guarded(scenarios.plot_scenario, result, plot or cfg.root / f"{scenario}.png"))
    from recforge.storage import write_json

    guarded(write_json, cfg.root / f"{scenario}.json", result)
    if as_json:
        print(json.dumps(result, default=str))
        return
    from recforge.scenarios.tables import ab_table, loop_table

    out.print(ab_table(result) if scenario == "ab" else loop_table(result))
    out.print(f"plot: {result['plot']}\nfigures: {cfg.root / f'{scenario}.json'}\ndone in {result['seconds']:.0f}s")
