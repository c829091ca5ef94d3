"""`recforge registry ...`: versioned models; publish bundles, move aliases, roll back, inspect."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from recforge.cli.common import AlwaysJsonOpt, JsonOpt, fail, guarded, log
from recforge.cli.render import print_diff, print_history, print_version, print_versions

app = typer.Typer(no_args_is_help=True, help="Versioned models: publish bundles, move aliases, roll back.")
RegistryOpt = Annotated[str, typer.Option("--registry", "-r", envvar="RECFORGE_REGISTRY",
                                          help="Registry root: a directory or s3://bucket/prefix.")]
ModelArg = Annotated[str, typer.Argument(help="Model name in the registry.")]
AliasOpt = Annotated[str, typer.Option("--alias", help="Alias to move.")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why; recorded in the history.")]


@app.command("list")
def registry_list(model: ModelArg, registry: RegistryOpt, as_json: JsonOpt = False) -> None:
    """Committed versions of a model, oldest first, with their aliases and metrics."""
    from recforge import registry as reg

    versions = guarded(reg.list_versions, registry, model)
    if as_json:
        print(json.dumps([v.to_dict() for v in versions]))
        return
    if not versions:
        fail(ValueError(f"model {model!r} has no published versions in {registry}"))
    print_versions(model, registry, versions)


@app.command("show")
def registry_show(model: ModelArg, registry: RegistryOpt,
                  ref: Annotated[str, typer.Argument(help="Version number, alias or 'latest'.")] = "latest",
                  as_json: JsonOpt = False) -> None:
    """One version in detail: where it lives, when and why it was published, its metrics."""
    from recforge import registry as reg

    info = guarded(reg.show, registry, model, ref)
    if as_json:
        print(json.dumps(info))
        return
    print_version(model, info)


@app.command("publish")
def registry_publish(model: ModelArg,
                     bundle_dir: Annotated[str, typer.Argument(help="Bundle directory or s3:// URI (from "
                                                               "`recforge export`).")],
                     registry: RegistryOpt,
                     note: Annotated[str, typer.Option("--note", help="Free text kept with the version.")] = "",
                     as_json: AlwaysJsonOpt = False,
                     ) -> None:
    """Verify a bundle and store it as the model's next version."""
    from recforge import registry as reg

    number = guarded(reg.publish, registry, bundle_dir, model, note)
    log(f"published {bundle_dir} as {model} version {number}")
    print(json.dumps({"model": model, "version": number, "path": guarded(reg.location, registry, model, number)}))


@app.command("promote")
def registry_promote(model: ModelArg, version: Annotated[str, typer.Argument(help="Version number or alias.")],
                     registry: RegistryOpt, alias: AliasOpt = "production", reason: ReasonOpt = "",
                     as_json: AlwaysJsonOpt = False) -> None:
    """Point an alias (default production) at a verified version."""
    from recforge import registry as reg

    record = guarded(reg.promote, registry, model, version, alias, reason)
    log(f"{model}: {alias} {record['from']} -> {record['to']}")
    print(json.dumps(record))


@app.command("rollback")
def registry_rollback(model: ModelArg, registry: RegistryOpt, alias: AliasOpt = "production",
                      reason: ReasonOpt = "", as_json: AlwaysJsonOpt = False) -> None:
    """Move an alias back to the version it pointed at before its last promotion."""
    from recforge import registry as reg

    record = guarded(reg.rollback, registry, model, alias, reason)
    log(f"{model}: {alias} rolled back {record['from']} -> {record['to']}")
    print(json.dumps(record))


@app.command("diff")
def registry_diff(model: ModelArg, a: Annotated[str, typer.Argument(help="Version, alias or 'latest'.")],
                  b: Annotated[str, typer.Argument(help="Version, alias or 'latest'.")], registry: RegistryOpt,
                  as_json: JsonOpt = False) -> None:
    """Two versions side by side: every metric, and the config keys that differ."""
    from recforge import registry as reg

    result = guarded(reg.diff, registry, model, a, b)
    if as_json:
        print(json.dumps(result))
        return
    print_diff(model, result)


@app.command("history")
def registry_history(model: ModelArg, registry: RegistryOpt, as_json: JsonOpt = False) -> None:
    """Every alias move of a model, oldest first: when, which alias, from, to, who and why."""
    from recforge import registry as reg

    records = guarded(reg.history, registry, model)
    if as_json:
        print(json.dumps(records))
        return
    print_history(model, records)


@app.command("gc")
def registry_gc(model: ModelArg, registry: RegistryOpt,
                older_than: Annotated[float, typer.Option("--older-than", help="Seconds since the slot was "
                                                          "claimed.")] = 3600.0,
                as_json: AlwaysJsonOpt = False) -> None:
    """Remove version slots whose upload never committed (a crashed publisher's); they are already hidden."""
    from recforge import registry as reg

    removed = guarded(reg.gc, registry, model, older_than)
    log(f"{model}: removed {len(removed)} uncommitted slot(s)")
    print(json.dumps({"model": model, "removed": removed}))
