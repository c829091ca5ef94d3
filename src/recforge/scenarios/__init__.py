"""`recforge simulate`: end-to-end scenarios in which the synthetic world's users play against the real server.

An entry point like the pipeline: it composes the library (data, training, registry), the server
process, the pipeline CLI and the A/B analysis, and nothing in the library imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from recforge.scenarios.harness import Log
from recforge.scenarios.settings import SimulateConfig, load_simulate

SCENARIOS = ("ab", "loop")


def run_scenario(name: str, cfg: SimulateConfig, log: Log = print) -> dict[str, Any]:
    """Run scenario `name` (ab or loop) and return its figures as one JSON-ready dict."""
    runner = _runner(name)
    return runner(cfg, log)


def _runner(name: str) -> Callable[[SimulateConfig, Log], dict[str, Any]]:
    if name == "ab":
        from recforge.scenarios.ab import run_ab

        return run_ab
    if name == "loop":
        from recforge.scenarios.loop import run_loop

        return run_loop
    raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")


def plot_scenario(result: dict[str, Any], path: Path) -> Path:
    """The scenario's PNG (matplotlib Agg), written atomically."""
    if result["scenario"] == "ab":
        from recforge.scenarios.ab import plot_ab

        return plot_ab(result, path)
    from recforge.scenarios.loop import plot_loop

    return plot_loop(result, path)


__all__ = ["SCENARIOS", "SimulateConfig", "load_simulate", "plot_scenario", "run_scenario"]
