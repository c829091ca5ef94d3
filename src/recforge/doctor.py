"""`recforge doctor`: say exactly what is wrong with this environment for training, and how to fix it.

"CUDA not available" has a dozen causes (a CPU-only wheel, no driver, a driver too old for the
wheel's CUDA, CUDA_VISIBLE_DEVICES hiding every GPU, a GPU the wheel has no kernels for, ...) and
torch reports none of them. Each probe here looks at one thing and returns a `Check` with a status,
what it saw, and the exact command that fixes it; `run_doctor` composes them for the requested
device. Probes read torch, `shutil.which`, `subprocess.run`, `os.environ` and `socket.if_nameindex`
at call time, so tests fake any machine with monkeypatch.

An entry point (it may import any of recforge), but torch and recforge.runtime are imported inside
functions only: the CLI imports this module at start-up and `recforge --help` must stay fast.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import enum
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import typer

Status = Literal["ok", "warn", "fail"]

MIN_PYTHON = (3, 11)  # pyproject.toml: requires-python >= 3.11
PYTORCH_INDEX = "https://download.pytorch.org/whl"
# CUDA variants PyTorch publishes wheels for. They change with every torch release (see the
# install matrix at https://pytorch.org/get-started/locally/); cu126 is the one older drivers run.
PYTORCH_WHEEL_CUDA = ("12.6", "12.8", "13.0")
DEFAULT_WHEEL_CUDA = "12.6"

# Minimum Linux x86_64 driver for each CUDA toolkit (the GA release of each major.minor), from
# NVIDIA's CUDA Toolkit Release Notes, "Table 3 CUDA Toolkit and Corresponding Driver Versions"
# (https://docs.nvidia.com/cuda/cuda-toolkit-release-notes/index.html, CUDA 13.2 edition). A torch
# wheel bundles its CUDA runtime; the host driver is the only CUDA part that must be new enough.
DRIVER_FOR_CUDA: dict[str, str] = {
    "11.8": "520.61.05",
    "12.0": "525.60.13",
    "12.1": "530.30.02",
    "12.2": "535.54.03",
    "12.3": "545.23.06",
    "12.4": "550.54.14",
    "12.5": "555.42.02",
    "12.6": "560.28.03",
    "12.8": "570.26",
    "12.9": "575.51.03",
    "13.0": "580.65.06",
    "13.1": "590.44.01",
    "13.2": "595.45.04",
}
# Below the toolkit's own floor but at or above these, a wheel still runs through CUDA minor-version
# compatibility (same release notes, "CUDA Toolkit and Minimum Required Driver Version for CUDA
# Minor Version Compatibility"), minus features that need the newer driver, such as PTX JIT.
DRIVER_FOR_CUDA_MAJOR: dict[int, str] = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}

# CUDA_VISIBLE_DEVICES values that hide every device.
HIDE_ALL_DEVICES = {"", "-1", "none", "nodevfiles"}
NCCL_DEBUG_LEVELS = ("VERSION", "WARN", "INFO", "TRACE", "ABORT")
NVIDIA_SMI_TIMEOUT_S = 15.0
DDP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Check:
    """One finding: what was looked at, how it stands, what was seen, and the command that fixes it."""

    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class DoctorReport:
    """All findings for one requested device; healthy when nothing failed (warnings do not fail)."""

    requested: str
    device: str
    checks: tuple[Check, ...]
    env: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(check.status != "fail" for check in self.checks)

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(check for check in self.checks if check.status == "fail")

    @property
    def reason(self) -> Check | None:
        """The one failure to name in a one-line error: the CUDA verdict when it failed, else the first."""
        failures = self.failures
        return next((c for c in failures if c.name == "cuda"), failures[0] if failures else None)

    def to_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "device": self.device, "requested": self.requested,
                "checks": [asdict(check) for check in self.checks], "env": self.env}


@dataclass(frozen=True)
class DriverInfo:
    """What `nvidia-smi` says about the NVIDIA driver, gathered once and shared by several checks."""

    found: bool  # nvidia-smi is on PATH
    version: str | None = None  # driver version, when nvidia-smi ran
    gpus: tuple[str, ...] = ()
    error: str | None = None  # why nvidia-smi failed, when it did

    @property
    def working(self) -> bool:
        return self.version is not None


# --- small helpers ---------------------------------------------------------------------------


def _need(required: bool) -> Status:
    """A problem fails the run only when the requested device needs the thing that is broken."""
    return "fail" if required else "warn"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def _at_least(version: str, minimum: str) -> bool:
    return _version_tuple(version) >= _version_tuple(minimum)


def driver_floor(cuda: str) -> tuple[str | None, bool]:
    """Minimum driver for a CUDA major.minor, and whether the table knows that exact release.

    A release newer than the table gets the floor of the newest known release of the same major:
    a lower bound, so a driver is never called too old wrongly.
    """
    key = ".".join(cuda.split(".")[:2])
    if key in DRIVER_FOR_CUDA:
        return DRIVER_FOR_CUDA[key], True
    target = _version_tuple(key)
    known = [k for k in DRIVER_FOR_CUDA if target and _version_tuple(k)[0] == target[0] and _version_tuple(k) <= target]
    if not known:
        return None, False
    return DRIVER_FOR_CUDA[max(known, key=_version_tuple)], False


def _torch_base_version() -> str:
    import torch

    return str(torch.__version__).split("+")[0]


def _project_root() -> Path:
    """The source checkout (src layout); its requirements/ exist only in an editable install."""
    return Path(__file__).resolve().parents[2]


def _cuda_lock_file() -> Path | None:
    """The project's CUDA lock file, if it has one (e.g. requirements/lock-cuda.txt or lock-cu126.txt)."""
    requirements = _project_root() / "requirements"
    if not requirements.is_dir():
        return None
    found = sorted(p for p in requirements.glob("*.txt") if re.search(r"cuda|cu\d{2,3}", p.name))
    return found[0] if found else None


def _wheel_cuda_for(driver: DriverInfo) -> str:
    """The newest published CUDA variant this driver fully supports (cu126 when the driver is unknown)."""
    if driver.version is None:
        return DEFAULT_WHEEL_CUDA
    fits = [cuda for cuda in PYTORCH_WHEEL_CUDA if _at_least(driver.version, DRIVER_FOR_CUDA[cuda])]
    return fits[-1] if fits else PYTORCH_WHEEL_CUDA[0]


def cuda_wheel_command(cuda: str) -> str:
    """The pip line that swaps in the same torch release built for `cuda`.

    The local label (`+cu126`) is pinned on purpose: `torch==2.13.0` alone is already satisfied by
    the installed `2.13.0+cpu`, so pip would keep the CPU build and report success.
    """
    tag = "cu" + cuda.replace(".", "")
    return (f"{sys.executable} -m pip install 'torch=={_torch_base_version()}+{tag}' "
            f"--index-url {PYTORCH_INDEX}/{tag}")


def _cuda_build_fix(driver: DriverInfo, lead: str = "install a CUDA build of torch") -> str:
    cuda = _wheel_cuda_for(driver)
    fix = f"{lead}: {cuda_wheel_command(cuda)}"
    if driver.version is not None and not _at_least(driver.version, DRIVER_FOR_CUDA[cuda]):
        fix += f" (and upgrade the NVIDIA driver to >= {DRIVER_FOR_CUDA[cuda]}, the minimum for CUDA {cuda})"
    lock = _cuda_lock_file()
    if lock is not None:
        fix += f"; or install the project's CUDA lock: {sys.executable} -m pip install -r {lock}"
        fix += _lock_driver_note(lock, driver)
    return fix


def _lock_driver_note(lock: Path, driver: DriverInfo) -> str:
    """The driver the CUDA lock needs, read from its name (lock-cu130.txt -> CUDA 13.0).

    It may differ from the wheel suggested before it: PyPI's torch is a CUDA 13 build, which a driver
    that runs cu126 cannot load.
    """
    match = re.search(r"cu(\d+)(\d)(?!\d)", lock.name)
    floor = driver_floor(f"{match.group(1)}.{match.group(2)}")[0] if match else None
    if match is None or floor is None:
        return ""
    cuda = f"{match.group(1)}.{match.group(2)}"
    if driver.version is not None and not _at_least(driver.version, floor):
        return f" (a CUDA {cuda} build: it needs driver >= {floor}, newer than this machine's {driver.version})"
    return f" (a CUDA {cuda} build: it needs NVIDIA driver >= {floor})"


def _driver_install_fix(cuda: str | None) -> str:
    """How to get a driver; for a CPU-only torch, sized for the CUDA build the doctor suggests installing."""
    floor = driver_floor(cuda or DEFAULT_WHEEL_CUDA)[0]
    whose = "which this torch was built for" if cuda else "the torch build suggested for this machine"
    need = f" >= {floor} (the minimum for CUDA {cuda or DEFAULT_WHEEL_CUDA}, {whose})" if floor else ""
    return (f"install the NVIDIA driver{need} from https://www.nvidia.com/drivers or your distribution "
            "(e.g. `sudo ubuntu-drivers install`), then reboot; in a container, start it with `--gpus all` "
            "(NVIDIA Container Toolkit) so the driver and /dev/nvidia* are mounted")


# --- probes ----------------------------------------------------------------------------------


def probe_driver() -> DriverInfo:
    """Ask nvidia-smi for the driver version and GPUs; a hung driver must not hang the doctor."""
    path = shutil.which("nvidia-smi")
    if path is None:
        return DriverInfo(found=False)
    try:
        proc = subprocess.run(
            [path, "--query-gpu=driver_version,name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return DriverInfo(found=True, error=f"nvidia-smi did not answer within {NVIDIA_SMI_TIMEOUT_S:.0f}s")
    except OSError as exc:
        return DriverInfo(found=True, error=f"nvidia-smi could not run: {exc}")
    lines = [line.strip() for line in (proc.stdout or "").splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        said = ((proc.stdout or "") + (proc.stderr or "")).strip().splitlines()
        return DriverInfo(found=True, error=said[0] if said else f"nvidia-smi exited {proc.returncode}")
    version = lines[0].split(",")[0].strip()
    if not re.fullmatch(r"\d+(\.\d+)*", version):
        return DriverInfo(found=True, error=f"unexpected nvidia-smi output: {lines[0]!r}")
    gpus = tuple(line.split(",", 1)[1].strip() if "," in line else "GPU" for line in lines)
    return DriverInfo(found=True, version=version, gpus=gpus)


def probe_cuda_available() -> tuple[bool, str]:
    """torch.cuda.is_available(), plus the warning torch raised while finding out (often the real reason)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = bool(torch.cuda.is_available())
    said = " ".join(str(w.message).strip().replace("\n", " ") for w in caught)
    return available, said


def visible_devices(value: str, gpu_count: int | None) -> int | None:
    """How many devices CUDA_VISIBLE_DEVICES leaves visible: CUDA stops at the first invalid entry.

    Returns None when it cannot tell (UUID entries without a count to check them against).
    """
    if value.strip().lower() in HIDE_ALL_DEVICES:
        return 0
    count = 0
    for entry in (part.strip() for part in value.split(",")):
        if entry.isdigit():
            if gpu_count is not None and int(entry) >= gpu_count:
                break
        elif entry.startswith(("GPU-", "MIG-")):
            if gpu_count is None:
                return None
        else:
            break
        count += 1
    return count


def check_python() -> Check:
    version = platform.python_version()
    where = f"Python {version} ({sys.executable})"
    if sys.version_info[:2] < MIN_PYTHON:
        need = ".".join(map(str, MIN_PYTHON))
        return Check("python", "fail", f"{where}; recforge needs >= {need}",
                     f"create the environment with Python >= {need}: `make quickstart PYTHON=python{need}`")
    return Check("python", "ok", where)


def _locked_version(package: str) -> str | None:
    lock = _project_root() / "requirements" / "lock.txt"
    if not lock.is_file():
        return None
    for line in lock.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep and name.strip().lower() == package:
            return version.strip()
    return None


def check_torch() -> Check:
    """Which torch, built for which CUDA/cuDNN/NCCL; and whether it is the release the lock pins."""
    import torch

    cuda = torch.version.cuda
    if cuda is None:
        build = "CPU-only build"
    else:
        parts = [f"CUDA {cuda} build"]
        with contextlib.suppress(Exception):
            cudnn = torch.backends.cudnn.version()
            parts.append(f"cuDNN {cudnn}" if cudnn else "no cuDNN")
        with contextlib.suppress(Exception):
            nccl = torch.cuda.nccl.version()
            parts.append("NCCL " + (".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)))
        build = ", ".join(parts)
    detail = f"torch {torch.__version__} ({build})"
    locked = _locked_version("torch")
    if locked is not None and _torch_base_version() != locked:
        # A CUDA build is replaced by the CUDA lock's torch, so the GPU stack comes back pinned too.
        lock = (cuda is not None and _cuda_lock_file()) or _project_root() / "requirements" / "lock.txt"
        return Check("torch", "warn", f"{detail}; requirements/lock.txt pins torch=={locked}",
                     f"reinstall the locked environment: {sys.executable} -m pip install -r {lock}")
    return Check("torch", "ok", detail)


def check_cpu() -> Check:
    """Cores and intra-op threads: more torch threads than usable cores makes every step slower."""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = torch.get_num_threads()
    detail = f"{platform.machine()}, {usable} usable core(s), torch uses {threads} thread(s)"
    if threads > usable:
        return Check("cpu", "warn", f"{detail}: oversubscribed",
                     f"set OMP_NUM_THREADS={usable} (or torch.set_num_threads({usable})) before training")
    return Check("cpu", "ok", detail)


MIN_JAVA = 17  # pyspark 4 runs on Java 17+


def check_java() -> Check:
    """The Java that Spark preparation (data.engine=spark) would start; a warning at most, since the
    local engine, training and serving need no Java."""
    from recforge import runtime

    found = runtime.java_version()
    fix = (f"apt-get install {runtime.JAVA_PACKAGE} (what `make test` does as root), or set JAVA_HOME to a "
           f"Java {MIN_JAVA}+ installation")
    if found is None:
        where = f"under JAVA_HOME={os.environ['JAVA_HOME']}" if os.environ.get("JAVA_HOME") else "on PATH"
        return Check("java", "warn", f"no working java {where}: Spark preparation (data.engine=spark) needs "
                     f"Java {MIN_JAVA}+; the local engine needs none", fix)
    major, line = found
    if major < MIN_JAVA:
        return Check("java", "warn", f"Java {major} ({line}): Spark preparation (data.engine=spark) needs "
                     f"Java {MIN_JAVA}+; the local engine needs none", fix)
    return Check("java", "ok", f"Java {major} ({line}): Spark preparation can run")


def check_visible_devices(driver: DriverInfo, required: bool) -> Check:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return Check("CUDA_VISIBLE_DEVICES", "ok", "unset: every GPU is visible")
    count = len(driver.gpus) if driver.working else None
    visible = visible_devices(value, count)
    if visible == 0:
        example = ",".join(str(i) for i in range(count)) if count else "0"
        return Check("CUDA_VISIBLE_DEVICES", _need(required),
                     f"CUDA_VISIBLE_DEVICES={value!r} hides every GPU from CUDA"
                     + (f" ({count} present)" if count else ""),
                     f"unset CUDA_VISIBLE_DEVICES (`unset CUDA_VISIBLE_DEVICES`) or list the GPUs to use, "
                     f"e.g. `export CUDA_VISIBLE_DEVICES={example}`")
    shown = "some" if visible is None else str(visible)
    return Check("CUDA_VISIBLE_DEVICES", "ok", f"{value!r}: {shown} GPU(s) visible")


def check_driver(driver: DriverInfo, required: bool) -> Check:
    """Is there a working NVIDIA driver, and is it new enough for the CUDA this torch was built for?"""
    import torch

    cuda = torch.version.cuda
    if not driver.found:
        if not required:
            return Check("nvidia driver", "ok", "none (no nvidia-smi on PATH); not needed for CPU training")
        return Check("nvidia driver", "fail", "no NVIDIA driver: `nvidia-smi` is not on PATH",
                     _driver_install_fix(cuda))
    if not driver.working:
        return Check("nvidia driver", _need(required), f"nvidia-smi failed: {driver.error}",
                     "the driver is installed but not working: a kernel module that does not match the "
                     "user-space driver (after a driver or kernel upgrade) needs a reboot; otherwise "
                     "`sudo modprobe nvidia` and read `sudo dmesg | grep -i nvrm`")
    seen = f"driver {driver.version}, {len(driver.gpus)} GPU(s): {', '.join(driver.gpus)}"
    if cuda is None:
        return Check("nvidia driver", "ok", seen)
    floor, exact = driver_floor(cuda)
    if floor is None or _at_least(driver.version or "", floor):
        return Check("nvidia driver", "ok", f"{seen}; CUDA {cuda} needs >= {floor or 'unknown'}")
    major_floor = DRIVER_FOR_CUDA_MAJOR.get(_version_tuple(cuda)[0])
    bound = "" if exact else "at least "
    older = f"{seen}: older than {bound}{floor}, which CUDA {cuda} (this torch's build) needs"
    fix = (f"upgrade the NVIDIA driver to >= {floor} (https://www.nvidia.com/drivers), "
           + _cuda_build_fix(driver, "or install a torch build for an older CUDA"))
    if major_floor is not None and _at_least(driver.version or "", major_floor):
        return Check("nvidia driver", "warn",
                     f"{older}; it runs through CUDA minor-version compatibility, without PTX JIT", fix)
    return Check("nvidia driver", _need(required), older, fix)


def check_cuda(driver: DriverInfo, required: bool) -> Check:
    """torch.cuda.is_available(), and when it is False, the most basic reason that explains it."""
    import torch

    available, said = probe_cuda_available()
    if available:
        return Check("cuda", "ok", f"available: {torch.cuda.device_count()} device(s)")
    version = torch.__version__
    cuda = torch.version.cuda
    if cuda is None:
        detail = f"not available: torch {version} is a CPU-only build"
        if not required and not driver.found:
            return Check("cuda", "ok", f"{detail} (no GPU driver here; none needed for CPU training)")
        if driver.found:
            gpus = f" ({', '.join(driver.gpus)})" if driver.gpus else ""
            detail += f" although an NVIDIA driver is installed{gpus}"
        fix = _cuda_build_fix(driver)
        if not driver.found:
            fix += "; this machine also needs an NVIDIA driver (see 'nvidia driver')"
        return Check("cuda", _need(required), detail, fix)
    status = _need(required)
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and visible_devices(hidden, len(driver.gpus) if driver.working else None) == 0:
        return Check("cuda", status, f"not available: CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU",
                     "unset CUDA_VISIBLE_DEVICES or set it to the GPUs to use, e.g. `export CUDA_VISIBLE_DEVICES=0`")
    if not driver.found:
        return Check("cuda", status, f"not available: torch {version} is a CUDA {cuda} build but there is no "
                     "NVIDIA driver (no nvidia-smi on PATH)", _driver_install_fix(cuda))
    if not driver.working:
        return Check("cuda", status, f"not available: the NVIDIA driver is not working ({driver.error})",
                     "see the 'nvidia driver' check: reboot after a driver/kernel upgrade, or `sudo modprobe nvidia`")
    floor, _ = driver_floor(cuda)
    if floor is not None and not _at_least(driver.version or "", floor):
        return Check("cuda", status, f"not available: driver {driver.version} is older than {floor}, "
                     f"which CUDA {cuda} needs", f"upgrade the NVIDIA driver to >= {floor}; "
                     + _cuda_build_fix(driver, "or install a torch build for an older CUDA"))
    reason = said or "torch found no usable CUDA device"
    if "busy" in reason.lower():
        return Check("cuda", status, f"not available: {reason}", _busy_fix(0))
    return Check("cuda", status, f"not available: {reason}",
                 "run `python -c 'import torch; torch.cuda.init()'` for CUDA's own error; in a container, "
                 "check that /dev/nvidia* exist (start it with `--gpus all`)")


def _busy_fix(index: int) -> str:
    return (f"another process holds GPU {index} or it is in a prohibited/exclusive compute mode: see "
            f"`nvidia-smi` (processes) and `nvidia-smi -q -i {index} -d COMPUTE`; `sudo nvidia-smi -i {index} "
            "-c DEFAULT` restores the shared mode, or pick a free GPU with CUDA_VISIBLE_DEVICES")


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Can a torch built for `arch_list` run on a device of `capability`?

    A cubin (sm_XY) runs on the same major at an equal or higher minor; PTX (compute_XY) is
    JIT-compiled for any device at or above it. sm_XYa kernels run on exactly X.Y only.
    """
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        match = re.fullmatch(r"(\d+)(\d)([af]?)", digits)
        if match is None:
            continue
        arch_cap = (int(match.group(1)), int(match.group(2)))
        if kind == "compute" and arch_cap <= capability:
            return True
        if kind == "sm" and arch_cap[0] == major and (arch_cap[1] == minor if match.group(3) else arch_cap[1] <= minor):
            return True
    return False


def check_gpus(required: bool = True) -> list[Check]:
    """Per visible GPU: what it is, what it can do (bf16, TF32, Tensor Cores), and whether it is usable."""
    import torch

    checks: list[Check] = []
    arch_list = list(torch.cuda.get_arch_list())
    for index in range(torch.cuda.device_count()):
        name = f"gpu {index}"
        props = torch.cuda.get_device_properties(index)
        capability = (int(props.major), int(props.minor))
        sm = f"sm_{capability[0]}{capability[1]}"
        if arch_list and not arch_supported(capability, arch_list):
            checks.append(Check(name, _need(required), f"{props.name} ({sm}): this torch has no kernels for it "
                                f"(built for {', '.join(arch_list)})",
                                _cuda_build_fix(probe_driver(), f"install a torch build whose CUDA supports {sm}")))
            continue
        try:
            with torch.cuda.device(index):
                torch.ones(1, device=f"cuda:{index}").add_(1)
                torch.cuda.synchronize(index)
                bf16 = _bf16_native()
        except RuntimeError as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            checks.append(Check(name, _need(required), f"{props.name} ({sm}) is unusable: {message}",
                                _busy_fix(index)))
            continue
        checks.append(Check(name, "ok", (
            f"{props.name}, {props.total_memory / 1024**3:.1f} GiB, "
            f"compute capability {capability[0]}.{capability[1]}; "
            f"bf16 {'yes' if bf16 else 'no'}, TF32 {'yes' if capability >= (8, 0) else 'no'}, "
            f"Tensor Cores {'yes' if capability >= (7, 0) else 'no'}")))
    return checks


def _bf16_native() -> bool:
    """bf16 in hardware on the current CUDA device (newer torch also counts slow emulation as support)."""
    import torch

    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:
        return bool(torch.cuda.is_bf16_supported())


def amp_mode(device: str) -> str:
    """The AMP mode training would use here: bf16 on CPU and bf16-capable GPUs, else fp16 + GradScaler."""
    if device == "cpu":
        return "bf16"
    return "bf16" if _bf16_native() else "fp16"


def check_amp(device: str) -> Check:
    """A tiny MLP's forward/backward under the trainer's autocast: finite loss, finite gradients."""
    import torch

    from recforge.train.trainer import autocast_context

    amp = amp_mode(device)
    dev = torch.device(device)
    name = f"amp smoke ({amp})"
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)).to(dev)
            x = torch.randn(64, 16).to(dev)
            y = (torch.rand(64, 1) < 0.5).float().to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler(dev.type) if amp == "fp16" else None
        with autocast_context(amp, dev):
            hidden = model[0](x)
            logits = model[2](model[1](hidden))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        grads = [p.grad for p in model.parameters()]
        value = float(loss.detach())
        grads_ok = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    except Exception as exc:  # noqa: BLE001 - any failure here is the finding
        return Check(name, "fail", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}",
                     f"run with train.amp=off on {device} to train without mixed precision, and report this error")
    expected = torch.bfloat16 if amp == "bf16" else torch.float16
    if not math.isfinite(value) or not grads_ok:
        return Check(name, "fail", f"loss {value} / gradients not finite on {device}",
                     "train with train.amp=off; non-finite values in a tiny seeded model point at a broken build")
    if hidden.dtype != expected:
        return Check(name, "warn", f"autocast left activations in {hidden.dtype}, not {expected}, on {device}",
                     "mixed precision has no effect here; train with train.amp=off")
    scaled = " + GradScaler" if scaler is not None else ""
    return Check(name, "ok", f"{device} {amp} autocast{scaled}: loss {value:.4f} finite, gradients finite")


def check_ddp(device: str) -> Check:
    """A 1-process process group on a free local port, one all_reduce, torn down again.

    Proves the backend the trainer uses (gloo on CPU, NCCL on CUDA) initialises and communicates
    here, before a multi-rank job finds out after its launch.
    """
    import torch
    import torch.distributed as dist

    from recforge import runtime

    backend = "nccl" if device == "cuda" else "gloo"
    name = f"ddp smoke ({backend})"
    if not dist.is_available():
        return Check(name, "fail", f"torch {torch.__version__} was built without torch.distributed",
                     f"install the official wheel: {sys.executable} -m pip install -r requirements/lock.txt")
    if dist.is_initialized():
        return Check(name, "ok", "a process group is already running in this process; not re-initialised")
    available = dist.is_nccl_available() if backend == "nccl" else dist.is_gloo_available()
    if not available:
        return Check(name, "fail", f"torch {torch.__version__} has no {backend} backend",
                     _cuda_build_fix(probe_driver(), "install an official CUDA build of torch (it ships NCCL)")
                     if backend == "nccl" else "install the official torch wheel (it ships gloo)")
    port = runtime.free_port()
    tensor = torch.ones(4, device="cuda:0" if device == "cuda" else "cpu")
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0,
                                timeout=datetime.timedelta(seconds=DDP_TIMEOUT_S))
        try:
            dist.all_reduce(tensor)
            if device == "cuda":
                torch.cuda.synchronize()
        finally:
            dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - any failure here is the finding
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ("rerun with NCCL_DEBUG=INFO for NCCL's own reason; check NCCL_SOCKET_IFNAME and that "
                "127.0.0.1 is reachable" if backend == "nccl"
                else "check that 127.0.0.1 is reachable (loopback up, no firewall on local ports) and "
                     "that GLOO_SOCKET_IFNAME, if set, names an interface that exists")
        return Check(name, "fail", f"init/all_reduce on 127.0.0.1:{port} failed: {message}", hint)
    if not bool((tensor.cpu() == 1).all()):
        return Check(name, "fail", f"all_reduce over 1 rank changed the values: {tensor.tolist()}",
                     "a 1-rank sum must be the identity; reinstall torch from the lock file")
    return Check(name, "ok", f"1-rank {backend} group on 127.0.0.1:{port}: init, all_reduce, destroy")


def nccl_ifname_selects(spec: str, interfaces: list[str]) -> tuple[list[str], list[str]]:
    """Which interfaces NCCL_SOCKET_IFNAME selects, and which of its entries match nothing.

    NCCL's rules: a comma list of prefixes; a leading `^` excludes instead of includes; a leading
    `=` (after any `^`) makes the names exact instead of prefixes; a `:port` suffix is ignored.
    """
    exclude = spec.startswith("^")
    spec = spec[1:] if exclude else spec
    exact = spec.startswith("=")
    spec = spec[1:] if exact else spec
    entries = [entry.split(":")[0].strip() for entry in spec.split(",") if entry.strip()]

    def hit(iface: str, entry: str) -> bool:
        return iface == entry if exact else iface.startswith(entry)

    unmatched = [entry for entry in entries if not any(hit(iface, entry) for iface in interfaces)]
    picked = [iface for iface in interfaces if any(hit(iface, entry) for entry in entries) != exclude]
    return picked, unmatched


def _interfaces() -> list[str] | None:
    try:
        return [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None


def check_nccl_env(required: bool) -> list[Check]:
    """NCCL reads its settings from NCCL_* variables and silently ignores values it cannot parse."""
    checks: list[Check] = []
    ifname = os.environ.get("NCCL_SOCKET_IFNAME")
    if ifname is not None:
        interfaces = _interfaces()
        if interfaces is None:
            checks.append(Check("NCCL_SOCKET_IFNAME", "warn", f"{ifname!r}: cannot list this machine's interfaces"))
        else:
            picked, unmatched = nccl_ifname_selects(ifname, interfaces)
            names = ", ".join(interfaces)
            if not picked:
                checks.append(Check(
                    "NCCL_SOCKET_IFNAME", _need(required),
                    f"NCCL_SOCKET_IFNAME={ifname!r} selects no interface here (interfaces: {names}); "
                    "NCCL init fails with 'no socket interface found'",
                    f"set it to one that exists, e.g. `export NCCL_SOCKET_IFNAME={_suggest_iface(interfaces)}`, "
                    "or unset it to let NCCL choose"))
            elif unmatched and not ifname.startswith("^"):
                checks.append(Check("NCCL_SOCKET_IFNAME", "warn",
                                    f"{ifname!r}: {', '.join(unmatched)} match(es) no interface (interfaces: {names})",
                                    "drop the entries that do not exist: "
                                    f"`export NCCL_SOCKET_IFNAME={','.join(picked)}`"))
            else:
                checks.append(Check("NCCL_SOCKET_IFNAME", "ok", f"{ifname!r} selects {', '.join(picked)}"))
    ib = os.environ.get("NCCL_IB_DISABLE")
    if ib is not None:
        if ib.strip() in ("0", "1"):
            state = "off" if ib.strip() == "1" else "on"
            checks.append(Check("NCCL_IB_DISABLE", "ok", f"{ib.strip()}: InfiniBand {state}"))
        else:
            checks.append(Check("NCCL_IB_DISABLE", "warn",
                                f"NCCL_IB_DISABLE={ib!r} is not 0 or 1; NCCL ignores it and keeps InfiniBand on",
                                "`export NCCL_IB_DISABLE=1` to turn InfiniBand off, or 0 / unset to use it"))
    debug = os.environ.get("NCCL_DEBUG")
    if debug is not None:
        if debug.strip().upper() in NCCL_DEBUG_LEVELS:
            checks.append(Check("NCCL_DEBUG", "ok", debug))
        else:
            checks.append(Check("NCCL_DEBUG", "warn",
                                f"NCCL_DEBUG={debug!r} is not a level NCCL knows ({', '.join(NCCL_DEBUG_LEVELS)}): "
                                "NCCL logs nothing",
                                "`export NCCL_DEBUG=INFO` (the level that explains init failures) or WARN"))
    gloo = os.environ.get("GLOO_SOCKET_IFNAME")
    if gloo is not None:
        interfaces = _interfaces()
        missing = [name for name in gloo.split(",") if interfaces is not None and name.strip() not in interfaces]
        if missing:
            checks.append(Check("GLOO_SOCKET_IFNAME", "fail",
                                f"GLOO_SOCKET_IFNAME={gloo!r}: {', '.join(missing)} does not exist here "
                                f"(interfaces: {', '.join(interfaces or [])}); gloo (CPU DDP) fails to start",
                                f"`export GLOO_SOCKET_IFNAME={_suggest_iface(interfaces or ['lo'])}` or unset it"))
    if not checks:
        checks.append(Check("NCCL env", "ok", "no NCCL_SOCKET_IFNAME / NCCL_IB_DISABLE / NCCL_DEBUG set"))
    return checks


def _suggest_iface(interfaces: list[str]) -> str:
    """The first non-loopback, non-container interface: the one a multi-node job usually means."""
    for name in interfaces:
        if not name.startswith(("lo", "docker", "veth", "virbr", "ifb")):
            return name
    return interfaces[0] if interfaces else "eth0"


# --- composing ---------------------------------------------------------------------------------


def _guard(name: str, probe: Callable[[], Check | list[Check]]) -> list[Check]:
    """A probe that crashes is itself a finding; the doctor must finish and report the rest."""
    try:
        found = probe()
    except Exception as exc:  # noqa: BLE001 - reported as a failed check instead of a traceback
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return [Check(name, "fail", f"the check itself failed: {type(exc).__name__}: {message}",
                      "rerun with RECFORGE_DEBUG=1 for the traceback")]
    return found if isinstance(found, list) else [found]


def run_doctor(device: str = "auto") -> DoctorReport:
    """Diagnose this environment for training on `device` (cpu, cuda, or auto: cuda when torch sees it).

    CPU always has to work (it is where CUDA-less training and the data steps run); CUDA problems
    fail the report only when CUDA is requested, and are warnings otherwise.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device '{device}' (expected auto, cpu or cuda)")
    from recforge import runtime

    available, _ = probe_cuda_available()
    resolved = device if device != "auto" else ("cuda" if available else "cpu")
    need_cuda = resolved == "cuda"
    driver = probe_driver()
    checks: list[Check] = []
    checks += _guard("python", check_python)
    checks += _guard("torch", check_torch)
    checks += _guard("cpu", check_cpu)
    # The conclusion first, then the facts behind it.
    cuda = _guard("cuda", lambda: check_cuda(driver, need_cuda))
    checks += cuda
    checks += _guard("CUDA_VISIBLE_DEVICES", lambda: check_visible_devices(driver, need_cuda))
    checks += _guard("nvidia driver", lambda: check_driver(driver, need_cuda))
    gpus = _guard("gpu", lambda: check_gpus(need_cuda)) if available else []
    checks += gpus
    checks += _guard("amp smoke", lambda: check_amp("cpu"))
    checks += _guard("ddp smoke", lambda: check_ddp("cpu"))
    # CUDA smoke tests only on GPUs that passed: a failed GPU already says what to fix.
    if need_cuda and available and all(c.status != "fail" for c in gpus):
        checks += _guard("amp smoke", lambda: check_amp("cuda"))
        checks += _guard("ddp smoke", lambda: check_ddp("cuda"))
    checks += _guard("NCCL env", lambda: check_nccl_env(need_cuda))
    checks += _guard("java", check_java)
    try:
        env = runtime.env_fingerprint()
    except Exception as exc:  # noqa: BLE001 - the fingerprint is context; the checks are the answer
        env = {"error": f"{type(exc).__name__}: {exc}"}
    return DoctorReport(requested=device, device=resolved, checks=tuple(checks), env=env)


# --- command line --------------------------------------------------------------------------------


class DeviceOption(enum.StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything the probes print (NCCL logs to stdout) to stderr, so --json's stdout stays parseable."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        with contextlib.suppress(Exception):
            ctypes.CDLL(None).fflush(None)  # C-level stdout buffers (NCCL) land on stderr too
        os.dup2(saved, 1)
        os.close(saved)


def _print_report(report: DoctorReport) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    out = Console()
    styles = {"ok": "green", "warn": "yellow", "fail": "bold red"}
    table = Table(title=f"recforge doctor: {report.device}"
                  + (" (auto)" if report.requested == "auto" else ""), show_lines=False)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("detail")
    for check in report.checks:
        table.add_row(Text(check.name), Text(check.status, style=styles[check.status]), Text(check.detail))
    out.print(table)
    fixes = [check for check in report.checks if check.status != "ok" and check.fix]
    if fixes:
        out.print("fixes:", style="bold")
        for check in fixes:
            out.print(Text(f"  {check.name} ({check.status}): {check.fix}"), soft_wrap=True)
    if report.ok:
        out.print(Text(f"ready for {report.device} training", style="green"))


def doctor_command(
    device: Annotated[DeviceOption, typer.Option(
        "--device", help="What to check for: cpu, cuda (needs a working GPU), or auto (cuda when visible).",
    )] = DeviceOption.auto,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object and nothing else.")] = False,
) -> None:
    """Diagnose this environment (torch build, driver, GPUs, AMP, DDP, NCCL) and print the fix for each problem."""
    value = device.value if isinstance(device, DeviceOption) else str(device)
    if as_json:
        with _stdout_to_stderr():
            report = run_doctor(value)
        print(json.dumps(report.to_dict(), default=str))
    else:
        report = run_doctor(value)
        _print_report(report)
    reason = report.reason
    if reason is not None:
        sys.stderr.write(f"error: not ready for {report.device} training: {reason.name}: {reason.detail}\n")
        raise typer.Exit(1)
