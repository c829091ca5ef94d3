"""End-to-end: the real `recforge` executable in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from _cli import ML_SCHEMA, MOVIELENS, SMALL_WORLD, _recforge, run

from recforge.train.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("qs")
    proc = run("quickstart", f"workdir={work}", *SMALL_WORLD, "train.epochs=3", cwd=work)
    (work / "quickstart.out").write_text(proc.stdout + proc.stderr)
    return work


def test_quickstart_trains_a_model_that_beats_popularity(quickstart_dir):
    output = (quickstart_dir / "quickstart.out").read_text()
    assert "model vs popularity" in output and "popularity" in output
    assert "device: cpu" in output  # the trainer says which device and why
    for path in ("raw/events", "raw/world", "prepared/meta.json", "run/model.pt", "run/config.yaml",
                 "run/metrics.jsonl", "run/env.json", "run/evaluation_test.json", "validation/validation_report.json"):
        assert (quickstart_dir / path).exists(), path
    results = json.loads(run("evaluate", "--json", f"workdir={quickstart_dir}", cwd=quickstart_dir).stdout)
    assert set(results) == {"model", "popularity"}
    assert results["model"]["auc"] > results["popularity"]["auc"] + 0.03
    assert results["model"]["gauc"] > results["popularity"]["gauc"] + 0.03
    report = json.loads((quickstart_dir / "validation" / "validation_report.json").read_text())
    assert report["rows_read"] == report["rows_kept"] + report["rows_quarantined"] == 60000


def test_generate_is_deterministic(tmp_path):
    for name in ("a", "b"):
        run("data", "generate", f"workdir={tmp_path / name}", *SMALL_WORLD[:4], cwd=tmp_path)
    files_a = sorted((tmp_path / "a" / "raw" / "events").iterdir())
    files_b = sorted((tmp_path / "b" / "raw" / "events").iterdir())
    assert [f.name for f in files_a] == [f.name for f in files_b] and len(files_a) == 10
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(files_a, files_b, strict=True))


def test_interrupted_training_resumes_to_identical_weights(quickstart_dir, tmp_path):
    common = [f"workdir={quickstart_dir}", *SMALL_WORLD, "train.epochs=2", "train.checkpoint_every=10"]
    run("train", *common, f"run_dir={tmp_path / 'full'}", cwd=tmp_path)
    cut = run("train", *common, f"run_dir={tmp_path / 'cut'}", "train.stop_after_steps=37", cwd=tmp_path,
              check=False)
    assert cut.returncode == 3, cut.stderr
    assert "continue with --resume" in cut.stderr
    # Starting the same run again without --resume must not silently overwrite it.
    again = run("train", *common, f"run_dir={tmp_path / 'cut'}", cwd=tmp_path, check=False)
    assert again.returncode == 1 and "--resume" in again.stderr
    run("train", "--resume", *common, f"run_dir={tmp_path / 'cut'}", cwd=tmp_path)
    full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_sigterm_checkpoints_and_resumes(quickstart_dir, tmp_path):
    """A killed run (SIGTERM) finishes its step, checkpoints, and resumes to the same end as a full run."""
    common = [f"workdir={quickstart_dir}", *SMALL_WORLD, "train.epochs=40", "train.patience=100",
              "train.batch_size=256", f"run_dir={tmp_path / 'run'}"]
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.Popen([*_recforge(), "train", *common], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        for _ in range(600):  # wait (at most ~60 s) until training has logged at least once
            if metrics.exists() and metrics.stat().st_size > 0:
                break
            if proc.poll() is not None:
                break
            subprocess.run(["sleep", "0.1"], check=True)
        proc.terminate()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, stderr
    assert "signal received" in stderr
    state = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state"]
    assert state["global_step"] > 0 and not state["finished"]


def test_movielens_prepare_train_evaluate(tmp_path):
    """The MovieLens reader path on a u.data-format file (tab separated, no header)."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 6000
    users = rng.integers(1, 200, n)
    items = rng.integers(1, 300, n)
    ratings = np.clip(np.round((users % 5 + items % 5) / 2 + rng.normal(0, 0.7, n)), 1, 5).astype(int)
    times = 880_000_000 + np.sort(rng.integers(0, 10_000_000, n))
    lines = [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in zip(users, items, ratings, times, strict=True)]
    (tmp_path / "u.data").write_text("\n".join(lines) + "\n")
    args = [f"workdir={tmp_path / 'w'}", f"data.source={tmp_path / 'u.data'}", *ML_SCHEMA,
            "train.batch_size=256", "train.epochs=3", "train.progress=false"]
    prepared = json.loads(run("data", "prepare", *args, cwd=tmp_path).stdout)
    assert sum(prepared["splits"].values()) == n
    run("train", *args, cwd=tmp_path)
    results = json.loads(run("evaluate", "--json", *args, cwd=tmp_path).stdout)
    assert 0.0 < results["model"]["auc"] <= 1.0 and results["popularity"]["logloss"] > 0


def test_a_split_column_and_no_validation_split_through_the_cli(tmp_path):
    """The user's own split column decides the splits; a run without valid rows must say early stopping
    cannot work instead of quietly training without it, and trains every epoch once told to."""
    import numpy as np

    rng = np.random.default_rng(1)
    n = 4000
    users, items = rng.integers(1, 150, n), rng.integers(1, 200, n)
    ratings = np.clip(np.round((users % 5 + items % 5) / 2 + rng.normal(0, 0.7, n)), 1, 5).astype(int)
    times = 880_000_000 + np.sort(rng.integers(0, 10_000_000, n))
    folds = np.where(np.arange(n) < 3200, "train", "test")
    lines = ["user_id,item_id,rating,timestamp,fold",
             *[f"{u},{i},{r},{t},{f}" for u, i, r, t, f in zip(users, items, ratings, times, folds, strict=True)]]
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    args = [f"workdir={tmp_path / 'w'}", f"data.source={tmp_path / 'log.csv'}", *ML_SCHEMA, "data.format=csv",
            "data.schema.split=fold", "data.split.method=column", "train.batch_size=256", "train.epochs=2",
            "train.progress=false"]
    prepared = json.loads(run("data", "prepare", *args, cwd=tmp_path).stdout)
    assert prepared["splits"] == {"train": 3200, "valid": 0, "test": 800}
    refused = run("train", *args, cwd=tmp_path, check=False)
    assert refused.returncode == 1 and "no validation split" in refused.stderr
    assert "train.early_stopping=false" in refused.stderr and "Traceback" not in refused.stderr
    run("train", *args, "train.early_stopping=false", cwd=tmp_path)
    results = json.loads(run("evaluate", "--json", *args, "train.early_stopping=false", cwd=tmp_path).stdout)
    assert 0.0 < results["model"]["auc"] <= 1.0
    no_test = run("evaluate", *args, "--split", "valid", cwd=tmp_path, check=False)
    assert no_test.returncode == 1 and "split 'valid'" in no_test.stderr and "has no rows" in no_test.stderr


@pytest.mark.skipif(not MOVIELENS.is_file(), reason="MovieLens ml-latest-small is not beside the checkout")
def test_real_movielens_file_validates_fully(tmp_path):
    proc = run("data", "validate", f"data.source={MOVIELENS}", *ML_SCHEMA, f"workdir={tmp_path}",
               "--out", str(tmp_path / "v"), cwd=tmp_path)
    report = json.loads(proc.stdout)
    lines = sum(1 for _ in MOVIELENS.open()) - 1
    assert report["rows_read"] == lines and report["rows_quarantined"] == 0


def test_bad_inputs_fail_with_one_line(tmp_path):
    missing = run("data", "validate", f"data.source={tmp_path / 'nope.csv'}", cwd=tmp_path, check=False)
    assert missing.returncode == 1
    assert "no such file or directory" in missing.stderr and "nope.csv" in missing.stderr
    assert "Traceback" not in missing.stderr

    (tmp_path / "events.csv").write_text("user_id,item_id,timestamp\n1,2,3\n")
    wrong = run("data", "validate", f"data.source={tmp_path / 'events.csv'}", cwd=tmp_path, check=False)
    assert wrong.returncode == 1
    assert "missing column" in wrong.stderr and "'label'" in wrong.stderr and "found columns" in wrong.stderr

    typo = run("train", "train.lr_rate=0.1", "model.widht=3", cwd=tmp_path, check=False)
    assert typo.returncode == 2
    assert "unknown config key 'train.lr_rate'" in typo.stderr and "model.widht" in typo.stderr

    untrained = run("evaluate", f"workdir={tmp_path / 'empty'}", cwd=tmp_path, check=False)
    assert untrained.returncode == 1 and "recforge train" in untrained.stderr


def test_validate_quarantines_bad_rows_through_the_cli(tmp_path):
    rows = ["user_id,item_id,timestamp,hour,device,category,position,label",
            "1,10,1700000000,3,ios,5,0,1",
            ",10,1700000001,3,ios,5,0,1",          # missing user
            "2,11,not-a-time,3,ios,5,0,0",         # bad timestamp
            "3,12,1700000002,3,ios,5,0,7",         # label out of range
            "1,10,1700000000,3,ios,5,0,1"]         # duplicate of row 1
    (tmp_path / "events.csv").write_text("\n".join(rows) + "\n")
    proc = run("data", "validate", f"data.source={tmp_path / 'events.csv'}", "--out", str(tmp_path / "v"),
               cwd=tmp_path)
    report = json.loads(proc.stdout)
    assert (report["rows_read"], report["rows_kept"], report["rows_quarantined"]) == (5, 1, 4)
    assert {k: v for k, v in report["by_reason"].items() if v} == {
        "missing_user": 1, "bad_timestamp": 1, "label_out_of_range": 1, "duplicate_event": 1}
    assert (tmp_path / "v" / "quarantine.parquet").is_file()


def test_validate_reports_malformed_rows_and_timestamp_units(tmp_path):
    rows = ["user_id,item_id,timestamp,hour,device,category,position,label",
            "1,10,1700000000,3,ios,5,0,1",
            "1,11,1700000001000,3,ios,5,0,1",      # milliseconds: converted
            "2,11,3",                              # ragged: malformed_row
            "3,12,-5,3,ios,5,0,1",                 # before 1970
            "4,12,99972403200,3,ios,5,0,1"]        # year 5138 in seconds
    (tmp_path / "events.csv").write_text("\n".join(rows) + "\n")
    proc = run("data", "validate", f"data.source={tmp_path / 'events.csv'}", "--out", str(tmp_path / "v"),
               cwd=tmp_path)
    report = json.loads(proc.stdout)
    assert (report["rows_read"], report["rows_kept"], report["rows_quarantined"]) == (5, 2, 3)
    assert {k: v for k, v in report["by_reason"].items() if v} == {"malformed_row": 1, "timestamp_out_of_range": 2}
    assert report["time_units"] == {"s": 1, "ms": 1}
    assert "malformed_row" in proc.stderr and "timestamp_out_of_range" in proc.stderr
    assert "timestamps in ms" in proc.stderr


def test_help_lists_the_commands(tmp_path):
    proc = run("--help", cwd=tmp_path)
    for verb in ("quickstart", "data", "train", "evaluate", "recommend", "plan", "doctor", "export", "registry"):
        assert verb in proc.stdout
