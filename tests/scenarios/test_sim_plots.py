"""The scenario plots draw from a result dict and write one complete PNG (png_figure closes and writes it)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from recforge.experiments.plot import png_figure
from recforge.scenarios.ab import plot_ab
from recforge.scenarios.loop import plot_loop

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _day(day: int, decision: str, canary: int | None) -> dict:
    return {"day": day, "gate": {"decision": decision}, "injected_weak": decision != "pass", "production": 1,
            "canary": canary, "ctr_truth": 0.05 + 0.001 * day}


def test_loop_and_ab_plots_write_pngs_and_leave_no_figure_open(tmp_path: Path):
    days = [_day(0, "pass", 2), _day(1, "refuse", None)]
    loop = {"days": days, "ctr_per_day": [0.05, 0.051], "ctr_initial_model_per_day": [0.05, 0.05],
            "ctr_measured_per_day": [0.049, 0.052]}
    arms = {"strong": {"ctr": 0.06, "ctr_ci": [0.055, 0.065], "expected_ctr": 0.061},
            "weak": {"ctr": 0.05, "ctr_ci": [0.045, 0.055], "expected_ctr": 0.049}}
    ab = {"arms": arms, "ci": [0.1, 0.3], "measured_lift": 0.2, "expected_lift": 0.24, "expected_lift_ci": [0.2, 0.28],
          "winner": "strong", "p_value": 0.001}
    for path in (plot_loop(loop, tmp_path / "loop.png"), plot_ab(ab, tmp_path / "ab.png")):
        assert path.read_bytes().startswith(PNG_MAGIC)
    assert plt.get_fignums() == []


def test_a_failing_drawing_writes_nothing_and_closes_its_figure(tmp_path: Path):
    with pytest.raises(KeyError), png_figure(tmp_path / "x.png") as (_, ax):
        ax.plot([0, 1], [0, 1])
        raise KeyError("a result without this key")
    assert not (tmp_path / "x.png").exists() and plt.get_fignums() == []
