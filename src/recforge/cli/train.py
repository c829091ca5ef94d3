"""`recforge train`, `plan` and `quickstart`: fit a model, size it for a device, or do it all at once."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from recforge.cli.common import (
    AlwaysJsonOpt,
    ConfigOpt,
    Overrides,
    err,
    fail,
    guarded,
    load_config,
    log,
)
from recforge.cli.render import print_plan, print_quickstart
from recforge.config import split_assignment


def train_cmd(
    config: ConfigOpt = None,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")] = False,
    nproc_per_node: Annotated[int, typer.Option(
        "--nproc-per-node", help="Processes (DDP ranks) on this machine, launched with torchrun.")] = 1,
    mirror_to: Annotated[str | None, typer.Option(
        "--mirror-to", help="Upload every checkpoint to this URI (s3://bucket/runs/NAME); = train.mirror_to.")] = None,
    resume_from: Annotated[str | None, typer.Option(
        "--resume-from", help="Restore the newest checkpoint mirrored at this URI into the (empty) run "
        "directory and continue from it.")] = None,
    as_json: AlwaysJsonOpt = False,
) -> None:
    """Train the configured model on the prepared dataset."""
    from recforge.recipes.train import restore_run, train_model

    if resume and resume_from:
        fail(ValueError("give --resume (continue the local run) or --resume-from URI (restore it), not both"))
    if mirror_to:
        overrides = [*(overrides or []), f"train.mirror_to={mirror_to}"]
    cfg = guarded(load_config, config, overrides)
    if nproc_per_node > 1:
        if resume_from:  # restored once here, then every rank resumes from the local copy
            restored = guarded(restore_run, cfg, resume_from, log)
            overrides = [*(overrides or []), f"train.mirror_to={restored.train.mirror_to}"]
            resume = True
        _launch_torchrun(nproc_per_node, config, overrides, resume, cfg.resolved_run_dir)
        return
    result = guarded(train_model, cfg, resume=resume, resume_from=resume_from, log=log)
    state = result.state
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line, from rank 0
        print(json.dumps({"run_dir": str(result.run_dir), "finished": state.finished,
                          "interrupted": result.interrupted, "best_epoch": state.best_epoch,
                          "best_valid": state.best_metric, "global_step": state.global_step}))
    if result.interrupted:
        raise typer.Exit(3)


def _launch_torchrun(nproc: int, config: Path | None, overrides: list[str] | None, resume: bool,
                     run_dir: Path) -> None:
    """One node, N ranks, via torchrun --standalone, which picks a free rendezvous port itself.

    Rank 0 prints the run's one JSON summary line; this launcher prints nothing on stdout.
    """
    import subprocess

    from recforge.storage import read_json

    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--max_restarts=0", "-m", "recforge.train"]
    if config is not None:
        args += ["--config", str(config)]
    if resume:
        args.append("--resume")
    args += list(overrides or [])
    log(f"launching {nproc} ranks: {' '.join(args[1:])}")
    started = time.time()
    code = subprocess.call(args)
    summary = run_dir / "train_summary.json"
    # Every rank exits 3 after a deliberate stop; torchrun reports that as a failure.
    fresh = code != 0 and summary.is_file() and summary.stat().st_mtime >= started
    if fresh and read_json(summary).get("interrupted"):
        log("all ranks stopped at a checkpoint; continue with --resume")
        raise typer.Exit(3)
    if code != 0:
        err.print(f"[bold red]error:[/] distributed training failed (exit {code}); the failure summary "
                  "above names the rank that failed", highlight=False)
        raise typer.Exit(code if code in (1, 3) else 1)


def quickstart(
    config: ConfigOpt = None,
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (every step's figures) and "
                                                         "nothing else on stdout.")] = False,
) -> None:
    """Generate the synthetic world, prepare it, train the DNN ranker and evaluate it vs popularity."""
    from recforge.recipes.evaluate import evaluate_run
    from recforge.recipes.generate import generate
    from recforge.recipes.prepare import prepare_data
    from recforge.recipes.train import train_model

    cfg = guarded(load_config, config, overrides)
    started = time.time()
    log(f"[bold]1/4 generate[/] synthetic world: {cfg.data.generate.users:,} users, "
        f"{cfg.data.generate.items:,} items, {cfg.data.generate.events:,} events")
    gen = guarded(generate, cfg)
    log(f"    {gen['rows']:,} events, CTR {gen['ctr']:.3f}, {gen['seconds']:.1f}s")
    log("[bold]2/4 prepare[/]: validate, time split, vocabularies on train, encode")
    info, result = guarded(prepare_data, cfg)
    split = info.meta["split"]
    log(f"    kept {result.rows_kept:,} of {result.rows_read:,} rows; train {split['train']['rows']:,} / "
        f"valid {split['valid']['rows']:,} / test {split['test']['rows']:,}")
    log(f"[bold]3/4 train[/] {cfg.model.name}")
    trained = guarded(train_model, cfg, log=log)
    log("[bold]4/4 evaluate[/] on the held-out test days")
    results = guarded(evaluate_run, cfg, "test")
    if as_json:
        print(json.dumps({"raw": str(Path(cfg.workdir) / "raw"), "generate": gen, "prepared": str(info.path),
                          "rows_read": result.rows_read, "rows_kept": result.rows_kept,
                          "splits": {k: split[k]["rows"] for k in ("train", "valid", "test")},
                          "run_dir": str(trained.run_dir), "test": results,
                          "seconds": time.time() - started}, default=str))
        return
    print_quickstart(results, info, trained, Path(cfg.workdir), time.time() - started)


def plan_cmd(
    config: ConfigOpt = None,
    overrides: Overrides = None,
    field: Annotated[list[str] | None, typer.Option(
        "--field", help="NAME=ROWS vocabulary size, instead of reading the prepared dataset.")] = None,
    world_size: Annotated[int, typer.Option(help="DDP ranks (each holds a full replica).")] = 1,
    device_memory_gib: Annotated[float | None, typer.Option(
        help="Plan for a device of this size instead of the one found here.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Parameter, gradient, optimizer and activation memory per device; what to do when it won't fit."""
    from recforge.recipes.train import plan

    cfg = guarded(load_config, config, overrides)
    fields = _field_sizes(field)
    result = guarded(plan, cfg, fields=fields, world_size=world_size, device_memory_gib=device_memory_gib)
    parts = {"embeddings": result.embedding_bytes, "dense layers": result.dense_bytes,
             "gradients": result.gradient_bytes, "optimizer state": result.optimizer_bytes,
             "activations": result.activation_bytes}
    if as_json:
        print(json.dumps({"per_device_bytes": result.total_bytes, "fits": result.fits,
                          "device": result.device_name, "device_bytes": result.device_bytes,
                          "parts": parts, "tables": {t.field: t.bytes for t in result.tables},
                          "world_size": world_size, "advice": result.advice}))
    else:
        print_plan(result, parts, cfg, world_size)
    if result.fits is False:
        raise typer.Exit(1)


def _field_sizes(items: list[str] | None) -> dict[str, int]:
    """`--field NAME=ROWS` flags as {name: rows}; ROWS must be a whole number."""
    sizes = {}
    for item in items or []:
        name, rows = guarded(split_assignment, item, "--field", "NAME=ROWS")
        if not rows.isdigit():
            fail(ValueError(f"--field {item!r} is not NAME=ROWS"))
        sizes[name] = int(rows)
    return sizes
