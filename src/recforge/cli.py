"""`recforge ...`: thin commands, each calling one recipe of recforge.recipes.

Every command takes `--config FILE` plus `key=value` overrides, prints human output on stderr/
stdout and exits non-zero with a one-line reason on failure (the traceback only with
RECFORGE_DEBUG=1).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
import zipfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from recforge import config as config_module
from recforge.config import Config
from recforge.doctor import doctor_command  # imports torch only when run, so --help stays fast

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="recforge: train, evaluate and ship recommenders.",
)
data_app = typer.Typer(no_args_is_help=True, help="Generate, validate and prepare behaviour logs.")
app.add_typer(data_app, name="data")

out = Console()
err = Console(stderr=True, soft_wrap=True)  # one-line errors stay one line in logs

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. train.epochs=2")]


def _load(config: Path | None, overrides: list[str] | None) -> Config:
    return config_module.load(config, overrides or [])


def _log(message: str) -> None:
    err.print(message, highlight=False)


def _fail(exc: BaseException) -> None:
    if os.environ.get("RECFORGE_DEBUG"):
        raise exc
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2 if isinstance(exc, config_module.ConfigError) else 1)


# Failures a user can cause with bad input, files or settings: one line, no traceback. EOFError and
# the pickle/zip errors come from damaged files (click would print a bare "Aborted." for EOFError);
# anything else is a bug and keeps its traceback.
EXPECTED_FAILURES = (ValueError, OSError, RuntimeError, LookupError, ArithmeticError, EOFError,
                     pickle.UnpicklingError, zipfile.BadZipFile)


def _run(fn, *args, **kwargs):  # noqa: ANN001, ANN202 - a thin wrapper for uniform error output
    try:
        return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except EXPECTED_FAILURES as exc:
        _fail(exc)


@data_app.command("generate")
def data_generate(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Write the synthetic world's behaviour log (seeded, deterministic) under WORKDIR/raw."""
    from recforge.recipes.generate import generate

    cfg = _run(_load, config, overrides)
    summary = _run(generate, cfg)
    _log(f"generated {summary['rows']:,} events ({summary['users']:,} users, {summary['items']:,} items, "
         f"{summary['days']} days, CTR {summary['ctr']:.3f}) in {summary['seconds']:.1f}s -> "
         f"{Path(cfg.workdir) / 'raw'}")
    print(json.dumps(summary, default=str))


def _print_validation(result, files) -> None:  # noqa: ANN001
    report = result.report()
    table = Table(title="validation")
    table.add_column("what")
    table.add_column("rows", justify="right")
    table.add_row("read", f"{report['rows_read']:,}")
    table.add_row("kept", f"{report['rows_kept']:,}")
    table.add_row("quarantined", f"{report['rows_quarantined']:,}")
    for reason, count in report["by_reason"].items():
        if count:
            table.add_row(f"  {reason}", f"{count:,}")
    units = report.get("time_units", {})
    if set(units) - {"s"}:  # numbers read as ms/us/ns (converted to seconds): say how many
        for unit, count in units.items():
            table.add_row(f"timestamps in {unit}", f"{count:,}")
    err.print(table)
    for name, path in files.items():
        _log(f"{name}: {path}")


@data_app.command("validate")
def data_validate(
    config: ConfigOpt = None,
    overrides: Overrides = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where the quarantine and report go.")] = None,
) -> None:
    """Check a log against the schema: clean rows are counted, bad rows quarantined with a reason."""
    from recforge.recipes.prepare import validate_source

    cfg = _run(_load, config, overrides)
    outcome = _run(validate_source, cfg, out_dir)
    _print_validation(outcome.result, outcome.files)
    print(json.dumps(outcome.result.report()))


@data_app.command("prepare")
def data_prepare(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Validate, split by time, fit vocabularies on train only, write encoded arrays."""
    from recforge.recipes.prepare import prepare_data

    cfg = _run(_load, config, overrides)
    info, result = _run(prepare_data, cfg)
    _print_validation(result, {"prepared": info.path})
    split = info.meta["split"]
    _log("split: " + ", ".join(f"{name} {split[name]['rows']:,}" for name in ("train", "valid", "test")))
    print(json.dumps({"prepared": str(info.path), "rows": info.meta["rows"],
                      "splits": {k: split[k]["rows"] for k in ("train", "valid", "test")}}))


@app.command("train")
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
) -> None:
    """Train the configured model on the prepared dataset."""
    from recforge.recipes.train import restore_run, train_model

    if resume and resume_from:
        _fail(ValueError("give --resume (continue the local run) or --resume-from URI (restore it), not both"))
    if mirror_to:
        overrides = [*(overrides or []), f"train.mirror_to={mirror_to}"]
    cfg = _run(_load, config, overrides)
    if nproc_per_node > 1:
        if resume_from:  # restored once here, then every rank resumes from the local copy
            restored = _run(restore_run, cfg, resume_from, _log)
            overrides = [*(overrides or []), f"train.mirror_to={restored.train.mirror_to}"]
            resume = True
        _launch_torchrun(nproc_per_node, config, overrides, resume, cfg.resolved_run_dir)
        return
    result = _run(train_model, cfg, resume=resume, resume_from=resume_from, log=_log)
    state = result.state
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line, from rank 0
        print(json.dumps({"run_dir": str(result.run_dir), "finished": state.finished,
                          "interrupted": result.interrupted, "best_epoch": state.best_epoch,
                          "best_valid": state.best_metric, "global_step": state.global_step}))
    if result.interrupted:
        raise typer.Exit(3)


def _launch_torchrun(nproc: int, config: Path | None, overrides: list[str] | None, resume: bool,
                     run_dir: Path) -> None:
    """One node, N ranks, via torchrun --standalone, which picks a free rendezvous port itself."""
    import subprocess

    from recforge.storage import read_json

    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--max_restarts=0", "-m", "recforge.train"]
    if config is not None:
        args += ["--config", str(config)]
    if resume:
        args.append("--resume")
    args += list(overrides or [])
    _log(f"launching {nproc} ranks: {' '.join(args[1:])}")
    started = time.time()
    code = subprocess.call(args)
    summary = run_dir / "train_summary.json"
    # Every rank exits 3 after a deliberate stop; torchrun reports that as a failure.
    fresh = code != 0 and summary.is_file() and summary.stat().st_mtime >= started
    if fresh and read_json(summary).get("interrupted"):
        _log("all ranks stopped at a checkpoint; continue with --resume")
        raise typer.Exit(3)
    if code != 0:
        err.print(f"[bold red]error:[/] distributed training failed (exit {code}); the failure summary "
                  "above names the rank that failed", highlight=False)
        raise typer.Exit(code if code in (1, 3) else 1)


def _metrics_table(results: dict[str, dict[str, float]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("scorer")
    for name in ("AUC", "GAUC", "logloss"):
        table.add_column(name, justify="right")
    for scorer, metrics in results.items():
        table.add_row(scorer, f"{metrics['auc']:.4f}", f"{metrics['gauc']:.4f}", f"{metrics['logloss']:.4f}")
    return table


@app.command("evaluate")
def evaluate_cmd(
    config: ConfigOpt = None,
    overrides: Overrides = None,
    split: Annotated[str, typer.Option(help="Which prepared split to score.")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object and nothing else.")] = False,
    without_history: Annotated[bool, typer.Option(
        "--without-history", help="Empty every user history (ablation for sequence models).")] = False,
) -> None:
    """Score the trained model and the popularity baseline on the same held-out split."""
    from recforge.models import model_entry
    from recforge.recipes.evaluate import evaluate_run
    from recforge.recipes.runs import load_run_config

    cfg = _run(_load, config, overrides)
    run_cfg = _run(load_run_config, cfg.resolved_run_dir)
    if model_entry(run_cfg.model.name).kind == "retrieval":
        from recforge.recipes.retrieval import evaluate_retrieval

        results = _run(evaluate_retrieval, cfg, split)
        if as_json:
            print(json.dumps(results))
        else:
            out.print(_retrieval_table(results, f"{split} split: full-catalog retrieval"))
        return
    results = _run(evaluate_run, cfg, split, without_history, _log)
    if as_json:
        print(json.dumps(results))
    else:
        out.print(_metrics_table(results, f"{split} split" + (" (histories emptied)" if without_history else "")))


def _retrieval_table(results: dict[str, dict[str, float]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("scorer")
    columns = [k for k in next(iter(results.values())) if "@" in k and not k.startswith(("hitrate", "mrr"))]
    for name in columns:
        table.add_column(name, justify="right")
    for scorer, metrics in results.items():
        table.add_row(scorer, *[f"{metrics[c]:.4f}" for c in columns])
    return table


@app.command("recommend")
def recommend_cmd(
    user: Annotated[list[str], typer.Option("--user", "-u", help="Raw user id (repeat for a batch).")],
    config: ConfigOpt = None,
    overrides: Overrides = None,
    k: Annotated[int, typer.Option(help="Items to return per user.")] = 10,
    candidates: Annotated[int, typer.Option(help="Items retrieved from the index before ranking.")] = 200,
    context: Annotated[list[str] | None, typer.Option(help="FIELD=VALUE request context, e.g. hour=20.")] = None,
    retrieval_run: Annotated[Path | None, typer.Option(help="Two-tower run (default WORKDIR/two_tower).")] = None,
    ranking_run: Annotated[Path | None, typer.Option(help="Ranking run (default WORKDIR/dnn).")] = None,
    include_seen: Annotated[bool, typer.Option(help="Allow items the user already clicked.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Two-stage recommendations: two-tower + FAISS retrieve candidates, the ranker orders them."""
    from recforge.recipes.retrieval import recommend_users

    cfg = _run(_load, config, overrides)
    pairs = {}
    for item in context or []:
        name, sep, value = item.partition("=")
        if not sep:
            _fail(ValueError(f"--context {item!r} is not FIELD=VALUE"))
        pairs[name] = value
    workdir = Path(cfg.workdir)
    results = _run(recommend_users, cfg, user, retrieval_run=retrieval_run or workdir / "two_tower",
                   ranking_run=ranking_run or workdir / "dnn", k=k, num_candidates=candidates, context=pairs,
                   exclude_seen=not include_seen)
    if as_json:
        print(json.dumps([{"user": r.user, "known_user": r.known_user, "items": r.items} for r in results]))
        return
    for result in results:
        table = Table(title=f"user {result.user}" + ("" if result.known_user else " (unknown: cold start)"))
        table.add_column("#", justify="right")
        table.add_column("item")
        table.add_column("ranking score", justify="right")
        table.add_column("retrieval score", justify="right")
        for rank, item in enumerate(result.items, start=1):
            table.add_row(str(rank), str(item["item"]), f"{item['ranking_score']:.4f}",
                          f"{item['retrieval_score']:.4f}")
        out.print(table)


@app.command("quickstart")
def quickstart(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Generate the synthetic world, prepare it, train the DNN ranker and evaluate it vs popularity."""
    from recforge.recipes.evaluate import evaluate_run
    from recforge.recipes.generate import generate
    from recforge.recipes.prepare import prepare_data
    from recforge.recipes.train import train_model

    cfg = _run(_load, config, overrides)
    started = time.time()
    _log(f"[bold]1/4 generate[/] synthetic world: {cfg.data.generate.users:,} users, "
         f"{cfg.data.generate.items:,} items, {cfg.data.generate.events:,} events")
    gen = _run(generate, cfg)
    _log(f"    {gen['rows']:,} events, CTR {gen['ctr']:.3f}, {gen['seconds']:.1f}s")
    _log("[bold]2/4 prepare[/]: validate, time split, vocabularies on train, encode")
    info, result = _run(prepare_data, cfg)
    split = info.meta["split"]
    _log(f"    kept {result.rows_kept:,} of {result.rows_read:,} rows; train {split['train']['rows']:,} / "
         f"valid {split['valid']['rows']:,} / test {split['test']['rows']:,}")
    _log(f"[bold]3/4 train[/] {cfg.model.name}")
    trained = _run(train_model, cfg, log=_log)
    _log("[bold]4/4 evaluate[/] on the held-out test days")
    results = _run(evaluate_run, cfg, "test")
    out.print(_metrics_table(results, "test split: model vs popularity"))
    lift = results["model"]["auc"] - results["popularity"]["auc"]
    out.print(f"AUC lift over popularity: {lift:+.4f}   GAUC lift: "
              f"{results['model']['gauc'] - results['popularity']['gauc']:+.4f}")
    workdir = Path(cfg.workdir)
    out.print(f"raw log:   {workdir / 'raw'}\nprepared:  {info.path}\nrun:       {trained.run_dir} "
              f"(model.pt, metrics.jsonl, config.yaml, evaluation_test.json)\n"
              f"done in {time.time() - started:.0f}s")


@app.command("plan")
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

    cfg = _run(_load, config, overrides)
    fields = {}
    for item in field or []:
        name, _, rows = item.partition("=")
        if not rows.isdigit():
            _fail(ValueError(f"--field {item!r} is not NAME=ROWS"))
        fields[name] = int(rows)
    result = _run(plan, cfg, fields=fields, world_size=world_size, device_memory_gib=device_memory_gib)
    gib = 1024**3
    parts = {"embeddings": result.embedding_bytes, "dense layers": result.dense_bytes,
             "gradients": result.gradient_bytes, "optimizer state": result.optimizer_bytes,
             "activations": result.activation_bytes}
    if as_json:
        print(json.dumps({"per_device_bytes": result.total_bytes, "fits": result.fits,
                          "device": result.device_name, "device_bytes": result.device_bytes,
                          "parts": parts, "tables": {t.field: t.bytes for t in result.tables},
                          "world_size": world_size, "advice": result.advice}))
        if result.fits is False:
            raise typer.Exit(1)
        return
    table = Table(title=f"memory per device ({cfg.model.name}, dim {cfg.model.embedding_dim}, "
                        f"{cfg.train.optimizer}, batch {cfg.train.batch_size}, {world_size} rank(s))")
    table.add_column("what")
    table.add_column("GiB", justify="right")
    for name, size in parts.items():
        table.add_row(name, f"{size / gib:.3f}")
    for t in result.tables[:5]:
        table.add_row(f"  table {t.field} ({t.rows:,} rows)", f"{t.bytes / gib:.3f}")
    table.add_row("[bold]total", f"[bold]{result.total_bytes / gib:.3f}")
    out.print(table)
    verdict = {True: "fits", False: "does NOT fit", None: "unknown fit"}[result.fits]
    out.print(f"{verdict} on {result.device_name}"
              + (f" ({result.device_bytes / gib:.1f} GiB)" if result.device_bytes else ""))
    for line in result.advice:
        out.print(f"  - {line}")
    if result.fits is False:
        raise typer.Exit(1)


@app.command("export")
def export_cmd(
    run: Annotated[Path, typer.Option("--run", help="Trained run directory (as `recforge train` writes it).")],
    out_uri: Annotated[str, typer.Option("--out", help="Bundle directory or URI (s3://...); must not exist.")],
    fmt: Annotated[str, typer.Option("--format", help="torchscript, or onnx (TorchScript plus ONNX graphs checked "
                                                      "with onnxruntime).")] = "torchscript",
    parity_rows: Annotated[int, typer.Option(help="Held-out rows the exported model is checked on.")] = 2048,
) -> None:
    """Export a trained run as a self-contained bundle (TorchScript, optionally ONNX) with a checksummed manifest."""
    from recforge.recipes.export import export_run

    if fmt not in ("torchscript", "onnx"):
        _fail(ValueError(f"--format must be torchscript or onnx, got {fmt!r}"))
    formats = ("torchscript", "onnx") if fmt == "onnx" else ("torchscript",)
    location = _run(export_run, run, out_uri, formats=formats, parity_rows=parity_rows)
    manifest = _run(_read_bundle_manifest, location)
    print(json.dumps({"bundle": str(location), "kind": manifest["kind"], "model_name": manifest["model_name"],
                      "schema_version": manifest["schema_version"], "files": len(manifest["files"]),
                      "formats": manifest["formats"], "parity_max_abs_diff": manifest["parity_max_abs_diff"],
                      "onnx_parity_max_abs_diff": (manifest["onnx"] or {}).get("parity_max_abs_diff")}))


def _read_bundle_manifest(location: Path | str) -> dict:
    from recforge import bundle, storage

    if isinstance(location, Path):
        return bundle.read_manifest(location)
    uri = storage.join(location, bundle.MANIFEST)
    return storage.parse_json(storage.get_bytes(uri), uri)


registry_app = typer.Typer(no_args_is_help=True, help="Versioned models: publish bundles, move aliases, roll back.")
app.add_typer(registry_app, name="registry")
RegistryOpt = Annotated[str, typer.Option("--registry", "-r", envvar="RECFORGE_REGISTRY",
                                          help="Registry root: a directory or s3://bucket/prefix.")]
ModelArg = Annotated[str, typer.Argument(help="Model name in the registry.")]
AliasOpt = Annotated[str, typer.Option("--alias", help="Alias to move.")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why; recorded in the history.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object and nothing else.")]


def _fmt_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@registry_app.command("list")
def registry_list(model: ModelArg, registry: RegistryOpt, as_json: JsonOpt = False) -> None:
    """Committed versions of a model, oldest first, with their aliases and metrics."""
    from recforge import registry as reg

    versions = _run(reg.list_versions, registry, model)
    if as_json:
        print(json.dumps([v.to_dict() for v in versions]))
        return
    if not versions:
        _fail(ValueError(f"model {model!r} has no published versions in {registry}"))
    table = Table(title=f"{model} in {registry}")
    for column in ("version", "aliases", "created", "kind", "metrics", "note"):
        table.add_column(column)
    for v in versions:
        shown = ", ".join(f"{k}={val:.4f}" for k, val in list(v.metrics.items())[:4])
        table.add_row(str(v.number), ", ".join(v.aliases), v.created, v.kind, shown, v.note)
    out.print(table)


@registry_app.command("show")
def registry_show(model: ModelArg, registry: RegistryOpt,
                  ref: Annotated[str, typer.Argument(help="Version number, alias or 'latest'.")] = "latest",
                  as_json: JsonOpt = False) -> None:
    """One version in detail: where it lives, when and why it was published, its metrics."""
    from recforge import registry as reg

    info = _run(reg.show, registry, model, ref)
    if as_json:
        print(json.dumps(info))
        return
    table = Table(title=f"{model} version {info['number']}")
    table.add_column("field")
    table.add_column("value")
    for key in ("path", "aliases", "created", "user", "note", "kind", "bundle_model_name", "files"):
        value = info[key]
        table.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
    for key, value in info["metrics"].items():
        table.add_row(f"metric {key}", _fmt_metric(value))
    out.print(table)


@registry_app.command("publish")
def registry_publish(model: ModelArg,
                     bundle_dir: Annotated[str, typer.Argument(help="Bundle directory or s3:// URI (from "
                                                               "`recforge export`).")],
                     registry: RegistryOpt,
                     note: Annotated[str, typer.Option("--note", help="Free text kept with the version.")] = "",
                     ) -> None:
    """Verify a bundle and store it as the model's next version."""
    from recforge import registry as reg

    number = _run(reg.publish, registry, bundle_dir, model, note)
    _log(f"published {bundle_dir} as {model} version {number}")
    print(json.dumps({"model": model, "version": number, "path": _run(reg.location, registry, model, number)}))


@registry_app.command("promote")
def registry_promote(model: ModelArg, version: Annotated[str, typer.Argument(help="Version number or alias.")],
                     registry: RegistryOpt, alias: AliasOpt = "production", reason: ReasonOpt = "") -> None:
    """Point an alias (default production) at a verified version."""
    from recforge import registry as reg

    record = _run(reg.promote, registry, model, version, alias, reason)
    _log(f"{model}: {alias} {record['from']} -> {record['to']}")
    print(json.dumps(record))


@registry_app.command("rollback")
def registry_rollback(model: ModelArg, registry: RegistryOpt, alias: AliasOpt = "production",
                      reason: ReasonOpt = "") -> None:
    """Move an alias back to the version it pointed at before its last promotion."""
    from recforge import registry as reg

    record = _run(reg.rollback, registry, model, alias, reason)
    _log(f"{model}: {alias} rolled back {record['from']} -> {record['to']}")
    print(json.dumps(record))


@registry_app.command("diff")
def registry_diff(model: ModelArg, a: Annotated[str, typer.Argument(help="Version, alias or 'latest'.")],
                  b: Annotated[str, typer.Argument(help="Version, alias or 'latest'.")], registry: RegistryOpt,
                  as_json: JsonOpt = False) -> None:
    """Two versions side by side: every metric, and the config keys that differ."""
    from recforge import registry as reg

    result = _run(reg.diff, registry, model, a, b)
    if as_json:
        print(json.dumps(result))
        return
    va, vb = result["a"]["version"], result["b"]["version"]
    table = Table(title=f"{model}: version {va} vs {vb}")
    for column in ("", "key", f"v{va}", f"v{vb}"):
        table.add_column(column)
    for key, (x, y) in result["metrics"].items():
        delta = "" if x is None or y is None else f" ({y - x:+.4f})"
        table.add_row("metric", key, _fmt_metric(x), _fmt_metric(y) + delta)
    for key, (x, y) in result["config"].items():
        table.add_row("config", key, json.dumps(x), json.dumps(y))
    out.print(table)


ab_app = typer.Typer(no_args_is_help=True, help="A/B analysis of the served impression/click log.")
app.add_typer(ab_app, name="ab")


@ab_app.command("report")
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

    result = _run(ab.ab_report, events, experiment, control=control, alpha=alpha, weights=weights, cuped=cuped,
                  pre_period_end=pre_period_end, pre_events_uri=pre_events, power=power)
    if plot is not None:
        from recforge.experiments.plot import plot_report

        _run(plot_report, result, plot)
        _log(f"plot: {plot}")
    if as_json:
        for warning in result["warnings"]:  # stdout stays one JSON object; a broken split still gets seen
            err.print(f"[bold red]warning:[/] {warning}", highlight=False)
        print(json.dumps(result))
        return
    _print_ab(result)


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f}%"


def _fmt_lift(value: float | None, ci: list[float | None], pct: bool) -> str:
    """Point estimate over its CI, stacked so the lift table fits an 80-column terminal."""
    if value is None or ci[0] is None or ci[1] is None:
        return "-"
    if pct:
        return f"{_fmt_pct(value)}\n[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]%"
    return f"{value:+.3g}\n[{ci[0]:+.3g}, {ci[1]:+.3g}]"


_AB_METRIC_NAMES = {"ctr": "CTR", "clicks_per_user": "clicks/user", "impressions_per_user": "imps/user"}


def _print_ab(result: dict) -> None:
    srm = result["srm"]
    if srm["flagged"]:
        out.print(f"[bold white on red] SAMPLE RATIO MISMATCH [/] users {srm['observed']} vs expected "
                  f"{ {k: round(v) for k, v in srm['expected'].items()} } (chi2 {srm['chi2']:.1f}, "
                  f"p {srm['p_value']:.2g}): assignment or logging is broken; do not trust the lifts below")
    ci_name = f"{1 - result['alpha']:.0%} CI"
    variants = Table(title=f"experiment {result['experiment']}, control {result['control']!r}: SRM chi2 "
                           f"{srm['chi2']:.2f}, p {srm['p_value']:.3g} ({'FLAGGED' if srm['flagged'] else 'ok'})")
    for column in ("variant", "users", "impressions", "clicks", "CTR", f"CTR {ci_name}"):
        variants.add_column(column, justify="left" if column == "variant" else "right")
    for name, v in result["variants"].items():
        variants.add_row(name, f"{v['users']:,}", f"{v['impressions']:,}", f"{v['clicks']:,}", f"{v['ctr']:.4f}",
                         f"[{v['ctr_ci'][0]:.4f}, {v['ctr_ci'][1]:.4f}]")
    out.print(variants)
    cuped = result["cuped"]
    lifts = Table(title="lifts vs control" + (" (CUPED-adjusted)" if cuped["enabled"] else "")
                  + f"; Holm across {len(result['comparisons'])} comparisons")
    for column in ("metric", "variant", "C\nT", f"abs lift\n{ci_name}", f"rel lift\n{ci_name}", "p\nHolm p", "sig",
                   "MDE\nrel"):
        lifts.add_column(column, justify="left" if column in ("metric", "variant") else "right")
    for c in result["comparisons"]:
        mde = result["mde"][c["metric"]][c["treatment"]]
        lifts.add_row(_AB_METRIC_NAMES.get(c["metric"], c["metric"]), c["treatment"],
                      f"{c['control_value']:.4g}\n{c['treatment_value']:.4g}",
                      _fmt_lift(c["abs_lift"], c["abs_ci"], False), _fmt_lift(c["rel_lift"], c["rel_ci"], True),
                      f"{c['p_value']:.3g}\n{c['p_holm']:.3g}", "[bold green]yes" if c["significant"] else "no",
                      "-" if mde["rel"] is None else f"{100 * mde['rel']:.2f}%")
    out.print(lifts)
    if cuped["enabled"]:
        reductions = ", ".join(f"{m} {100 * info['variance_reduction']:.1f}%" for m, info in cuped["metrics"].items())
        out.print(f"CUPED ({', '.join(cuped['covariates'])}; {cuped['pre_period']}; "
                  f"{cuped['users_with_pre_period']:,} users with history): variance reduction {reductions}")
    out.print(f"C/T: control/treatment value. MDE rel: smallest relative lift detected at alpha {result['alpha']} "
              f"with {result['power']:.0%} power for this traffic.\nmethod: {result['method']}")
    for warning in result["warnings"]:
        out.print(f"[bold red]warning:[/] {warning}", highlight=False)


pipeline_app = typer.Typer(no_args_is_help=True, help="Continuous training: new data -> gate -> canary -> production.")
app.add_typer(pipeline_app, name="pipeline")


@pipeline_app.command("run")
def pipeline_run(
    config: Annotated[Path, typer.Option("--config", "-c", help="Pipeline YAML (see configs/pipeline/).")],
    overrides: Overrides = None,
    step: Annotated[str | None, typer.Option(
        "--step", help="Run only this step of the open cycle: ingest, prepare, train, export, evaluate, gate, "
                       "publish, canary or promote.")] = None,
    json_out: Annotated[Path | None, typer.Option(
        "--json-out", help="Also write the result JSON here (e.g. /airflow/xcom/return.json).")] = None,
) -> None:
    """Ingest new partitions, train a challenger, gate it against the champion, publish, canary, promote."""
    from recforge import pipeline
    from recforge.storage import write_json

    cfg = _run(pipeline.load_pipeline, config, overrides)
    summary = _run(pipeline.run, cfg, step, _log)
    if json_out is not None:
        _run(write_json, json_out, summary)
    print(json.dumps(summary, default=str))


@pipeline_app.command("abandon")
def pipeline_abandon(
    config: Annotated[Path, typer.Option("--config", "-c", help="Pipeline YAML (see configs/pipeline/).")],
    overrides: Overrides = None,
    consume: Annotated[bool, typer.Option(
        "--consume", help="Mark the cycle's new partitions consumed (not retried by the next cycle).")] = False,
) -> None:
    """Close the open cycle unfinished: one that fails on every run (`pipeline run` reports it as stuck)."""
    from recforge import pipeline

    cfg = _run(pipeline.load_pipeline, config, overrides)
    print(json.dumps(_run(pipeline.abandon, cfg, consume, _log), default=str))


@registry_app.command("history")
def registry_history(model: ModelArg, registry: RegistryOpt, as_json: JsonOpt = False) -> None:
    """Every alias move of a model, oldest first: when, which alias, from, to, who and why."""
    from recforge import registry as reg

    records = _run(reg.history, registry, model)
    if as_json:
        print(json.dumps(records))
        return
    table = Table(title=f"{model}: alias history")
    for column in ("time", "action", "alias", "from", "to", "user", "reason"):
        table.add_column(column)
    for r in records:
        table.add_row(str(r.get("time", "")), str(r.get("action", "")), str(r.get("alias", "")),
                      "-" if r.get("from") is None else str(r["from"]), "-" if r.get("to") is None else str(r["to"]),
                      str(r.get("user", "")), str(r.get("reason", "")))
    out.print(table)


@registry_app.command("gc")
def registry_gc(model: ModelArg, registry: RegistryOpt,
                older_than: Annotated[float, typer.Option("--older-than", help="Seconds since the slot was "
                                                          "claimed.")] = 3600.0) -> None:
    """Remove version slots whose upload never committed (a crashed publisher's); they are already hidden."""
    from recforge import registry as reg

    removed = _run(reg.gc, registry, model, older_than)
    _log(f"{model}: removed {len(removed)} uncommitted slot(s)")
    print(json.dumps({"model": model, "removed": removed}))


@app.command("serve")
def serve_cmd(
    registry: Annotated[str | None, typer.Option("--registry", "-r", envvar="RECFORGE_REGISTRY",
                                                 help="Registry root (path or URI).")] = None,
    host: Annotated[str | None, typer.Option(help="Interface to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    retrieval_model: Annotated[str | None, typer.Option(help="Registry name of the retrieval model.")] = None,
    ranker_model: Annotated[str | None, typer.Option(help="Registry name of the ranker.")] = None,
    experiments: Annotated[Path | None, typer.Option(help="A/B experiments file (YAML or JSON).")] = None,
    events_dir: Annotated[Path | None, typer.Option(help="Where accepted events are stored.")] = None,
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

    extra = {}
    for item in setting or []:
        name, sep, value = item.partition("=")
        if not sep:
            _fail(ValueError(f"--set {item!r} is not NAME=VALUE"))
        extra[name] = value
    overrides = {"registry": registry, "host": host, "port": port, "retrieval_model": retrieval_model,
                 "ranker_model": ranker_model, "experiments": experiments, "events_dir": events_dir,
                 "poll_interval_s": poll_interval_s, "canary_share": canary_share, "workers": workers, "docs": docs,
                 "metrics": metrics, **extra}
    settings = _run(ServeSettings.load, overrides)
    from recforge.serve.app import run as run_server

    _run(run_server, settings)


events_app = typer.Typer(no_args_is_help=True, help="Events the server accepted: export them for training.")
app.add_typer(events_app, name="events")


@events_app.command("export")
def events_export(
    events_dir: Annotated[Path, typer.Option("--events-dir", help="The server's --events-dir.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for one parquet file per UTC day.")],
    since: Annotated[str | None, typer.Option(help="First UTC day to export (YYYY-MM-DD).")] = None,
    until: Annotated[str | None, typer.Option(help="Last UTC day to export (YYYY-MM-DD).")] = None,
) -> None:
    """Write impressions (labelled by their clicks) in the event-log schema `recforge data prepare` reads."""
    from recforge.serve.events import export_report

    report = _run(export_report, events_dir, out_dir, since, until)
    _log(f"exported {report.exported_rows:,} impressions ({report.clicks:,} clicks, {report.events_total:,} events "
         f"stored) into {len(report.files)} day file(s) under {out_dir}")
    print(json.dumps(report.__dict__))


@app.command("simulate")
def simulate_cmd(
    scenario: Annotated[str, typer.Option("--scenario", help="ab: weak vs strong ranker A/B test; loop: simulated "
                                                            "days of serve -> events -> pipeline -> promote.")],
    config: ConfigOpt = None,
    overrides: Overrides = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG path (default: WORKDIR/<scenario>.png).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the figures.")] = False,
) -> None:
    """Synthetic users from the world's ground truth play against the real server (see configs/simulate/)."""
    from recforge import scenarios

    if scenario not in scenarios.SCENARIOS:
        _fail(ValueError(f"--scenario must be one of {', '.join(scenarios.SCENARIOS)}, got {scenario!r}"))
    cfg = _run(scenarios.load_simulate, config, overrides)
    result = _run(scenarios.run_scenario, scenario, cfg, _log)
    result["plot"] = str(_run(scenarios.plot_scenario, result, plot or cfg.root / f"{scenario}.png"))
    from recforge.storage import write_json

    _run(write_json, cfg.root / f"{scenario}.json", result)
    if as_json:
        print(json.dumps(result, default=str))
        return
    from recforge.scenarios.tables import ab_table, loop_table

    out.print(ab_table(result) if scenario == "ab" else loop_table(result))
    out.print(f"plot: {result['plot']}\nfigures: {cfg.root / f'{scenario}.json'}\ndone in {result['seconds']:.0f}s")


app.command("doctor")(doctor_command)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
