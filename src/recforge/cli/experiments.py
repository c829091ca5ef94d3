"""`recforge ab report`: the A/B readout of the served impression/click log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from recforge.cli.common import JsonOpt, err, guarded, log
from recforge.cli.render import print_ab

app = typer.Typer(no_args_is_help=True, help="A/B analysis of the served impression/click log.")


@app.command("report")
def ab_report_cmd(
    events: Annotated[str, typer.Option("--events", help="Impression log: parquet directory (recursive) or file.")],
    experiment: Annotated[str, typer.Option("--experiment", help="Experiment name in the assignments JSON.")],
    control: Annotated[str, typer.Option("--control", help="Control variant.")] = "control",
    alpha: Annotated[float, typer.Option("--alpha", help="Two-sided significance level.")] = 0.05,
    power: Annotated[float, typer.Option("--power", help="Power for the minimum detectable effect.")] = 0.8,
    weights: Annotated[str | None, typer.Option(
        "--weights", help="Intended split for the SRM check, e.g. control=50,treatment=50 (default equal).")] = None,
    cuped: Annotated[bool, typer.Option("--cuped", help="Reduce variance with pre-period clicks/impressions.")] = False,
    pre_period_end: Annotated[int | None, typer.Option(
        "--pre-period-end", help="Unix seconds: earlier events are the CUPED pre-period, later ones analysed.")] = None,
    pre_events: Annotated[str | None, typer.Option("--pre-events", help="Separate pre-period log for CUPED.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG of CTRs and lifts with CIs.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """SRM check, per-variant CTR, lifts with delta-method CIs (optionally CUPED), Holm, MDE."""
    from recforge.experiments import report as ab

    result = guarded(ab.ab_report, events, experiment, control=control, alpha=alpha, weights=weights, cuped=cuped,
                     pre_period_end=pre_period_end, pre_events_uri=pre_events, power=power)
    if plot is not None:
        from recforge.experiments.plot import plot_report

        guarded(plot_report, result, plot)
        log(f"plot: {plot}")
    if as_json:
        for warning in result["warnings"]:  # stdout stays one JSON object; a broken split still gets seen
            err.print(f"[bold red]warning:[/] {warning}", highlight=False)
        print(json.dumps(result))
        return
    print_ab(result)
