"""The CUDA lock is lock.txt with only the GPU stack changed, its generator reproduces it, and doctor points at it.

No CUDA wheel can be installed here, so instead of comparing it with the installed environment (as
tests/test_lockfile.py does for the CPU locks) the CUDA lock is compared with lock.txt: a drifted
non-CUDA pin would make a GPU run differ from the CPU run for reasons that have nothing to do with
the GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from recforge import doctor
from recforge.doctor import DriverInfo

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements"
GENERATOR = REQUIREMENTS / "compile-cuda.sh"
# What a CUDA build of torch adds: the CUDA libraries (nvidia-*, cuda-*) and triton, its GPU compiler.
CUDA_STACK = re.compile(r"^(nvidia-.+|cuda-.+|triton)$")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(text: str) -> dict[str, tuple[str, str]]:
    """name -> (operator, version) for `name==v` and `name===v` lines; comments and pip options skipped."""
    pins: dict[str, tuple[str, str]] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(===|==)\s*(\S+)", line)
        assert match, f"line {number} is not an exact pin: {raw!r}"
        name = normalize(match.group(1))
        assert name not in pins, f"line {number}: {name} pinned twice"
        pins[name] = (match.group(2), match.group(3))
    return pins


def cuda_locks() -> list[Path]:
    return sorted(p for p in REQUIREMENTS.glob("lock-cu*.txt"))


def lock_cuda(path: Path) -> str:
    """lock-cu130.txt -> '13.0'."""
    match = re.fullmatch(r"lock-cu(\d+)(\d)\.txt", path.name)
    assert match, f"{path.name}: a CUDA lock is named lock-cuNNN.txt"
    return f"{match.group(1)}.{match.group(2)}"


@pytest.fixture(scope="module")
def cpu_pins() -> dict[str, str]:
    return {name: version for name, (_, version) in parse_pins((REQUIREMENTS / "lock.txt").read_text()).items()}


def test_there_is_a_cuda_lock_and_doctor_finds_it():
    assert cuda_locks(), "requirements/lock-cuNNN.txt is missing: run requirements/compile-cuda.sh pypi"
    assert doctor._cuda_lock_file() == cuda_locks()[0]


@pytest.mark.parametrize("path", cuda_locks(), ids=lambda p: p.name)
def test_every_non_cuda_package_has_the_cpu_locks_version(path, cpu_pins):
    pins = parse_pins(path.read_text())
    missing = sorted(set(cpu_pins) - set(pins))
    assert not missing, f"{path.name} lacks packages lock.txt pins: {missing}"
    drifted = [f"{name}: {pins[name][1]} vs lock.txt {version}" for name, version in sorted(cpu_pins.items())
               if name != "torch" and pins[name] != ("==", version)]
    assert not drifted, f"{path.name} differs from lock.txt (rerun requirements/compile-cuda.sh): {drifted}"
    extra = sorted(name for name in set(pins) - set(cpu_pins) if not CUDA_STACK.match(name))
    assert not extra, f"{path.name} adds packages outside the CUDA stack: {extra}"


@pytest.mark.parametrize("path", cuda_locks(), ids=lambda p: p.name)
def test_torch_is_the_same_release_built_for_the_named_cuda(path, cpu_pins):
    pins = parse_pins(path.read_text())
    op, version = pins["torch"]
    cuda = lock_cuda(path)
    tag = "cu" + cuda.replace(".", "")
    assert Version(version).public == cpu_pins["torch"]
    if Version(version).local is not None:
        # A PyTorch-index build: the label says the CUDA, and the index that serves it is in the file.
        assert (op, Version(version).local) == ("==", tag)
        assert f"--extra-index-url https://download.pytorch.org/whl/{tag}" in path.read_text()
    else:
        # PyPI's own build: '===' so that an installed X.Y.Z+cpu does not already satisfy the pin.
        assert op == "===", "torch from PyPI must be pinned with '===' or pip keeps an installed +cpu build"
    nvidia = [name for name in pins if name.startswith("nvidia-")]
    assert {"nvidia-cudnn-cu13", "nvidia-nccl-cu13"} & set(nvidia) or {"nvidia-cudnn-cu12", "nvidia-nccl-cu12"} \
        & set(nvidia), f"{path.name} has no cuDNN/NCCL: {nvidia}"
    runtime = pins.get("cuda-toolkit") or pins.get("nvidia-cuda-runtime") or pins.get("nvidia-cuda-runtime-cu12")
    assert runtime is not None, f"{path.name} pins no CUDA runtime"
    assert runtime[1].startswith(cuda + "."), f"{path.name}: CUDA runtime {runtime[1]} is not CUDA {cuda}"
    assert "triton" in pins


@pytest.mark.parametrize("path", cuda_locks(), ids=lambda p: p.name)
def test_header_names_the_command_that_regenerates_it(path):
    header = path.read_text().splitlines()[:5]
    command = next((re.search(r"`requirements/compile-cuda\.sh (\S+)`", line) for line in header
                    if "compile-cuda.sh" in line), None)
    assert command, f"{path.name}: the header must name the command that generated it"
    variant = command.group(1)
    assert variant == "pypi" or path.name == f"lock-{variant}.txt"
    assert GENERATOR.stat().st_mode & stat.S_IXUSR, "compile-cuda.sh must be executable"
    docs = (ROOT / "docs" / "environments.md").read_text()
    assert f"requirements/compile-cuda.sh {variant}" in docs and path.name in docs


def _generator_copy(tmp_path: Path) -> Path:
    """The real script and its inputs in a scratch requirements/, so a run cannot touch the committed files."""
    req = tmp_path / "requirements"
    req.mkdir()
    for name in ("compile-cuda.sh", "lock.txt", "runtime.in"):
        shutil.copy2(REQUIREMENTS / name, req / name)
    return req


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_generator_reproduces_the_committed_lock_from_its_resolution(tmp_path):
    """Resolving needs the network, so a stand-in `uv` replays the committed lock's resolution; the rest of
    the script (constraints, file name from the CUDA runtime, header, the '===' pin) runs for real."""
    committed = next((p for p in cuda_locks() if "compile-cuda.sh pypi" in p.read_text()), None)
    if committed is None:
        pytest.skip("no lock generated from PyPI")
    req = _generator_copy(tmp_path)
    resolved = tmp_path / "resolved.txt"
    body = [line.replace("torch===", "torch==") for line in committed.read_text().splitlines()
            if line and not line.startswith("#")]
    resolved.write_text("# This file was autogenerated by uv\n" + "\n".join(body) + "\n")
    fake_uv = tmp_path / "uv"
    fake_uv.write_text('#!/usr/bin/env bash\n'
                       'args=("$@"); for i in "${!args[@]}"; do\n'
                       '  [[ "${args[$i]}" == -c ]] && cp "${args[$((i+1))]}" "$SEEN_CONSTRAINTS"\n'
                       '  [[ "${args[$i]}" == -o ]] && cp "$RESOLVED" "${args[$((i+1))]}"\n'
                       'done; exit 0\n')
    fake_uv.chmod(0o755)
    env = {**os.environ, "UV": str(fake_uv), "RESOLVED": str(resolved), "SEEN_CONSTRAINTS": str(tmp_path / "c.txt")}
    proc = subprocess.run(["bash", str(req / "compile-cuda.sh"), "pypi"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (req / committed.name).read_text() == committed.read_text()
    constraints = parse_pins((tmp_path / "c.txt").read_text())
    assert "torch" not in constraints and constraints["numpy"] == ("==", parse_pins(
        (REQUIREMENTS / "lock.txt").read_text())["numpy"][1])


def test_generator_rejects_an_unknown_variant_in_one_line(tmp_path):
    req = _generator_copy(tmp_path)
    proc = subprocess.run(["bash", str(req / "compile-cuda.sh"), "cuda12"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown variant 'cuda12' (expected cu126, cu128, cu130 or pypi)"


def test_doctor_fix_for_a_cpu_build_installs_the_lock_and_names_its_driver(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lock = cuda_locks()[0]
    floor = doctor.driver_floor(lock_cuda(lock))[0]
    fix = doctor.check_cuda(DriverInfo(found=False), required=True).fix
    assert f"-m pip install -r {lock}" in fix
    assert f"a CUDA {lock_cuda(lock)} build: it needs NVIDIA driver >= {floor}" in fix
    old = doctor.check_cuda(DriverInfo(found=True, version="550.54.14", gpus=("GPU",)), required=True).fix
    assert f"it needs driver >= {floor}, newer than this machine's 550.54.14" in old


def test_doctor_sends_a_drifted_cuda_build_to_the_cuda_lock(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    check = doctor.check_torch()
    assert check.status == "warn" and f"-m pip install -r {cuda_locks()[0]}" in check.fix
    monkeypatch.setattr(torch, "__version__", "2.11.0+cpu")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert doctor.check_torch().fix.endswith("requirements/lock.txt")
