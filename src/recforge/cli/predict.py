"""`recforge predict scores|topk`: a trained run's predictions out as Parquet (recipes/predict.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer

from recforge.cli.common import ConfigOpt, JsonOpt, Overrides, guarded, load_config, log, pairs

app = typer.Typer(no_args_is_help=True, help="Scores for the rows of a file, top-K lists for users: Parquet out.")


@app.command("scores")
def scores_cmd(
    input_path: Annotated[str, typer.Option("--input", help="The rows to score: a file or directory (Parquet or "
                                            "CSV) with the run's schema columns; a label is not needed.")],
    out: Annotated[Path, typer.Option("--out", help="The Parquet file to write (replaced atomically).")],
    config: ConfigOpt = None,
    overrides: Overrides = None,
    fmt: Annotated[str, typer.Option("--format", help="auto, parquet, csv or movielens.")] = "auto",
    keep: Annotated[list[str] | None, typer.Option("--keep", help="An input column to copy to the output "
                                                   "(repeat); user, item, _file and _row always are.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Score every row of a file with the run in run_dir; rows that cannot be scored say why."""
    from recforge.recipes.predict import score_file

    cfg = guarded(load_config, config, overrides)
    report = guarded(score_file, cfg, input_path, out, fmt=fmt, keep=keep or [])
    if as_json:
        print(json.dumps(dataclasses.asdict(report), default=str))
        return
    log(f"scored {report.scored:,} of {report.rows:,} rows -> {report.out}")
    for reason, count in sorted(report.not_scored.items()):
        log(f"  not scored, {reason}: {count:,}")


@app.command("topk")
def topk_cmd(
    out: Annotated[Path, typer.Option("--out", help="The Parquet file to write (replaced atomically).")],
    user: Annotated[list[str] | None, typer.Option("--user", "-u", help="A raw user id (repeat).")] = None,
    users_file: Annotated[Path | None, typer.Option(
        "--users", help="A text file of raw user ids, one per line.")] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
    k: Annotated[int, typer.Option(min=1, help="Items per user.")] = 10,
    context: Annotated[list[str] | None, typer.Option(help="FIELD=VALUE request context, e.g. hour=20.")] = None,
    include_seen: Annotated[bool, typer.Option(help="Allow items the user already clicked.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Rank the whole catalog for each user with the run in run_dir and keep the k best."""
    from recforge.recipes.predict import top_k

    cfg = guarded(load_config, config, overrides)
    wanted = list(user or [])
    if users_file is not None:
        text = guarded(users_file.read_text)
        wanted += [line.strip() for line in text.splitlines() if line.strip()]
    result = guarded(top_k, cfg, wanted, out, k=k, context=pairs(context, "--context", "FIELD=VALUE"),
                     exclude_seen=not include_seen)
    if as_json:
        print(json.dumps(result))
        return
    log(f"top {k} for {result['users']:,} users ({result['known_users']:,} known) -> {result['out']}")
