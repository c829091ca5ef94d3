"""`recforge pipeline ...`: one continuous-training cycle, step by step or to the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from recforge.cli.common import AlwaysJsonOpt, Overrides, guarded, log

app = typer.Typer(no_args_is_help=True, help="Continuous training: new data -> gate -> canary -> production.")
PipelineConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Pipeline YAML (see configs/pipeline/).")]


@app.command("run")
def pipeline_run(
    config: PipelineConfigOpt,
    overrides: Overrides = None,
    step: Annotated[str | None, typer.Option(
        "--step", help="Run only this step of the open cycle: ingest, prepare, train, export, evaluate, gate, "
                       "publish, canary or promote.")] = None,
    json_out: Annotated[Path | None, typer.Option(
        "--json-out", help="Also write the result JSON here (e.g. /airflow/xcom/return.json).")] = None,
    as_json: AlwaysJsonOpt = False,
) -> None:
    """Ingest new partitions, train a challenger, gate it against the champion, publish, canary, promote."""
    from recforge import pipeline
    from recforge.storage import write_json

    cfg = guarded(pipeline.load_pipeline, config, overrides)
    summary = guarded(pipeline.run, cfg, step, log)
    if json_out is not None:
        guarded(write_json, json_out, summary)
    print(json.dumps(summary, default=str))


@app.command("abandon")
def pipeline_abandon(
    config: PipelineConfigOpt,
    overrides: Overrides = None,
    consume: Annotated[bool, typer.Option(
        "--consume", help="Mark the cycle's new partitions consumed (not retried by the next cycle).")] = False,
    as_json: AlwaysJsonOpt = False,
) -> None:
    """Close the open cycle unfinished: one that fails on every run (`pipeline run` reports it as stuck)."""
    from recforge import pipeline

    cfg = guarded(pipeline.load_pipeline, config, overrides)
    print(json.dumps(guarded(pipeline.abandon, cfg, consume, log), default=str))
