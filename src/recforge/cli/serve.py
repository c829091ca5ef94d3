"""`recforge serve` and `recforge events export`: run the HTTP server, export what it accepted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from recforge.cli.common import AlwaysJsonOpt, guarded, log, pairs

events_app = typer.Typer(no_args_is_help=True, help="Events the server accepted: into the lake, and out for training.")


def serve_cmd(
    registry: Annotated[str | None, typer.Option("--registry", "-r", envvar="RECFORGE_REGISTRY",
                                                 help="Registry root (path or URI).")] = None,
    host: Annotated[str | None, typer.Option(help="Interface to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    retrieval_model: Annotated[str | None, typer.Option(help="Registry name of the retrieval model.")] = None,
    ranker_model: Annotated[str | None, typer.Option(help="Registry name of the ranker.")] = None,
    experiments: Annotated[Path | None, typer.Option(help="A/B experiments file (YAML or JSON).")] = None,
    events_dir: Annotated[Path | None, typer.Option(help="Where accepted events are stored.")] = None,
    state: Annotated[str | None, typer.Option(help="Where events, users' recent items and canary windows live: "
                                                   "local (the default) or redis://HOST:PORT/DB, shared by every "
                                                   "replica (credentials: RECFORGE_REDIS_* variables).")] = None,
    poll_interval_s: Annotated[float | None, typer.Option(help="Seconds between registry alias checks.")] = None,
    canary_share: Annotated[float | None, typer.Option(help="Share of users routed to a canary.")] = None,
    workers: Annotated[int | None, typer.Option(help="Server processes sharing the port (each loads the models; "
                                                     "they share the events store).")] = None,
    docs: Annotated[str | None, typer.Option(help="Who may read /openapi.json, /docs and /redoc: off, admin "
                                                  "(the admin token; the default) or public.")] = None,
    metrics: Annotated[str | None, typer.Option(help="Who may read /metrics: off, admin (the admin token; the "
                                                     "default) or public.")] = None,
    setting: Annotated[list[str] | None, typer.Option("--set", help="Any other setting as NAME=VALUE, e.g. "
                                                      "max_k=50 (see recforge.serve.settings).")] = None,
) -> None:
    """Serve recommendations over HTTP (settings: flags > RECFORGE_SERVE_* environment > defaults)."""
    from recforge.serve.settings import ServeSettings

    extra = pairs(setting, "--set", "NAME=VALUE")
    overrides = {"registry": registry, "host": host, "port": port, "retrieval_model": retrieval_model,
                 "ranker_model": ranker_model, "experiments": experiments, "events_dir": events_dir,
                 "state": state, "poll_interval_s": poll_interval_s, "canary_share": canary_share, "workers": workers,
                 "docs": docs, "metrics": metrics, **extra}
    settings = guarded(ServeSettings.load, overrides)
    from recforge.serve.app import run as run_server

    guarded(run_server, settings)


@events_app.command("export")
def events_export(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for one parquet file per UTC day.")],
    events_dir: Annotated[Path | None, typer.Option("--events-dir", help="The server's --events-dir (state local).")
                          ] = None,
    lake: Annotated[str | None, typer.Option(help="The lake `recforge events ingest` wrote (state redis): a path "
                                                  "or s3:// URI.")] = None,
    since: Annotated[str | None, typer.Option(help="First UTC day to export (YYYY-MM-DD).")] = None,
    until: Annotated[str | None, typer.Option(help="Last UTC day to export (YYYY-MM-DD).")] = None,
    as_json: AlwaysJsonOpt = False,
) -> None:
    """Write impressions (labelled by their clicks) in the event-log schema `recforge data prepare` reads."""
    if (events_dir is None) == (lake is None):
        log("error: pass --events-dir (a server on --state local) or --lake (the stream's lake), one of them")
        raise typer.Exit(2)
    if lake is not None:
        from recforge.serve.stream_lake import export_lake

        report = guarded(export_lake, lake, out_dir, since, until)
    else:
        from recforge.serve.events import export_report

        report = guarded(export_report, events_dir, out_dir, since, until)
    log(f"exported {report.exported_rows:,} impressions ({report.clicks:,} clicks, {report.events_total:,} events "
        f"stored) into {len(report.files)} day file(s) under {out_dir}")
    print(json.dumps(report.__dict__))


@events_app.command("ingest")
def events_ingest(
    state: Annotated[str, typer.Option(envvar="RECFORGE_SERVE_STATE", help="The servers' --state redis://HOST:PORT/DB "
                                       "(credentials: RECFORGE_REDIS_* variables).")],
    lake: Annotated[str, typer.Option(help="Where the events go: a path or s3:// URI (day=YYYY-MM-DD/part files).")],
    prefix: Annotated[str, typer.Option(help="The servers' redis_prefix.")] = "recforge",
    batch: Annotated[int, typer.Option(min=1, help="Stream entries per round (one part file per arrival day).")
                     ] = 10_000,
    as_json: AlwaysJsonOpt = False,
) -> None:
    """Move the shared event stream into the lake, each event exactly once, then trim what the lake holds."""
    from recforge.serve.stream_lake import ingest_stream

    report = guarded(ingest_stream, state, lake, prefix, batch)
    log(f"ingested {report.written:,} events into {len(report.files)} part file(s) under {lake} "
        f"({report.already_in_lake:,} already there, {report.trimmed:,} trimmed from the stream)")
    print(json.dumps(report.__dict__))
