"""How the commands' results look to a person: rich tables and summary lines, nothing else.

Kept apart from the commands so a command reads as "load, run, print" and the formatting of one
result (a validation report, a metrics table, an A/B readout) lives in one place. Nothing here
computes a result; `--json` prints the same result unformatted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from recforge.cli.common import err, log, out

GIB = 1024**3


def fmt_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f}%"


def fmt_lift(value: float | None, ci: list[float | None], pct: bool) -> str:
    """Point estimate over its CI, stacked so the lift table fits an 80-column terminal."""
    if value is None or ci[0] is None or ci[1] is None:
        return "-"
    if pct:
        return f"{fmt_pct(value)}\n[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]%"
    return f"{value:+.3g}\n[{ci[0]:+.3g}, {ci[1]:+.3g}]"


def print_validation(result, files) -> None:  # noqa: ANN001
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
        log(f"{name}: {path}")


def metrics_table(results: dict[str, dict[str, float]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("scorer")
    for name in ("AUC", "GAUC", "logloss"):
        table.add_column(name, justify="right")
    for scorer, metrics in results.items():
        table.add_row(scorer, f"{metrics['auc']:.4f}", f"{metrics['gauc']:.4f}", f"{metrics['logloss']:.4f}")
    return table


def retrieval_table(results: dict[str, dict[str, float]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("scorer")
    columns = [k for k in next(iter(results.values()))
               if "@" in k and not k.startswith(("hitrate", "mrr")) and not k.endswith("_se")]
    for name in columns:
        table.add_column(name, justify="right")
    for scorer, metrics in results.items():
        table.add_row(scorer, *[f"{metrics[c]:.4f}" + (f" ± {metrics[c + '_se']:.4f}" if c + "_se" in metrics else "")
                                for c in columns])
    return table


def print_recommendations(results: list) -> None:
    """One table per user: rank, item and both stages' scores."""
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


def print_quickstart(results: dict, info: Any, trained: Any, workdir: Path, seconds: float) -> None:  # noqa: ANN401
    """The model-vs-popularity table, the lifts, and where each artifact of the quickstart went."""
    out.print(metrics_table(results, "test split: model vs popularity"))
    lift = results["model"]["auc"] - results["popularity"]["auc"]
    out.print(f"AUC lift over popularity: {lift:+.4f}   GAUC lift: "
              f"{results['model']['gauc'] - results['popularity']['gauc']:+.4f}")
    out.print(f"raw log:   {workdir / 'raw'}\nprepared:  {info.path}\nrun:       {trained.run_dir} "
              f"(model.pt, metrics.jsonl, config.yaml, evaluation_test.json)\n"
              f"done in {seconds:.0f}s")


def print_plan(result: Any, parts: dict[str, int], cfg: Any, world_size: int) -> None:  # noqa: ANN401
    """Memory per device by part (and the five largest tables), the verdict, and the advice."""
    table = Table(title=f"memory per device ({cfg.model.name}, dim {cfg.model.embedding_dim}, "
                        f"{cfg.train.optimizer}, batch {cfg.train.batch_size}, {world_size} rank(s))")
    table.add_column("what")
    table.add_column("GiB", justify="right")
    for name, size in parts.items():
        table.add_row(name, f"{size / GIB:.3f}")
    for t in result.tables[:5]:
        table.add_row(f"  table {t.field} ({t.rows:,} rows)", f"{t.bytes / GIB:.3f}")
    table.add_row("[bold]total", f"[bold]{result.total_bytes / GIB:.3f}")
    out.print(table)
    verdict = {True: "fits", False: "does NOT fit", None: "unknown fit"}[result.fits]
    out.print(f"{verdict} on {result.device_name}"
              + (f" ({result.device_bytes / GIB:.1f} GiB)" if result.device_bytes else ""))
    for line in result.advice:
        out.print(f"  - {line}")


def print_versions(model: str, registry: str, versions: list) -> None:
    table = Table(title=f"{model} in {registry}")
    for column in ("version", "aliases", "created", "kind", "metrics", "note"):
        table.add_column(column)
    for v in versions:
        shown = ", ".join(f"{k}={val:.4f}" for k, val in list(v.metrics.items())[:4])
        table.add_row(str(v.number), ", ".join(v.aliases), v.created, v.kind, shown, v.note)
    out.print(table)


def print_version(model: str, info: dict) -> None:
    table = Table(title=f"{model} version {info['number']}")
    table.add_column("field")
    table.add_column("value")
    for key in ("path", "aliases", "created", "user", "note", "kind", "bundle_model_name", "files"):
        value = info[key]
        table.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
    for key, value in info["metrics"].items():
        table.add_row(f"metric {key}", fmt_metric(value))
    out.print(table)


def print_diff(model: str, result: dict) -> None:
    va, vb = result["a"]["version"], result["b"]["version"]
    table = Table(title=f"{model}: version {va} vs {vb}")
    for column in ("", "key", f"v{va}", f"v{vb}"):
        table.add_column(column)
    for key, (x, y) in result["metrics"].items():
        delta = "" if x is None or y is None else f" ({y - x:+.4f})"
        table.add_row("metric", key, fmt_metric(x), fmt_metric(y) + delta)
    for key, (x, y) in result["config"].items():
        table.add_row("config", key, json.dumps(x), json.dumps(y))
    out.print(table)


def print_history(model: str, records: list[dict]) -> None:
    table = Table(title=f"{model}: alias history")
    for column in ("time", "action", "alias", "from", "to", "user", "reason"):
        table.add_column(column)
    for r in records:
        table.add_row(str(r.get("time", "")), str(r.get("action", "")), str(r.get("alias", "")),
                      "-" if r.get("from") is None else str(r["from"]), "-" if r.get("to") is None else str(r["to"]),
                      str(r.get("user", "")), str(r.get("reason", "")))
    out.print(table)


_AB_METRIC_NAMES = {"ctr": "CTR", "clicks_per_user": "clicks/user", "impressions_per_user": "imps/user"}


def print_ab(result: dict) -> None:
    srm = result["srm"]
    if srm["flagged"]:
        out.print(f"[bold white on red] SAMPLE RATIO MISMATCH [/] users {srm['observed']} vs expected "
                  f"{ {k: round(v) for k, v in srm['expected'].items()} } (chi2 {srm['chi2']:.1f}, "
                  f"p {srm['p_value']:.2g}): assignment or logging is broken; do not trust the lifts below")
    ci_name = f"{1 - result['alpha']:.0%} CI"
    out.print(_ab_variants_table(result, srm, ci_name))
    out.print(_ab_lifts_table(result, ci_name))
    cuped = result["cuped"]
    if cuped["enabled"]:
        reductions = ", ".join(f"{m} {100 * info['variance_reduction']:.1f}%" for m, info in cuped["metrics"].items())
        out.print(f"CUPED ({', '.join(cuped['covariates'])}; {cuped['pre_period']}; "
                  f"{cuped['users_with_pre_period']:,} users with history): variance reduction {reductions}")
    out.print(f"C/T: control/treatment value. MDE rel: smallest relative lift detected at alpha {result['alpha']} "
              f"with {result['power']:.0%} power for this traffic.\nmethod: {result['method']}")
    for warning in result["warnings"]:
        out.print(f"[bold red]warning:[/] {warning}", highlight=False)


def _ab_variants_table(result: dict, srm: dict, ci_name: str) -> Table:
    variants = Table(title=f"experiment {result['experiment']}, control {result['control']!r}: SRM chi2 "
                           f"{srm['chi2']:.2f}, p {srm['p_value']:.3g} ({'FLAGGED' if srm['flagged'] else 'ok'})")
    for column in ("variant", "users", "impressions", "clicks", "CTR", f"CTR {ci_name}"):
        variants.add_column(column, justify="left" if column == "variant" else "right")
    for name, v in result["variants"].items():
        variants.add_row(name, f"{v['users']:,}", f"{v['impressions']:,}", f"{v['clicks']:,}", f"{v['ctr']:.4f}",
                         f"[{v['ctr_ci'][0]:.4f}, {v['ctr_ci'][1]:.4f}]")
    return variants


def _ab_lifts_table(result: dict, ci_name: str) -> Table:
    lifts = Table(title="lifts vs control" + (" (CUPED-adjusted)" if result["cuped"]["enabled"] else "")
                  + f"; Holm across {len(result['comparisons'])} comparisons")
    for column in ("metric", "variant", "C\nT", f"abs lift\n{ci_name}", f"rel lift\n{ci_name}", "p\nHolm p", "sig",
                   "MDE\nrel"):
        lifts.add_column(column, justify="left" if column in ("metric", "variant") else "right")
    for c in result["comparisons"]:
        mde = result["mde"][c["metric"]][c["treatment"]]
        lifts.add_row(_AB_METRIC_NAMES.get(c["metric"], c["metric"]), c["treatment"],
                      f"{c['control_value']:.4g}\n{c['treatment_value']:.4g}",
                      fmt_lift(c["abs_lift"], c["abs_ci"], False), fmt_lift(c["rel_lift"], c["rel_ci"], True),
                      f"{c['p_value']:.3g}\n{c['p_holm']:.3g}", "[bold green]yes" if c["significant"] else "no",
                      "-" if mde["rel"] is None else f"{100 * mde['rel']:.2f}%")
    return lifts


def print_study(result: Any) -> None:  # noqa: ANN401 - recipes.tune.StudyResult
    """Every trial with its values and validation metric, then the best and what it gained on the config."""
    names = sorted({key for row in result.trials for key in row.params})
    table = Table(title=f"recforge tune: valid {result.metric} ({result.direction})")
    for column in ("trial", "state", f"valid {result.metric}", "epochs", *names):
        table.add_column(column, justify="right" if column not in ("state",) else "left")
    for row in result.trials:
        marks = " *" if result.best is not None and row.number == result.best.number else ""
        marks += " (config)" if result.baseline is not None and row.number == result.baseline.number else ""
        table.add_row(f"{row.number}{marks}", row.state, fmt_metric(row.value), str(row.epochs),
                      *[_param_text(row.params.get(name)) for name in names])
    out.print(table)
    if result.best is None:
        log("no trial completed")
        return
    line = f"best: trial {result.best.number}, valid {result.metric} {result.best.value:.4f}"
    if result.baseline is not None and result.baseline.value is not None:
        line += f" (the config as given: {result.baseline.value:.4f}, {result.best.value - result.baseline.value:+.4f})"
    log(line)
    log(f"best config: {result.best_config} (train it, then evaluate once on test)")


def _param_text(value: Any) -> str:  # noqa: ANN401
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
