"""`recforge tune`: search hyper-parameters with Optuna on the validation metric (recipes/tune.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer

from recforge.cli.common import ConfigOpt, JsonOpt, Overrides, guarded, load_config, log
from recforge.cli.render import print_study


def tune_cmd(
    space: Annotated[Path, typer.Option("--space", help="YAML search space: params (and pruner); see "
                                        "recforge.recipes.tune.")],
    config: ConfigOpt = None,
    overrides: Overrides = None,
    study_dir: Annotated[Path | None, typer.Option(
        "--study-dir", help="Where the study's journal, trials and best.yaml go (default: WORKDIR/tune). Run "
        "the command again on it to resume.")] = None,
    n_trials: Annotated[int | None, typer.Option(
        "--n-trials", min=1, help="Finished trials (complete or pruned) the study should hold.")] = None,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", min=1, help="Seconds after which no new trial starts.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Search the declared space: each trial trains on the prepared data, bad ones are pruned by their
    per-epoch validation metric, the best config is written as a file to train with."""
    from recforge.recipes.tune import load_space, tune

    cfg = guarded(load_config, config, overrides)
    searched = guarded(load_space, space, cfg)
    where = study_dir or Path(cfg.workdir) / "tune"
    result = guarded(tune, cfg, searched, where, n_trials=n_trials, timeout=timeout, log=log)
    if as_json:
        print(json.dumps(dataclasses.asdict(result), default=str))
        return
    print_study(result)
