"""Where code runs and how reproducibly: device choice, seeding, environment fingerprint, Java.

A leaf module: anything may import it, it imports nothing of recforge but config-free stdlib,
numpy and torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import hashlib
import os
import platform
import random
import re
import shutil
import signal
import socket
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


def choose_device(requested: str = "auto", local_rank: int = 0) -> DeviceChoice:
    """Pick the training device and say why, so a log line explains a CPU run on a GPU box."""
    choice = _choose_device(requested)
    if choice.device.type == "cuda" and local_rank:
        return DeviceChoice(torch.device("cuda", local_rank), f"{choice.reason}; local rank {local_rank}")
    return choice


def _choose_device(requested: str) -> DeviceChoice:
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


@dataclass(frozen=True)
class DistContext:
    """This process's place in a (possibly single-process) training job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str, timeout_s: float) -> DistContext:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...).

    gloo on CPU, NCCL on CUDA. The timeout bounds every collective: when a peer dies, the others
    fail after `timeout_s` with an error instead of hanging forever.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank, world_size, local_rank, backend)


def cleanup_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now, for a rendezvous that was given none."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """`preexec_fn` for a helper server (SeaweedFS, a test's or a scenario's `recforge serve`): the
    kernel kills the child when its parent dies, however the parent died.

    A parent killed with SIGKILL runs no cleanup, so a `finally: proc.kill()` alone leaves servers
    holding ports and disk behind; PR_SET_PDEATHSIG is the one guarantee that needs no cleanup. The
    signal follows the thread that forked, so start such children from a long-lived thread. Outside
    Linux this does nothing.
    """
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def tune_allocator() -> dict[str, object]:
    """Keep glibc malloc from returning large blocks to the kernel after every training step.

    By default glibc serves big allocations (the per-step activation and gradient temporaries)
    with mmap and unmaps them on free, so every step pays page faults to map them again; that
    measured as ~45% of a dense-Adam epoch. The same settings as MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=1e11 MALLOC_TOP_PAD_=1e9 are applied in-process with mallopt.
    Environment variables the user set win. Returns what was applied, for the run's record.
    """
    applied: dict[str, object] = {"allocator": "glibc", "tuned": False}
    if os.environ.get("MALLOC_MMAP_MAX_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        applied["reason"] = "MALLOC_* set in the environment; left as configured"
        return applied
    libc_name = ctypes.util.find_library("c")
    if not libc_name or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        applied.update(allocator=platform.libc_ver()[0] or "unknown", reason="not glibc; nothing to tune")
        return applied
    libc = ctypes.CDLL(libc_name)
    ok = all(
        libc.mallopt(param, value) == 1
        for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 1 << 30))
    )
    applied.update(tuned=ok, mmap_max=0, trim_threshold=2**31 - 1, top_pad=1 << 30)
    return applied


def environment_drift(recorded: dict[str, object], current: dict[str, object] | None = None) -> list[str]:
    """Differences between a recorded environment and this one that can change a model's results.

    Only what moves numbers is compared: torch's major.minor version and the CUDA build (a patch
    release or another machine name changes nothing worth a warning).
    """
    current = current or env_fingerprint()

    def major_minor(version: object) -> str | None:
        if not version:
            return None
        parts = str(version).split("+")[0].split(".")
        return ".".join(parts[:2])

    drift = []
    if major_minor(recorded.get("torch")) != major_minor(current.get("torch")):
        drift.append(f"torch {recorded.get('torch')} recorded, {current.get('torch')} here")
    if major_minor(recorded.get("cuda")) != major_minor(current.get("cuda")):
        drift.append(f"CUDA build {recorded.get('cuda') or 'none (CPU)'} recorded, "
                     f"{current.get('cuda') or 'none (CPU)'} here")
    return drift


JAVA_PACKAGE = "openjdk-17-jre-headless"  # what `make test` installs on Debian (tools/ensure_java.sh)
JAVA_TIMEOUT_S = 30.0


def _java_executable() -> str | None:
    """The java Spark will start: $JAVA_HOME/bin/java when JAVA_HOME is set (pyspark's own rule), else PATH."""
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home) / "bin" / "java"
        return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None
    return shutil.which("java")


def parse_java_major(line: str) -> int | None:
    """The major version in `java -version`'s first line: `"17.0.15"` is 17, `"21"` 21, `"1.8.0_292"` 8."""
    found = re.search(r'version "(\d+)(?:\.(\d+))?', line)
    if found is None:
        return None
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major


def java_version() -> tuple[int, str] | None:
    """(major version, first line of `java -version`) of the java Spark would use; None when there is none.

    `java -version` writes to stderr (stdout on some builds), so both are read. A java that does not
    run, hangs or prints no version counts as none: Spark could not start it either.
    """
    java = _java_executable()
    if java is None:
        return None
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=JAVA_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in (out.stderr + "\n" + out.stdout).splitlines() if line.strip()]
    line = next((line for line in lines if "version" in line), None)
    major = parse_java_major(line) if out.returncode == 0 and line else None
    return None if major is None else (major, line)


def require_java(minimum: int = 17) -> tuple[int, str]:
    """The java found, or a one-line RuntimeError saying what to install (Spark preparation needs Java)."""
    found = java_version()
    where = f"JAVA_HOME={os.environ['JAVA_HOME']}" if os.environ.get("JAVA_HOME") else "PATH"
    how = (f"install it (Debian/Ubuntu: `apt-get install {JAVA_PACKAGE}`) or set JAVA_HOME "
           f"to a Java {minimum}+ installation")
    if found is None:
        raise RuntimeError(f"data.engine=spark needs Java {minimum}+ and there is no working java on {where}; {how}")
    major, line = found
    if major < minimum:
        raise RuntimeError(f"data.engine=spark needs Java {minimum}+ but {where} has Java {major} ({line}); {how}")
    return found
