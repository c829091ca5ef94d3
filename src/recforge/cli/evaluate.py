"""`recforge evaluate`, `recommend` and `export`: score a trained run, query it, ship it as a bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from recforge.cli.common import AlwaysJsonOpt, ConfigOpt, Overrides, fail, guarded, load_config, log, out, pairs
from recforge.cli.render import metrics_table, print_recommendations, retrieval_table


def evaluate_cmd(
    config: ConfigOpt = None,
    overrides: Overrides = None,
    split: Annotated[str, typer.Option(help="Which prepared split to score.")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object and nothing else.")] = False,
    without_history: Annotated[bool, typer.Option(
        "--without-history", help="Empty every user history (ablation for sequence models).")] = False,
    users: Annotated[str | None, typer.Option(
        "--users", help="Retrieval models: rank for all users of the split, or only warm ones (a positive in "
        "training); default: the run's train.retrieval_users.")] = None,
) -> None:
    """Score the trained model and the popularity baseline on the same held-out split."""
    from recforge.models import model_entry
    from recforge.recipes.evaluate import evaluate_run
    from recforge.recipes.runs import load_run_config

    cfg = guarded(load_config, config, overrides)
    run_cfg = guarded(load_run_config, cfg.resolved_run_dir)
    if model_entry(run_cfg.model.name).kind == "retrieval":
        from recforge.recipes.retrieval import evaluate_retrieval

        results = guarded(evaluate_retrieval, cfg, split, users_from=users)
        if as_json:
            print(json.dumps(results))
        else:
            out.print(retrieval_table(results, f"{split} split: full-catalog retrieval, "
                                               f"{users or run_cfg.train.retrieval_users} users"))
        return
    results = guarded(evaluate_run, cfg, split, without_history, log)
    if as_json:
        print(json.dumps(results))
    else:
        out.print(metrics_table(results, f"{split} split" + (" (histories emptied)" if without_history else "")))


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

    cfg = guarded(load_config, config, overrides)
    request_context = pairs(context, "--context", "FIELD=VALUE")
    workdir = Path(cfg.workdir)
    results = guarded(recommend_users, cfg, user, retrieval_run=retrieval_run or workdir / "two_tower",
                      ranking_run=ranking_run or workdir / "dnn", k=k, num_candidates=candidates,
                      context=request_context, exclude_seen=not include_seen)
    if as_json:
        print(json.dumps([{"user": r.user, "known_user": r.known_user, "items": r.items} for r in results]))
        return
    print_recommendations(results)


def export_cmd(
    run: Annotated[Path, typer.Option("--run", help="Trained run directory (as `recforge train` writes it).")],
    out_uri: Annotated[str, typer.Option("--out", help="Bundle directory or URI (s3://...); must not exist.")],
    fmt: Annotated[str, typer.Option("--format", help="torchscript, or onnx (TorchScript plus ONNX graphs checked "
                                                      "with onnxruntime).")] = "torchscript",
    parity_rows: Annotated[int, typer.Option(help="Held-out rows the exported model is checked on.")] = 2048,
    as_json: AlwaysJsonOpt = False,
) -> None:
    """Export a trained run as a self-contained bundle (TorchScript, optionally ONNX) with a checksummed manifest."""
    from recforge.recipes.export import export_run

    if fmt not in ("torchscript", "onnx"):
        fail(ValueError(f"--format must be torchscript or onnx, got {fmt!r}"))
    formats = ("torchscript", "onnx") if fmt == "onnx" else ("torchscript",)
    location = guarded(export_run, run, out_uri, formats=formats, parity_rows=parity_rows)
    manifest = guarded(_read_bundle_manifest, location)
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
