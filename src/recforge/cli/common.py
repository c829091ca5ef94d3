"""What every command shares: the two consoles, the error boundary and the common options.

Progress and notes go to stderr and tables to stdout; with `--json` stdout is one JSON value
instead, for a script to parse. A failure is one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from recforge import config as config_module
from recforge.config import Config, split_assignment

out = Console()
err = Console(stderr=True, soft_wrap=True)  # one-line errors stay one line in logs

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. train.epochs=2")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object and nothing else.")]
# For commands whose stdout is one JSON value anyway: the flag is accepted so every command that
# produces a result can be called the same way from a script.
AlwaysJsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object and nothing else (stdout is "
                                                            "always that JSON here).")]

# Failures a user can cause with bad input, files or settings: one line, no traceback. EOFError and
# the pickle/zip errors come from damaged files (click would print a bare "Aborted." for EOFError);
# anything else is a bug and keeps its traceback.
EXPECTED_FAILURES = (ValueError, OSError, RuntimeError, LookupError, ArithmeticError, EOFError,
                     pickle.UnpicklingError, zipfile.BadZipFile)


def load_config(config: Path | None, overrides: list[str] | None) -> Config:
    return config_module.load(config, overrides or [])


def log(message: str) -> None:
    err.print(message, highlight=False)


def fail(exc: BaseException) -> None:
    if os.environ.get("RECFORGE_DEBUG"):
        raise exc
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2 if isinstance(exc, config_module.ConfigError) else 1)


def guarded(fn, *args, **kwargs):  # noqa: ANN001, ANN202 - a thin wrapper for uniform error output
    try:
        return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except EXPECTED_FAILURES as exc:
        fail(exc)


def pairs(items: list[str] | None, option: str, form: str) -> dict[str, str]:
    """Repeated `--option NAME=VALUE` flags as a dict; a malformed one fails naming the flag and its form."""
    found = {}
    for item in items or []:
        name, value = guarded(split_assignment, item, option, form)
        found[name] = value
    return found
