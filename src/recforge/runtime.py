"""Where code runs and how reproducibly: device choice, seeding, environment fingerprint.

A leaf module: anything may import it, it imports nothing of recforge but config-free stdlib,
numpy and torch.
"""

from __future__ import annotations

import hashlib
import os
import platform
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    reason: str


def choose_device(requested: str = "auto") -> DeviceChoice:
    """Pick the training device and say why, so a log line explains a CPU run on a GPU box."""
    cuda_ok = torch.cuda.is_available()
    if requested == "cpu":
        return DeviceChoice(torch.device("cpu"), "cpu requested in config (train.device=cpu)")
    if requested == "cuda":
        if not cuda_ok:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise RuntimeError(
                f"train.device=cuda but torch.cuda.is_available() is False (torch {torch.__version__} is "
                f"{build}); run `recforge doctor` or set train.device=auto"
            )
        return DeviceChoice(torch.device("cuda"), f"cuda requested: {torch.cuda.get_device_name(0)}")
    if requested != "auto":
        raise ValueError(f"unknown device '{requested}' (expected auto, cpu or cuda)")
    if cuda_ok:
        return DeviceChoice(torch.device("cuda"), f"auto: CUDA available ({torch.cuda.get_device_name(0)})")
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU-only build"
    else:
        why = f"torch is built for CUDA {torch.version.cuda} but no usable GPU was found"
    return DeviceChoice(torch.device("cpu"), f"auto: {why}; using {os.cpu_count()} CPU core(s)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _lock_hash() -> str | None:
    lock = Path(__file__).resolve().parents[2] / "requirements" / "lock.txt"
    if not lock.is_file():
        return None
    return hashlib.sha256(lock.read_bytes()).hexdigest()


def env_fingerprint() -> dict[str, object]:
    """What produced an artifact: recorded in every run so results can be traced and compared."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "lock_sha256": _lock_hash(),
        "git_commit": _git_commit(Path(__file__).resolve().parent),
        "executable": sys.executable,
    }
