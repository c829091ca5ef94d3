"""Disaster recovery: a run mirrored to S3 (a real SeaweedFS) survives losing its run directory and,
restored with `recforge train --resume-from`, ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _cli import SMALL_WORLD, run

from recforge import config, storage
from recforge.recipes.generate import generate
from recforge.recipes.prepare import prepare_data
from recforge.train.checkpoint import SNAPSHOT_PREFIX, restore_run

WORLD = [*SMALL_WORLD, "data.generate.events=24000", "train.epochs=2", "train.checkpoint_every=5", "train.patience=5"]


@pytest.mark.slow
def test_mirrored_run_restores_from_s3_to_identical_weights(s3_prefix: str, tmp_path: Path) -> None:
    common = [f"workdir={tmp_path}", *WORLD]
    data_cfg = config.load(None, common)  # the data is made in-process: only training goes through the CLI
    generate(data_cfg)
    prepare_data(data_cfg)
    run("train", *common, f"run_dir={tmp_path / 'full'}", cwd=tmp_path)

    mirror = f"{s3_prefix}/runs/cut"
    cut = run("train", "--mirror-to", mirror, *common, f"run_dir={tmp_path / 'cut'}", "train.stop_after_steps=13",
              cwd=tmp_path, check=False)
    assert cut.returncode == 3, cut.stderr
    snapshots = [n for n in storage.list_dir(mirror) if n.startswith(SNAPSHOT_PREFIX)]
    assert len(snapshots) == 2 and snapshots[-1].startswith(f"{SNAPSHOT_PREFIX}{13:012d}")  # older ones pruned
    shutil.rmtree(tmp_path / "cut")  # the machine is gone

    resumed = run("train", "--resume-from", mirror, *common, f"run_dir={tmp_path / 'cut'}", cwd=tmp_path)
    assert "restored" in resumed.stderr and json.loads(resumed.stdout.splitlines()[-1])["finished"]
    full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    restored = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert full.keys() == restored.keys()
    assert all(torch.equal(full[k], restored[k]) for k in full)
    # The resumed run went on mirroring to the same place; its final snapshot is the finished state.
    assert sorted(n for n in storage.list_dir(mirror) if n.startswith(SNAPSHOT_PREFIX))[-1].endswith("-1")
    # Restoring never overwrites a live run, and a URI without snapshots says what is wrong.
    with pytest.raises(FileExistsError, match="already holds a checkpoint; continue it with --resume"):
        restore_run(mirror, tmp_path / "cut")
    with pytest.raises(FileNotFoundError, match="no committed checkpoint snapshot"):
        restore_run(f"{s3_prefix}/runs/none", tmp_path / "other")
