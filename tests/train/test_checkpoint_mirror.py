"""Checkpoint mirroring: each snapshot is the run as it was at one checkpoint, complete or absent;
the newest committed one is what a restore takes, and older ones are pruned."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from recforge import storage
from recforge.train.checkpoint import (
    RunState,
    latest_snapshot,
    load_checkpoint,
    lock_run_dir,
    mirror_run,
    restore_run,
    save_checkpoint,
    snapshot_name,
)


def _run_dir(root: Path, step: int) -> Path:
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    (root / "checkpoints" / "last.pt").write_bytes(f"ckpt {step}".encode())
    (root / "model.pt").write_bytes(f"best {step}".encode())
    (root / "config.yaml").write_text("seed: 1\n")
    (root / "metrics.jsonl").write_text(f'{{"step": {step}}}\n')
    (root / "train_summary.json").write_text("{}")  # not needed to resume: not mirrored
    return root


def test_snapshots_sort_in_training_order() -> None:
    mid = snapshot_name(RunState(epoch=0, global_step=20))
    end = snapshot_name(RunState(epoch=1, global_step=20))
    later = snapshot_name(RunState(epoch=1, global_step=100, finished=True))
    assert sorted([later, end, mid]) == [mid, end, later]


def test_mirror_prunes_and_restore_takes_the_newest_committed(tmp_path: Path) -> None:
    mirror = str(tmp_path / "mirror")
    run = tmp_path / "run"
    for step in (5, 10, 15):
        _run_dir(run, step)
        mirror_run(run, mirror, RunState(epoch=0, global_step=step))
    names = storage.list_dir(mirror)
    assert names == [snapshot_name(RunState(global_step=s)) for s in (10, 15)]
    assert not [p for p in run.iterdir() if p.name.startswith(".mirror-")]
    # A newer snapshot whose upload never committed is skipped.
    (tmp_path / "mirror" / snapshot_name(RunState(global_step=20)) / "checkpoints").mkdir(parents=True)
    assert latest_snapshot(mirror) == str(tmp_path / "mirror" / names[-1])

    restored = tmp_path / "restored"
    restore_run(mirror, restored)
    assert (restored / "checkpoints" / "last.pt").read_bytes() == b"ckpt 15"
    assert (restored / "model.pt").read_bytes() == b"best 15"
    assert (restored / "metrics.jsonl").read_text() == '{"step": 15}\n'
    assert not (restored / "train_summary.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        restore_run(mirror, restored)


def test_load_checkpoint_refuses_corrupt_file_naming_it(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    for name, data in (("empty.pt", b""), ("junk.pt", b"\x80\x04garbage")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=name):
            load_checkpoint(path, model, [], None, "digest")


def test_a_flipped_byte_in_a_weight_is_refused_naming_the_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "last.pt"
    save_checkpoint(path, model, [optimizer], None, RunState(), "digest")
    load_checkpoint(path, torch.nn.Linear(64, 64), [torch.optim.SGD(model.parameters(), lr=0.1)], None, "digest")
    raw = bytearray(path.read_bytes())
    weight = model.weight.detach().numpy().tobytes()
    at = bytes(raw).index(weight[:32]) + 100  # inside the stored weight tensor, not the zip metadata
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"last\.pt: checkpoint is damaged"):
        load_checkpoint(path, torch.nn.Linear(64, 64), [torch.optim.SGD(model.parameters(), lr=0.1)], None, "digest")


def test_a_second_trainer_on_a_locked_run_dir_fails_at_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    held = rf"{run_dir} is in use by another trainer \(pid {os.getpid()}\)"
    with lock_run_dir(run_dir), pytest.raises(RuntimeError, match=held), lock_run_dir(run_dir):
        pass
    with lock_run_dir(run_dir):  # released when the holder ends
        pass
