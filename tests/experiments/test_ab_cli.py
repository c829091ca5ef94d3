"""End-to-end: `recforge ab report` as a user runs it, on a small parquet log directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _ab_synth import write_log

pytestmark = pytest.mark.slow

START = 1_700_000_000


def _ab(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("recforge")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "recforge.cli"]
    env = {**os.environ, "COLUMNS": "120", "RECFORGE_DEBUG": ""}
    return subprocess.run([*cmd, "ab", "report", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.fixture(scope="module")
def events(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("abcli") / "events"
    write_log(root, seed=2, users_per_variant={"control": 400, "treatment": 400}, lift=0.1, start=START)
    return root


def test_table_output(events, tmp_path):
    proc = _ab("--events", str(events), "--experiment", "ranker_ab", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for text in ("experiment ranker_ab", "SRM chi2", "(ok)", "control", "treatment", "CTR", "clicks/user",
                 "imps/user", "Holm across 3 comparisons", "MDE", "delta method"):
        assert text in proc.stdout, text
    assert "SAMPLE RATIO MISMATCH" not in proc.stdout


def test_json_and_plot_with_cuped(events, tmp_path):
    png = tmp_path / "out" / "ab.png"
    proc = _ab("--events", str(events), "--experiment", "ranker_ab", "--json", "--plot", str(png), "--cuped",
               "--pre-period-end", str(START + 86400), "--alpha", "0.1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert set(report) >= {"variants", "comparisons", "srm", "cuped", "mde"}
    assert set(report["variants"]) == {"control", "treatment"}
    assert set(report["srm"]) >= {"chi2", "p_value", "flagged"}
    assert report["alpha"] == 0.1 and report["cuped"]["enabled"] is True
    assert report["cuped"]["metrics"]["ctr"]["variance_reduction"] > 0
    for c in report["comparisons"]:
        assert set(c) >= {"metric", "treatment", "control", "abs_lift", "abs_ci", "rel_lift", "rel_ci", "p_value",
                          "p_holm", "significant"}
    assert set(report["mde"]["ctr"]["treatment"]) == {"abs", "rel"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_srm_is_shown_prominently(tmp_path):
    root = tmp_path / "srm"
    write_log(root, seed=3, users_per_variant={"control": 1000, "treatment": 820}, start=START)
    proc = _ab("--events", str(root), "--experiment", "ranker_ab", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "SAMPLE RATIO MISMATCH" in proc.stdout and "FLAGGED" in proc.stdout


def _one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_clear_one_line_errors(events, tmp_path):
    _one_line_error(_ab("--events", str(tmp_path / "nowhere"), "--experiment", "ranker_ab", cwd=tmp_path),
                    "nowhere", "does not exist")
    _one_line_error(_ab("--events", str(events), "--experiment", "ranker_abc", cwd=tmp_path),
                    "'ranker_abc' not found", "experiments found: other_exp, ranker_ab")
    _one_line_error(_ab("--events", str(events), "--experiment", "ranker_ab", "--control", "baseline", cwd=tmp_path),
                    "'baseline' not found", "variants found: control, treatment")
    thin = tmp_path / "thin.parquet"
    pq.write_table(pa.table({"user_id": [1, 2], "timestamp": [START, START]}), thin)
    _one_line_error(_ab("--events", str(thin), "--experiment", "ranker_ab", cwd=tmp_path),
                    "thin.parquet", "label, assignments")
