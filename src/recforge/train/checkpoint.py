"""Training checkpoints: everything needed to continue a run bit-for-bit.

A checkpoint holds model and optimizer state, the AMP scaler, the position in the run (epoch and
step within it), early-stopping state and the RNG states. The epoch's row order is a pure
function of (seed, epoch), so together these make a resumed run end with exactly the weights of
an uninterrupted one. Files are written atomically: a crash mid-write leaves the previous one.

For disaster recovery a run can mirror itself to storage (`train.mirror_to`, e.g. s3://bucket/runs/x):
after each checkpoint, a snapshot of everything a resume needs (the checkpoint, the best weights so
far, the run's config and metrics) is uploaded as one committed directory `<uri>/ckpt-<step>-<epoch>`.
Snapshots are complete or invisible (storage.put_dir), so `restore_run` takes the newest committed
one; older ones are pruned once a newer one is committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from recforge import storage
from recforge.storage import write_bytes

CHECKPOINT_VERSION = 1
# A checkpoint file is MAGIC + the sha256 (hex) of the torch.save body + the body. torch's zip
# container does not notice a flipped byte inside a tensor, so without this a damaged weight would
# resume silently; the digest lives in the same file so it cannot drift from the body after a crash.
CHECKPOINT_MAGIC = b"RFCKPT1\n"
_DIGEST_LEN = 64


@dataclass
class RunState:
    epoch: int = 0  # the epoch in progress (or next to start when samples_in_epoch == 0)
    # Rows of the epoch's global order already trained on (by all ranks together): a position
    # that stays meaningful when a run resumes with a different number of processes.
    samples_in_epoch: int = 0
    global_step: int = 0
    # Steps taken in the epoch in progress: where a streamed epoch (data.stream) resumes, replaying
    # its shard and buffer bookkeeping up to it. (Checkpoints from before it load as 0: memory path.)
    steps_in_epoch: int = 0
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
    body = buffer.getvalue()
    write_bytes(path, CHECKPOINT_MAGIC + hashlib.sha256(body).hexdigest().encode() + body)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The verified payload of a checkpoint file; a damaged or foreign file is refused naming it.

    Loaded with weights_only: a checkpoint is data (tensors, dicts, lists, numbers), never code to run.
    Files written before the digest header (plain torch.save) still load, unverified.
    """
    raw = path.read_bytes()
    body = raw
    if raw.startswith(CHECKPOINT_MAGIC):
        head = len(CHECKPOINT_MAGIC)
        expected = raw[head:head + _DIGEST_LEN].decode("ascii", "replace")
        body = raw[head + _DIGEST_LEN:]
        actual = hashlib.sha256(body).hexdigest()
        if actual != expected:
            raise ValueError(f"{path}: checkpoint is damaged (sha256 {actual}, written as {expected}); "
                             "restore it from a mirror snapshot or train again")
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors have no common base
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})"[:500]) from exc
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: not a recforge checkpoint")
    return payload


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    scaler: torch.amp.GradScaler | None,
    config_digest: str,
) -> RunState:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    payload = read_checkpoint(path)
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


def lock_run_dir(run_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Hold `<run_dir>/.lock` for a run's whole life: two trainers on one directory would overwrite
    each other's checkpoints and weights for minutes without an error."""
    return storage.exclusive_lock(run_dir / ".lock", f"run directory {run_dir} is in use by another trainer "
                                  "(pid {pid}); wait for it or choose another run_dir=...")


def save_weights(path: Path, model: torch.nn.Module) -> None:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    write_bytes(path, buffer.getvalue())


SNAPSHOT_PREFIX = "ckpt-"
# Replaced atomically (never changed in place), so a hard link is a stable snapshot of them.
_LINKED = ("checkpoints/last.pt", "model.pt")
# Small files, copied: metrics.jsonl is still being appended to while the snapshot uploads.
_COPIED = ("config.yaml", "features.json", "env.json", "metrics.jsonl")


def snapshot_name(state: RunState) -> str:
    """Names sort in training order: a checkpoint at an epoch's end sorts after one mid-epoch at the same step."""
    return f"{SNAPSHOT_PREFIX}{state.global_step:012d}-{state.epoch:05d}-{int(state.finished)}"


def mirror_run(run_dir: Path, uri: str, state: RunState, keep: int = 2) -> str:
    """Upload a snapshot of `run_dir` as it is after a checkpoint; returns the snapshot's URI.

    The files are staged (links and copies) first, so the snapshot is the run at this moment even
    though training goes on writing. Only the newest `keep` committed snapshots are kept.
    """
    target = str(storage.join(uri, snapshot_name(state)))
    if storage.exists(storage.join(target, storage.COMMIT_MARKER)):  # this state was mirrored already
        return target
    staging = Path(tempfile.mkdtemp(prefix=".mirror-", dir=run_dir))
    try:
        for rel in (*_LINKED, *_COPIED):
            source = run_dir / rel
            if not source.is_file():
                continue
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            if rel in _LINKED:
                try:
                    os.link(source, staging / rel)
                except OSError:
                    shutil.copyfile(source, staging / rel)
            else:
                shutil.copyfile(source, staging / rel)
        storage.put_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    snapshots = [n for n in storage.list_dir(uri) if n.startswith(SNAPSHOT_PREFIX)]
    for name in sorted(snapshots)[:-keep] if keep > 0 else []:
        storage.delete_dir(storage.join(uri, name))
    return target


def latest_snapshot(uri: str) -> str | None:
    """The newest committed snapshot under `uri` (a snapshot whose upload never finished is skipped)."""
    for name in sorted((n for n in storage.list_dir(uri) if n.startswith(SNAPSHOT_PREFIX)), reverse=True):
        candidate = str(storage.join(uri, name))
        if storage.exists(storage.join(candidate, storage.COMMIT_MARKER)):
            return candidate
    return None


def restore_run(uri: str, run_dir: Path) -> str:
    """Download the newest committed snapshot under `uri` into `run_dir` (verified); returns its URI.

    `run_dir` must not hold a checkpoint already: a local run is continued with --resume instead.
    """
    snapshot = latest_snapshot(uri)
    if snapshot is None:
        raise FileNotFoundError(f"no committed checkpoint snapshot under {uri}; was the run started with "
                                "train.mirror_to (or --mirror-to) set to this URI?")
    run_dir = Path(run_dir)
    if (run_dir / "checkpoints" / "last.pt").exists():
        raise FileExistsError(f"run directory {run_dir} already holds a checkpoint; continue it with --resume, "
                              "or restore into another run_dir=...")
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".restore-", dir=run_dir) as tmp:
        local = storage.get_dir(snapshot, Path(tmp) / "snapshot")
        # The checkpoint goes in last: its presence is what --resume looks for.
        for path in sorted(local.rglob("*"), key=lambda p: (p.name == "last.pt", str(p))):
            rel = path.relative_to(local)
            if path.is_file() and rel.as_posix() != storage.COMMIT_MARKER:
                (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, run_dir / rel)  # same file system: each file appears whole
    return snapshot
