"""The loop mirrors each checkpoint; a run restored from the mirror alone ends with the weights of an
uninterrupted run, and a store that is down costs the mirror, never the run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_trainer import _cfg, _model, _quiet, _toy_split

from recforge.train.checkpoint import restore_run
from recforge.train.trainer import TrainOptions, train


def test_run_restored_from_its_mirror_resumes_to_identical_weights(tmp_path: Path) -> None:
    data = _toy_split(1500, seed=2)  # 12 steps per epoch
    full = _model()
    train(full, data, None, _cfg(), TrainOptions(tmp_path / "full", seed=5, log=_quiet))

    mirror = str(tmp_path / "mirror")
    part = _model()
    first = train(part, data, None, _cfg(stop_after_steps=17, mirror_to=mirror),
                  TrainOptions(tmp_path / "cut", seed=5, log=_quiet))
    assert first.interrupted and first.state.epoch == 1  # stopped mid-epoch, after a mirrored epoch end
    shutil.rmtree(tmp_path / "cut")
    restore_run(mirror, tmp_path / "cut")
    torch.manual_seed(1234)
    resumed = _model()
    second = train(resumed, data, None, _cfg(mirror_to=mirror),
                   TrainOptions(tmp_path / "cut", seed=5, resume=True, log=_quiet))
    assert second.state.finished
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name} differs after restoring from the mirror"
    full_best = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    restored_best = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert all(torch.equal(full_best[k], restored_best[k]) for k in full_best)


def test_unreachable_mirror_warns_and_training_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from _seaweed import free_ports

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("RECFORGE_STORAGE_RETRIES", "1")
    logs: list[str] = []
    result = train(_model(), _toy_split(600, seed=1), None, _cfg(epochs=1, checkpoint_every=0,
                                                                  mirror_to="s3://nowhere/run"),
                   TrainOptions(tmp_path, seed=1, log=logs.append))
    assert result.state.finished and (tmp_path / "checkpoints" / "last.pt").is_file()
    assert any("mirroring checkpoint to s3://nowhere/run failed, training goes on" in line for line in logs)
