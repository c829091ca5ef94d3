"""The A/B report as one PNG: per-variant CTR with CIs, and each lift's CI against zero.

Drawn with matplotlib's Agg backend (no display needed on servers and in CI) and written
atomically, so a dashboard polling the file never reads half a PNG.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from recforge import storage


@contextmanager
def png_figure(path: str | Path, *grid: int, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """`plt.subplots(*grid, **subplots)` for the body to draw on, written to `path` as one PNG when it ends.

    The Agg backend needs no display (servers, CI); the figure is closed even when drawing fails (pyplot
    keeps every open figure alive otherwise); the file is written atomically, so a dashboard polling it
    never reads half a PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*grid, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    storage.write_bytes(path, buffer.getvalue())


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Left: CTR per variant with its CI. Right: relative lift (%) of every comparison with its CI."""
    names = list(report["variants"])
    ctr = [report["variants"][n]["ctr"] for n in names]
    low = [c - report["variants"][n]["ctr_ci"][0] for n, c in zip(names, ctr, strict=True)]
    high = [report["variants"][n]["ctr_ci"][1] - c for n, c in zip(names, ctr, strict=True)]
    comparisons = [c for c in report["comparisons"] if c["rel_lift"] is not None and c["rel_ci"][0] is not None]

    with png_figure(path, 1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.4]}) as (fig, (left, right)):
        left.errorbar(range(len(names)), ctr, yerr=[low, high], fmt="o", capsize=6, color="tab:blue")
        left.set_xticks(range(len(names)), names)
        left.set_ylabel("CTR")
        left.set_title(f"{report['experiment']}: CTR per variant ({1 - report['alpha']:.0%} CI)")
        left.grid(axis="y", alpha=0.3)

        labels = [f"{c['metric']}\n{c['treatment']} vs {c['control']}" for c in comparisons]
        lifts = [100 * c["rel_lift"] for c in comparisons]
        err = [[100 * (c["rel_lift"] - c["rel_ci"][0]) for c in comparisons],
               [100 * (c["rel_ci"][1] - c["rel_lift"]) for c in comparisons]]
        colors = ["tab:green" if c["significant"] else "tab:gray" for c in comparisons]
        for i in range(len(comparisons)):
            right.errorbar(lifts[i], i, xerr=[[err[0][i]], [err[1][i]]], fmt="o", capsize=5, color=colors[i])
        right.axvline(0, color="black", linewidth=0.8)
        right.set_yticks(range(len(comparisons)), labels, fontsize=8)
        right.invert_yaxis()
        right.set_xlabel("relative lift, % (green: significant after Holm)")
        right.set_title("lift with CI" + (" (CUPED)" if report["cuped"]["enabled"] else ""))
        right.grid(axis="x", alpha=0.3)
        if report["srm"]["flagged"]:
            fig.suptitle("SAMPLE RATIO MISMATCH: do not trust these lifts", color="red", fontweight="bold")
    return Path(path)
