"""Multi-process training on CPU (gloo) through the real launcher: `recforge train --nproc-per-node 2`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _cli import SMALL_WORLD, _recforge, run

from recforge.train.checkpoint import read_checkpoint

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")]

# 2 ranks x 256 rows per step see the same rows per step as 1 rank x 512.
COMMON = [*SMALL_WORLD, "train.epochs=3", "train.patience=5", "train.log_every=5", "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ddp")
    run("data", "generate", f"workdir={work}", *SMALL_WORLD, cwd=work)
    run("data", "prepare", f"workdir={work}", *SMALL_WORLD, cwd=work)
    return work


def _valid_auc(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(r["valid_auc"] for r in records if "valid_auc" in r)


def test_two_ranks_match_one_rank(prepared, tmp_path):
    run("train", f"workdir={prepared}", *COMMON, "train.batch_size=512", f"run_dir={tmp_path / 'one'}",
        cwd=tmp_path)
    proc = run("train", "--nproc-per-node", "2", f"workdir={prepared}", *COMMON, "train.batch_size=256",
               f"run_dir={tmp_path / 'two'}", cwd=tmp_path)
    assert "2 processes (gloo)" in proc.stderr
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["finished"]
    one, two = _valid_auc(tmp_path / "one"), _valid_auc(tmp_path / "two")
    # Same rows per step, different dropout streams and summation order: close, not identical.
    assert abs(one - two) < 0.02, (one, two)
    assert two > 0.6
    # Only rank 0 writes: one summary line on stdout, one metrics record per epoch.
    assert len([line for line in proc.stdout.splitlines() if line.startswith("{")]) == 1
    epochs = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in epochs if "valid_auc" in r]) == 3


def test_two_rank_run_resumes_from_checkpoint_with_any_world_size(prepared, tmp_path):
    args = [f"workdir={prepared}", *COMMON, "train.batch_size=256", f"run_dir={tmp_path / 'run'}"]
    cut = run("train", "--nproc-per-node", "2", *args, "train.stop_after_steps=30", cwd=tmp_path, check=False)
    assert cut.returncode == 3, cut.stderr
    state = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state"]
    assert state["global_step"] == 30 and state["world_size"] == 2 and not state["finished"]
    shutil.copytree(tmp_path / "run", tmp_path / "mixed")  # the same cut, resumed below by one process
    resumed = run("train", "--resume", "--nproc-per-node", "2", *args, cwd=tmp_path)
    assert "resumed from" in resumed.stderr
    state = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state"]
    assert state["finished"] and state["epoch"] == 3
    rows = json.loads((prepared / "prepared" / "meta.json").read_text())["split"]["train"]["rows"]
    steps_per_epoch = -(-(rows // 2) // 256)
    assert state["global_step"] == 3 * steps_per_epoch
    # ... and a 2-rank checkpoint continues in a single process as well.
    args1 = [f"workdir={prepared}", *COMMON, "train.batch_size=256", f"run_dir={tmp_path / 'mixed'}"]
    single = run("train", "--resume", *args1, cwd=tmp_path)
    assert "written with 2 process(es), now 1" in single.stderr
    assert json.loads(single.stdout)["finished"]


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The worker process of `rank` among the launcher's descendants (Linux /proc)."""
    pending = [launcher]
    while pending:
        pid = pending.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
                return child
            pending.append(child)
    return None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_dead_rank_fails_the_job_quickly_and_names_it(prepared, tmp_path):
    args = [f"workdir={prepared}", *SMALL_WORLD, "train.epochs=50", "train.patience=100", "train.batch_size=128",
            "train.ddp_timeout_s=30", f"run_dir={tmp_path / 'run'}"]
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen([*_recforge(), "train", "--nproc-per-node", "2", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        victim = None
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.stat().st_size > 0:
                victim = _rank_pid(proc.pid, 1)
                if victim:
                    break
            time.sleep(0.2)
        assert victim, "rank 1 never started training"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = proc.communicate(timeout=90)
        waited = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert waited < 60, f"the job took {waited:.0f}s to notice a dead rank"
    assert "rank      : 1" in stderr or "rank: 1" in stderr, stderr[-2000:]
    assert "names the rank" in stderr


def test_torchrun_module_entry_point(prepared, tmp_path):
    """The documented form: torchrun --standalone ... -m recforge.train (free rendezvous port)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "recforge.train", f"workdir={prepared}", *SMALL_WORLD, "train.epochs=1",
           f"run_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "model.pt").is_file()
