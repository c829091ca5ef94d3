"""`recforge tune` through the real CLI: trials train for real, bad ones are pruned on their per-epoch
validation metric, the best config is a file `recforge train` takes, and a stopped search resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from _cli import SMALL_WORLD, _recforge, run

from recforge import config

pytestmark = pytest.mark.slow

SPACE = """
params:
  train.lr: {type: float, low: 1.0e-6, high: 1.0e-3, log: true}
  model.embedding_dim: {type: int, low: 8, high: 16, step: 8}
pruner: {kind: median, startup_trials: 1}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("tune")
    (root / "space.yaml").write_text(SPACE)
    args = [f"workdir={root / 'w'}", *SMALL_WORLD, "data.generate.events=30000", "train.epochs=3"]
    run("data", "generate", *args, cwd=root)
    run("data", "prepare", *args, cwd=root)
    return root, args


def _tune(root: Path, args: list[str], study: str, trials: int) -> dict:
    proc = run("tune", "--space", str(root / "space.yaml"), "--study-dir", str(root / study), "--n-trials",
               str(trials), "--json", *args, cwd=root, timeout=600)
    return json.loads(proc.stdout)


def test_a_search_prunes_bad_trials_and_writes_a_config_that_trains(world):
    root, args = world
    result = _tune(root, args, "study", 4)
    trials = result["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3]
    assert {t["state"] for t in trials} <= {"complete", "pruned"} and "pruned" in {t["state"] for t in trials}
    # trial 0 is the config as given; the others are drawn from the space
    assert trials[0]["params"] == {"train.lr": 1e-3, "model.embedding_dim": 16} and result["baseline"]["number"] == 0
    assert all(1e-6 <= t["params"]["train.lr"] <= 1e-3 and t["params"]["model.embedding_dim"] in (8, 16)
               for t in trials)
    pruned = [t for t in trials if t["state"] == "pruned"]
    assert all(t["epochs"] < 3 or t["value"] is not None for t in pruned)
    complete = [t for t in trials if t["state"] == "complete"]
    assert result["best"]["value"] == max(t["value"] for t in complete)
    # every trial's value is the validation AUC its own run recorded
    summary = json.loads((Path(result["best"]["run_dir"]) / "train_summary.json").read_text())
    assert summary["best_valid"] == pytest.approx(result["best"]["value"])

    best = config.load(Path(result["best_config"]))
    assert best.train.lr == result["best"]["params"]["train.lr"]
    assert best.model.embedding_dim == result["best"]["params"]["model.embedding_dim"]
    run("train", "-c", result["best_config"], cwd=root)
    assert (best.resolved_run_dir / "model.pt").is_file()

    again = _tune(root, args, "study", 5)  # resumed: one more trial, the first four as they were
    assert [t["number"] for t in again["trials"]] == [0, 1, 2, 3, 4]
    assert [(t["state"], t["value"]) for t in again["trials"][:4]] == [(t["state"], t["value"]) for t in trials]


def test_a_search_stopped_mid_trial_runs_that_trial_again(world):
    root, args = world
    command = [*_recforge(), "tune", "--space", str(root / "space.yaml"), "--study-dir", str(root / "cut"),
               "--n-trials", "3", *args, "train.checkpoint_every=5", "train.batch_size=128"]
    proc = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (root / "cut" / "trials" / "0001" / "checkpoints").exists() and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "run the same command again to resume" in stderr

    result = _tune(root, args, "cut", 3)
    states = [(t["number"], t["state"]) for t in result["trials"]]
    assert states[:2] == [(0, "complete"), (1, "fail")]
    assert result["trials"][2]["params"] == result["trials"][1]["params"]  # the cut trial, again
    finished = [t for t in result["trials"] if t["state"] in ("complete", "pruned")]
    assert len(finished) == 3
    best = yaml.safe_load(Path(result["best_config"]).read_text())
    assert best["train"]["lr"] == result["best"]["params"]["train.lr"]
