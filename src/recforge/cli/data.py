"""`recforge data ...`: generate the synthetic log, validate a log, prepare the training arrays."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from recforge.cli.common import AlwaysJsonOpt, ConfigOpt, Overrides, guarded, load_config, log
from recforge.cli.render import print_validation

app = typer.Typer(no_args_is_help=True, help="Generate, validate and prepare behaviour logs.")


@app.command("generate")
def data_generate(config: ConfigOpt = None, overrides: Overrides = None, as_json: AlwaysJsonOpt = False) -> None:
    """Write the synthetic world's behaviour log (seeded, deterministic) under WORKDIR/raw."""
    from recforge.recipes.generate import generate

    cfg = guarded(load_config, config, overrides)
    summary = guarded(generate, cfg)
    clicks = f"CTR {summary['ctr']:.3f}" if summary["ctr"] is not None else "implicit"
    log(f"generated {summary['rows']:,} events ({summary['users']:,} users, {summary['items']:,} items, "
        f"{summary['days']} days, {clicks}) in {summary['seconds']:.1f}s -> {Path(cfg.workdir) / 'raw'}")
    print(json.dumps(summary, default=str))


@app.command("validate")
def data_validate(
    config: ConfigOpt = None,
    overrides: Overrides = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where the quarantine and report go.")] = None,
    as_json: AlwaysJsonOpt = False,
) -> None:
    """Check a log against the schema: clean rows are counted, bad rows quarantined with a reason."""
    from recforge.recipes.prepare import validate_source

    cfg = guarded(load_config, config, overrides)
    outcome = guarded(validate_source, cfg, out_dir)
    print_validation(outcome.result, outcome.files)
    print(json.dumps(outcome.result.report()))


@app.command("prepare")
def data_prepare(config: ConfigOpt = None, overrides: Overrides = None, as_json: AlwaysJsonOpt = False) -> None:
    """Validate, split by time, fit vocabularies on train only, write encoded arrays."""
    from recforge.recipes.prepare import prepare_data

    cfg = guarded(load_config, config, overrides)
    info, result = guarded(prepare_data, cfg)
    print_validation(result, {"prepared": info.path})
    split = info.meta["split"]
    log("split: " + ", ".join(f"{name} {split[name]['rows']:,}" for name in ("train", "valid", "test")))
    print(json.dumps({"prepared": str(info.path), "rows": info.meta["rows"],
                      "splits": {k: split[k]["rows"] for k in ("train", "valid", "test")}}))
