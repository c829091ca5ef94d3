"""Training checkpoints: everything needed to continue a run bit-for-bit.

A checkpoint holds model and optimizer state, the AMP scaler, the position in the run (epoch and
step within it), early-stopping state and the RNG states. The epoch's row order is a pure
function of (seed, epoch), so together these make a resumed run end with exactly the weights of
an uninterrupted one. Files are written atomically: a crash mid-write leaves the previous one.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from recforge.storage import write_bytes

CHECKPOINT_VERSION = 1


@dataclass
class RunState:
    epoch: int = 0  # the epoch in progress (or next to start when samples_in_epoch == 0)
    # Rows of the epoch's global order already trained on (by all ranks together): a position
    # that stays meaningful when a run resumes with a different number of processes.
    samples_in_epoch: int = 0
    global_step: int = 0
    world_size: int = 1
    best_metric: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    scaler: torch.amp.GradScaler | None,
    state: RunState,
    config_digest: str,
) -> None:
    payload = {
        "version": CHECKPOINT_VERSION,
        "model": model.state_dict(),
        "optimizers": [opt.state_dict() for opt in optimizers],
        "scaler": scaler.state_dict() if scaler is not None else None,
        "state": asdict(state),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "config_digest": config_digest,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes(path, buffer.getvalue())


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    scaler: torch.amp.GradScaler | None,
    config_digest: str,
) -> RunState:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {payload.get('version')} is not {CHECKPOINT_VERSION}")
    if payload["config_digest"] != config_digest:
        raise ValueError(
            f"{path} was written by a run with a different model/training config; "
            "resume with the same config (only train.epochs, train.stop_after_steps and logging may change)"
        )
    model.load_state_dict(payload["model"])
    for opt, opt_state in zip(optimizers, payload["optimizers"], strict=True):
        opt.load_state_dict(opt_state)
    if scaler is not None and payload["scaler"] is not None:
        scaler.load_state_dict(payload["scaler"])
    torch.set_rng_state(payload["rng_cpu"])
    if payload["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng_cuda"])
    return RunState(**payload["state"])


def save_weights(path: Path, model: torch.nn.Module) -> None:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    write_bytes(path, buffer.getvalue())
