"""`recforge simulate --scenario ab` end to end: real server, real A/B analysis, ground-truth prediction."""

from __future__ import annotations

from pathlib import Path

import pytest
from _sim_cli import simulate

pytestmark = pytest.mark.slow


def test_the_ab_report_picks_the_strong_ranker_and_agrees_with_the_ground_truth(tmp_path):
    result, _ = simulate(tmp_path, "ab")
    assert {"winner", "p_value", "measured_lift", "expected_lift", "ci"} <= set(result)
    assert result["winner"] == "strong"
    assert result["p_value"] < 0.05
    low, high = result["ci"]
    assert low <= result["measured_lift"] <= high
    assert low <= result["expected_lift"] <= high and result["expected_in_ci"] is True
    assert result["expected_lift"] > 0
    elow, ehigh = result["expected_lift_ci"]
    assert elow < result["expected_lift"] < ehigh and elow > 0  # the prediction itself is sure strong is better
    arms = result["arms"]
    assert arms["strong"]["expected_ctr"] > arms["weak"]["expected_ctr"]
    assert arms["weak"]["ranker_version"] != arms["strong"]["ranker_version"]
    # Every request was answered and logged: 10 impressions per request reached the exported log.
    assert result["impressions_exported"] == 10 * result["requests"]
    assert arms["weak"]["impressions"] + arms["strong"]["impressions"] == result["impressions_exported"]
    assert not result["srm"]["flagged"]
    assert Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_used_workdir_is_refused_with_the_fix(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "registry").mkdir()
    with pytest.raises(AssertionError, match="is not empty"):
        simulate(tmp_path, "ab")
