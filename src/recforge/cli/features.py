"""`recforge features materialize`: users' histories from the log into the servers' shared Redis."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer

from recforge.cli.common import AlwaysJsonOpt, ConfigOpt, Overrides, guarded, load_config, log

app = typer.Typer(no_args_is_help=True, help="Online features: what the servers read per user.")


@app.command("materialize")
def features_materialize(
    state: Annotated[str, typer.Option(envvar="RECFORGE_SERVE_STATE", help="The servers' --state: "
                                       "redis://HOST:PORT/DB (credentials from RECFORGE_REDIS_*).")],
    config: ConfigOpt = None,
    overrides: Overrides = None,
    prefix: Annotated[str, typer.Option(help="The servers' redis_prefix.")] = "recforge",
    length: Annotated[int | None, typer.Option(help="Items kept per user and list (default: the servers' "
                                                    "seen_per_user, 200).")] = None,
    as_json: AlwaysJsonOpt = False,
) -> None:
    """Write every user's recent items and clicks, computed from the configured log with the training data's
    history rule, into Redis; events the servers took after the log are kept on top."""
    from recforge.recipes.features import materialize_features

    cfg = guarded(load_config, config, overrides)
    report = guarded(materialize_features, cfg, state, prefix, length)
    log(f"seeded {report.users:,} users from {report.events:,} events ({report.quarantined:,} quarantined): "
        f"{report.clicks_written:,} clicks, {report.shown_written:,} shown items, {report.later_events:,} later "
        f"events kept, in {report.seconds:.1f}s")
    print(json.dumps(asdict(report)))
