"""`recforge ...`: thin commands, each calling one recipe of recforge.recipes.

Every command takes `--config FILE` plus `key=value` overrides, prints human output on stderr/
stdout and exits non-zero with a one-line reason on failure (the traceback only with
RECFORGE_DEBUG=1). Every command that produces a result takes `--json`: stdout is then exactly one
JSON value and human text goes to stderr (`serve` produces no result and has none).

This module assembles the app; the commands live in one module per group (data, train, evaluate,
registry, experiments, pipeline, serve, simulate, tune, predict), the formatting in `render`, and the error
boundary and shared options in `common`. Heavy imports (torch, recipes) stay inside the command
functions so `recforge --help` is fast.
"""

from __future__ import annotations

import sys

import typer

from recforge.cli import (
    common,
    data,
    evaluate,
    experiments,
    features,
    pipeline,
    predict,
    registry,
    serve,
    simulate,
    train,
    tune,
)
from recforge.doctor import doctor_command  # imports torch only when run, so --help stays fast

EXPECTED_FAILURES = common.EXPECTED_FAILURES
_run = common.guarded  # the error boundary, under its historical name

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="recforge: train, evaluate and ship recommenders.",
)
# Registration order is the order `recforge --help` lists commands (commands first, then groups).
app.add_typer(data.app, name="data")
app.command("train")(train.train_cmd)
app.command("evaluate")(evaluate.evaluate_cmd)
app.command("recommend")(evaluate.recommend_cmd)
app.command("quickstart")(train.quickstart)
app.command("plan")(train.plan_cmd)
app.command("tune")(tune.tune_cmd)
app.add_typer(predict.app, name="predict")
app.command("export")(evaluate.export_cmd)
app.add_typer(registry.app, name="registry")
app.add_typer(experiments.app, name="ab")
app.add_typer(pipeline.app, name="pipeline")
app.command("serve")(serve.serve_cmd)
app.add_typer(serve.events_app, name="events")
app.add_typer(features.app, name="features")
app.command("simulate")(simulate.simulate_cmd)
app.command("doctor")(doctor_command)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        common.err.print("interrupted")
        sys.exit(130)


__all__ = ["EXPECTED_FAILURES", "app", "main"]
