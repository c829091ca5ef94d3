"""`recforge doctor`: every diagnosis on a faked machine, plus real runs on this one.

The probes read torch, shutil.which, subprocess.run, os.environ and socket.if_nameindex at call
time, so each test builds the machine it needs with monkeypatch: a CPU-only wheel, no driver, a
driver too old for the wheel's CUDA, hidden devices, a GPU the wheel has no kernels for, a busy
GPU, broken NCCL settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from recforge import doctor
from recforge.doctor import Check, DriverInfo

GIB = 1024**3
TORCH_BASE = str(torch.__version__).split("+")[0]
ENV_VARS = ("CUDA_VISIBLE_DEVICES", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_DEBUG", "GLOO_SOCKET_IFNAME")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def fake_nvidia_smi(monkeypatch, stdout: str = "", returncode: int = 0, stderr: str = "",
                    raises: BaseException | None = None) -> list[dict]:
    """Put a fake nvidia-smi on PATH; other commands (git, ...) still run for real."""
    real_which, real_run = shutil.which, subprocess.run
    calls: list[dict] = []
    def which(name, *a, **k):
        return "/usr/bin/nvidia-smi" if name == "nvidia-smi" else real_which(name, *a, **k)

    monkeypatch.setattr(shutil, "which", which)

    def run(args, *a, **k):
        if str(args[0]).endswith("nvidia-smi"):
            calls.append({"args": list(args), **k})
            if raises is not None:
                raise raises
            return subprocess.CompletedProcess(args, returncode, stdout, stderr)
        return real_run(args, *a, **k)

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def no_nvidia_smi(monkeypatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which",
                        lambda name, *a, **k: None if name == "nvidia-smi" else real_which(name, *a, **k))


def torch_build(monkeypatch, cuda: str | None, available: bool) -> None:
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)


# --- the CUDA build ---------------------------------------------------------------------------


def test_cpu_only_wheel_fails_cuda_with_the_exact_pip_line(monkeypatch):
    torch_build(monkeypatch, None, False)
    no_nvidia_smi(monkeypatch)
    check = doctor.check_cuda(doctor.probe_driver(), required=True)
    assert check.status == "fail"
    assert "CPU-only build" in check.detail and str(torch.__version__) in check.detail
    # The local label is pinned: `torch==X` alone is satisfied by the installed X+cpu and changes nothing.
    assert f"pip install 'torch=={TORCH_BASE}+cu126' --index-url https://download.pytorch.org/whl/cu126" in check.fix
    assert "NVIDIA driver" in check.fix


def test_cpu_only_wheel_is_fine_for_cpu_but_warns_when_a_gpu_is_wasted(monkeypatch):
    torch_build(monkeypatch, None, False)
    no_nvidia_smi(monkeypatch)
    assert doctor.check_cuda(doctor.probe_driver(), required=False).status == "ok"
    fake_nvidia_smi(monkeypatch, "570.86.10, NVIDIA L4\n")
    check = doctor.check_cuda(doctor.probe_driver(), required=False)
    assert check.status == "warn" and "NVIDIA L4" in check.detail
    # A 570 driver runs the cu128 wheel at full compatibility, not only cu126.
    assert f"'torch=={TORCH_BASE}+cu128' --index-url https://download.pytorch.org/whl/cu128" in check.fix


@pytest.mark.parametrize(("driver", "wheel", "upgrade"), [
    ("580.95.05", "cu130", False), ("575.51.03", "cu128", False), ("550.54.14", "cu126", True)])
def test_suggested_wheel_follows_the_driver(monkeypatch, driver, wheel, upgrade):
    torch_build(monkeypatch, None, False)
    fix = doctor.check_cuda(DriverInfo(found=True, version=driver, gpus=("GPU",)), required=True).fix
    assert f"--index-url https://download.pytorch.org/whl/{wheel}" in fix
    assert ("upgrade the NVIDIA driver to >= 560.28.03" in fix) is upgrade


def test_cpu_only_fix_points_at_the_projects_cuda_lock(monkeypatch, tmp_path):
    (tmp_path / "requirements").mkdir()
    (tmp_path / "requirements" / "lock.txt").write_text("torch==2.13.0\n")
    (tmp_path / "requirements" / "lock-cuda.txt").write_text("torch==2.13.0+cu126\n")
    monkeypatch.setattr(doctor, "_project_root", lambda: tmp_path)
    torch_build(monkeypatch, None, False)
    fix = doctor.check_cuda(DriverInfo(found=False), required=True).fix
    assert f"-m pip install -r {tmp_path / 'requirements' / 'lock-cuda.txt'}" in fix


def test_torch_check_names_build_cudnn_and_nccl(monkeypatch):
    torch_build(monkeypatch, "12.6", False)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90501)
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 26, 2))
    check = doctor.check_torch()
    assert "CUDA 12.6 build" in check.detail and "cuDNN 90501" in check.detail and "NCCL 2.26.2" in check.detail
    torch_build(monkeypatch, None, False)
    assert "CPU-only build" in doctor.check_torch().detail


def test_torch_other_than_the_lock_warns(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.12.1+cpu")
    check = doctor.check_torch()
    assert check.status == "warn" and "pins torch==2.13.0" in check.detail
    assert "pip install -r" in check.fix and "lock.txt" in check.fix


# --- the driver -------------------------------------------------------------------------------


def test_driver_table_matches_the_cuda_release_notes():
    table = doctor.DRIVER_FOR_CUDA
    assert table["11.8"] == "520.61.05" and table["12.1"] == "530.30.02" and table["12.4"] == "550.54.14"
    assert table["12.6"] == "560.28.03" and table["12.8"] == "570.26" and table["13.0"] == "580.65.06"
    assert doctor.driver_floor("12.8") == ("570.26", True)
    assert doctor.driver_floor("12.7") == ("560.28.03", False)  # unknown release: a lower bound
    assert doctor.driver_floor("10.2") == (None, False)


def test_no_driver_fails_with_the_minimum_driver_to_install(monkeypatch):
    torch_build(monkeypatch, "12.8", False)
    no_nvidia_smi(monkeypatch)
    driver = doctor.probe_driver()
    assert driver == DriverInfo(found=False)
    cuda = doctor.check_cuda(driver, required=True)
    assert cuda.status == "fail" and "no NVIDIA driver" in cuda.detail and ">= 570.26" in cuda.fix
    check = doctor.check_driver(driver, required=True)
    assert check.status == "fail" and "nvidia-smi" in check.detail and "--gpus all" in check.fix


def test_nvidia_smi_is_queried_with_a_timeout(monkeypatch):
    calls = fake_nvidia_smi(monkeypatch, "560.35.03, NVIDIA A100-SXM4-80GB\n560.35.03, NVIDIA A100-SXM4-80GB\n")
    driver = doctor.probe_driver()
    assert driver.version == "560.35.03" and driver.gpus == ("NVIDIA A100-SXM4-80GB",) * 2
    assert "--query-gpu=driver_version,name" in calls[0]["args"] and "--format=csv,noheader" in calls[0]["args"]
    assert 0 < calls[0]["timeout"] <= 30


def test_broken_driver_is_reported_with_nvidia_smis_own_words(monkeypatch):
    torch_build(monkeypatch, "12.6", False)
    said = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    fake_nvidia_smi(monkeypatch, said + "\nMake sure that the latest NVIDIA driver is installed.\n", returncode=9)
    driver = doctor.probe_driver()
    assert driver.found and not driver.working and driver.error == said
    check = doctor.check_driver(driver, required=True)
    assert check.status == "fail" and said in check.detail and "reboot" in check.fix and "modprobe" in check.fix
    assert "not working" in doctor.check_cuda(driver, required=True).detail


def test_hung_nvidia_smi_does_not_hang_the_doctor(monkeypatch):
    fake_nvidia_smi(monkeypatch, raises=subprocess.TimeoutExpired("nvidia-smi", 15))
    driver = doctor.probe_driver()
    assert not driver.working and "did not answer" in (driver.error or "")


def test_driver_too_old_for_the_wheels_cuda(monkeypatch):
    torch_build(monkeypatch, "12.8", False)
    fake_nvidia_smi(monkeypatch, "470.82.01, Tesla T4\n")
    driver = doctor.probe_driver()
    cuda = doctor.check_cuda(driver, required=True)
    assert cuda.status == "fail" and "470.82.01 is older than 570.26" in cuda.detail
    assert "upgrade the NVIDIA driver to >= 570.26" in cuda.fix
    check = doctor.check_driver(driver, required=True)
    assert check.status == "fail" and "CUDA 12.8" in check.detail and ">= 570.26" in check.fix


def test_driver_in_minor_version_compatibility_only_warns(monkeypatch):
    torch_build(monkeypatch, "12.8", True)
    check = doctor.check_driver(DriverInfo(found=True, version="550.54.14", gpus=("NVIDIA A10",)), required=True)
    assert check.status == "warn" and "minor-version compatibility" in check.detail
    # CUDA 13 needs the R580 branch: there is no compatibility mode below it.
    torch_build(monkeypatch, "13.0", False)
    check = doctor.check_driver(DriverInfo(found=True, version="575.57.08", gpus=("NVIDIA H100",)), required=True)
    assert check.status == "fail" and ">= 580.65.06" in check.fix


def test_new_enough_driver_is_ok(monkeypatch):
    torch_build(monkeypatch, "12.6", True)
    check = doctor.check_driver(DriverInfo(found=True, version="560.35.03", gpus=("NVIDIA L4",)), required=True)
    assert check.status == "ok" and "needs >= 560.28.03" in check.detail


# --- CUDA_VISIBLE_DEVICES ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "-1", "none", "NoDevFiles"])
def test_cuda_visible_devices_hiding_everything(monkeypatch, value):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    torch_build(monkeypatch, "12.6", False)
    driver = DriverInfo(found=True, version="560.35.03", gpus=("NVIDIA L4",))
    cuda = doctor.check_cuda(driver, required=True)
    assert cuda.status == "fail" and "CUDA_VISIBLE_DEVICES" in cuda.detail
    check = doctor.check_visible_devices(driver, required=True)
    assert check.status == "fail" and "hides every GPU" in check.detail
    assert "unset CUDA_VISIBLE_DEVICES" in check.fix
    assert doctor.check_visible_devices(driver, required=False).status == "warn"


def test_visible_devices_follows_cudas_parsing():
    assert doctor.visible_devices("0,1", 2) == 2
    assert doctor.visible_devices("1", 1) == 0  # index past the last GPU
    assert doctor.visible_devices("0,5,1", 4) == 1  # CUDA stops at the first invalid entry
    assert doctor.visible_devices("GPU-8a4c", None) is None
    assert doctor.visible_devices(" -1 ", None) == 0


def test_torchs_own_warning_is_the_reason_of_last_resort(monkeypatch):
    torch_build(monkeypatch, "12.6", False)

    def unavailable() -> bool:
        import warnings

        warnings.warn("CUDA initialization: Unexpected error from cudaGetDeviceCount(). Error 802", stacklevel=1)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", unavailable)
    check = doctor.check_cuda(DriverInfo(found=True, version="560.35.03", gpus=("NVIDIA H100",)), required=True)
    assert check.status == "fail" and "Error 802" in check.detail and "torch.cuda.init()" in check.fix


# --- GPUs ---------------------------------------------------------------------------------------


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int], memory_gib: float, arch: list[str],
             bf16: bool = True, busy: bool = False) -> None:
    props = types.SimpleNamespace(name=name, major=capability[0], minor=capability[1],
                                  total_memory=int(memory_gib * GIB))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    real_ones = torch.ones

    def ones(*args, device=None, **kwargs):
        if device is not None and str(device).startswith("cuda"):
            if busy:
                raise RuntimeError("CUDA error: CUDA-capable device(s) is/are busy or unavailable")
            return real_ones(*args, **kwargs)
        return real_ones(*args, device=device, **kwargs)

    monkeypatch.setattr(torch, "ones", ones)


def test_gpu_capabilities_are_reported(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0), 80, ["sm_70", "sm_80", "sm_90"])
    [check] = doctor.check_gpus()
    assert check.status == "ok" and "NVIDIA A100-SXM4-80GB, 80.0 GiB" in check.detail
    assert "compute capability 8.0" in check.detail
    assert "bf16 yes" in check.detail and "TF32 yes" in check.detail and "Tensor Cores yes" in check.detail
    fake_gpu(monkeypatch, "Tesla T4", (7, 5), 15, ["sm_75", "sm_80"], bf16=False)
    [check] = doctor.check_gpus()
    assert "bf16 no" in check.detail and "TF32 no" in check.detail and "Tensor Cores yes" in check.detail
    assert doctor.amp_mode("cuda") == "fp16"  # no native bf16: fp16 + GradScaler


def test_gpu_without_kernels_in_this_build(monkeypatch):
    no_nvidia_smi(monkeypatch)
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 5090", (12, 0), 32, ["sm_50", "sm_80", "sm_90"])
    [check] = doctor.check_gpus()
    assert check.status == "fail" and "sm_120" in check.detail and "sm_90" in check.detail
    assert "supports sm_120" in check.fix and "--index-url https://download.pytorch.org/whl/" in check.fix
    # Training on the CPU does not need that GPU: a warning, not a failure.
    assert doctor.check_gpus(required=False)[0].status == "warn"


def test_arch_compatibility_rules():
    assert doctor.arch_supported((8, 6), ["sm_80"])  # same major, newer minor: cubin runs
    assert not doctor.arch_supported((7, 5), ["sm_80", "sm_90"])
    assert not doctor.arch_supported((12, 0), ["sm_80", "sm_90"])
    assert doctor.arch_supported((12, 0), ["sm_90", "compute_90"])  # PTX is JIT-compiled forward
    assert not doctor.arch_supported((8, 0), ["compute_90"])  # ... never backward
    assert doctor.arch_supported((9, 0), ["sm_90a"]) and not doctor.arch_supported((9, 1), ["sm_90a"])
    assert doctor.arch_supported((10, 0), ["sm_100"])


def test_busy_gpu(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0), 80, ["sm_90"], busy=True)
    [check] = doctor.check_gpus()
    assert check.status == "fail" and "busy or unavailable" in check.detail
    assert "nvidia-smi -i 0 -c DEFAULT" in check.fix


# --- smoke tests --------------------------------------------------------------------------------


def test_amp_smoke_runs_bf16_on_cpu():
    check = doctor.check_amp("cpu")
    assert check.name == "amp smoke (bf16)" and check.status == "ok", check
    assert "loss" in check.detail and "finite" in check.detail


def test_amp_smoke_catches_non_finite_loss(monkeypatch):
    monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy_with_logits",
                        lambda logits, y: logits.sum() * float("nan"))
    check = doctor.check_amp("cpu")
    assert check.status == "fail" and "not finite" in check.detail and "train.amp=off" in check.fix


def test_amp_smoke_notices_autocast_doing_nothing(monkeypatch):
    from recforge.train import trainer

    monkeypatch.setattr(trainer, "autocast_context", lambda amp, device: contextlib.nullcontext())
    check = doctor.check_amp("cpu")
    assert check.status == "warn" and "torch.float32, not torch.bfloat16" in check.detail


def test_ddp_smoke_gloo_for_real():
    check = doctor.check_ddp("cpu")
    assert check.name == "ddp smoke (gloo)" and check.status == "ok", check
    assert not dist.is_initialized()  # torn down again


def test_ddp_smoke_reports_a_failed_rendezvous(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("The client socket has failed to connect to 127.0.0.1 (errno: 111 - Connection refused).")

    monkeypatch.setattr(dist, "init_process_group", refuse)
    check = doctor.check_ddp("cpu")
    assert check.status == "fail" and "Connection refused" in check.detail and "127.0.0.1" in check.fix


# --- NCCL / gloo environment ----------------------------------------------------------------------


IFACES = ["lo", "eth0", "eth1", "docker0"]


@pytest.mark.parametrize(("spec", "picked", "unmatched"), [
    ("eth", ["eth0", "eth1"], []),  # prefix match by default
    ("=eth", [], ["eth"]),  # exact match
    ("=eth1", ["eth1"], []),
    ("^docker,lo", ["eth0", "eth1"], []),  # exclusion
    ("^=eth0", ["lo", "eth1", "docker0"], []),
    ("ib0,eth0", ["eth0"], ["ib0"]),
    ("eth0:1234", ["eth0"], []),
])
def test_nccl_ifname_rules(spec, picked, unmatched):
    assert doctor.nccl_ifname_selects(spec, IFACES) == (picked, unmatched)


def fake_interfaces(monkeypatch, names: list[str]) -> None:
    monkeypatch.setattr(socket, "if_nameindex", lambda: list(enumerate(names, start=1)))


def test_nccl_socket_ifname_naming_a_missing_interface(monkeypatch):
    fake_interfaces(monkeypatch, ["lo", "ens5"])
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    [check] = doctor.check_nccl_env(required=True)
    assert check.status == "fail" and "selects no interface" in check.detail and "lo, ens5" in check.detail
    assert "NCCL_SOCKET_IFNAME=ens5" in check.fix
    assert doctor.check_nccl_env(required=False)[0].status == "warn"
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "^lo,ens")  # excludes everything there is
    assert doctor.check_nccl_env(required=True)[0].status == "fail"
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "en")  # prefix of ens5
    assert doctor.check_nccl_env(required=True)[0] == Check("NCCL_SOCKET_IFNAME", "ok", "'en' selects ens5")


def test_nccl_ib_disable_and_debug_values(monkeypatch):
    monkeypatch.setenv("NCCL_IB_DISABLE", "yes")
    monkeypatch.setenv("NCCL_DEBUG", "verbose")
    ib, debug = doctor.check_nccl_env(required=True)
    assert ib.status == "warn" and "not 0 or 1" in ib.detail and "NCCL_IB_DISABLE=1" in ib.fix
    assert debug.status == "warn" and "VERSION, WARN, INFO, TRACE, ABORT" in debug.detail
    assert "NCCL_DEBUG=INFO" in debug.fix
    monkeypatch.setenv("NCCL_IB_DISABLE", "1")
    monkeypatch.setenv("NCCL_DEBUG", "info")  # NCCL compares case-insensitively
    assert [c.status for c in doctor.check_nccl_env(required=True)] == ["ok", "ok"]


def test_gloo_socket_ifname_naming_a_missing_interface(monkeypatch):
    fake_interfaces(monkeypatch, ["lo", "eth0"])
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0")
    [check] = doctor.check_nccl_env(required=False)
    assert check.status == "fail" and "ib0" in check.detail and "GLOO_SOCKET_IFNAME=eth0" in check.fix


# --- Java (Spark preparation) -------------------------------------------------------------------------


def fake_java_home(tmp_path: Path, first_line: str) -> Path:
    """A JAVA_HOME whose bin/java prints `first_line` to stderr, as `java -version` does."""
    java = tmp_path / "jdk" / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text(f"#!/bin/sh\necho '{first_line}' >&2\n")
    java.chmod(0o755)
    return java.parent.parent


def test_java_17_is_ok(tmp_path, monkeypatch):
    monkeypatch.setenv("JAVA_HOME", str(fake_java_home(tmp_path, 'openjdk version "17.0.15" 2025-04-15')))
    check = doctor.check_java()
    assert (check.name, check.status) == ("java", "ok") and "Java 17" in check.detail and "17.0.15" in check.detail


@pytest.mark.parametrize("java", ["old", "absent"])
def test_missing_or_old_java_only_warns_and_names_the_package(tmp_path, monkeypatch, java):
    if java == "old":
        monkeypatch.setenv("JAVA_HOME", str(fake_java_home(tmp_path, 'openjdk version "11.0.22" 2024-01-16')))
    else:
        monkeypatch.setenv("JAVA_HOME", str(tmp_path))  # no bin/java under it
    check = doctor.check_java()
    assert check.status == "warn" and "needs Java 17+" in check.detail
    assert ("Java 11" in check.detail) == (java == "old")
    assert "openjdk-17-jre-headless" in check.fix and "JAVA_HOME" in check.fix
    # The local engine, training and serving need no Java: the report stays healthy.
    monkeypatch.setattr(doctor, "check_amp", lambda device: Check("amp", "ok", ""))
    monkeypatch.setattr(doctor, "check_ddp", lambda device: Check("ddp", "ok", ""))
    report = doctor.run_doctor("cpu")
    assert report.ok and {c.name: c.status for c in report.checks}["java"] == "warn"


# --- the whole report -------------------------------------------------------------------------------


def test_healthy_cuda_machine_runs_cuda_smoke_tests(monkeypatch):
    torch_build(monkeypatch, "12.6", True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    fake_nvidia_smi(monkeypatch, "560.35.03, NVIDIA L4\n")
    smoked: list[str] = []
    monkeypatch.setattr(doctor, "check_gpus", lambda required: [Check("gpu 0", "ok", "NVIDIA L4")])
    monkeypatch.setattr(doctor, "check_amp", lambda device: smoked.append(f"amp {device}") or Check("amp", "ok", ""))
    monkeypatch.setattr(doctor, "check_ddp", lambda device: smoked.append(f"ddp {device}") or Check("ddp", "ok", ""))
    report = doctor.run_doctor("auto")
    assert report.device == "cuda" and report.ok, report.failures
    assert smoked == ["amp cpu", "ddp cpu", "amp cuda", "ddp cuda"]
    assert [c.name for c in report.checks][:4] == ["python", "torch", "cpu", "cuda"]


def test_cuda_request_fails_on_a_cpu_build_and_names_it(monkeypatch):
    torch_build(monkeypatch, None, False)
    no_nvidia_smi(monkeypatch)
    report = doctor.run_doctor("cuda")
    assert not report.ok and report.device == "cuda"
    assert report.reason is not None and report.reason.name == "cuda" and "CPU-only" in report.reason.detail
    assert not any(c.name == "ddp smoke (nccl)" for c in report.checks)
    auto = doctor.run_doctor("auto")
    assert auto.device == "cpu" and auto.ok


def test_warnings_do_not_fail_and_a_crashing_probe_is_reported(monkeypatch):
    monkeypatch.setenv("NCCL_DEBUG", "loud")

    def broken() -> Check:
        raise OSError("no /proc here")

    monkeypatch.setattr(doctor, "check_cpu", broken)
    report = doctor.run_doctor("cpu")
    by_name = {c.name: c for c in report.checks}
    assert by_name["NCCL_DEBUG"].status == "warn"
    assert by_name["cpu"].status == "fail" and "no /proc here" in by_name["cpu"].detail
    assert not report.ok and report.reason == by_name["cpu"]
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        doctor.run_doctor("gpu")


def test_json_mode_keeps_stdout_clean(capfd):
    with doctor._stdout_to_stderr():
        print("from python")
        os.write(1, b"from C\n")
    out, err = capfd.readouterr()
    assert out == "" and "from python" in err and "from C" in err


def test_human_report_prints_the_table_then_the_fixes(capsys):
    report = doctor.DoctorReport("cuda", "cuda", (
        Check("torch", "ok", "torch 2.13.0+cpu (CPU-only build)"),
        Check("cuda", "fail", "not available: CPU-only build", "pip install 'torch==2.13.0+cu126' --index-url X"),
    ))
    doctor._print_report(report)
    out = capsys.readouterr().out
    assert "recforge doctor: cuda" in out and "CPU-only build" in out
    assert out.index("fixes:") > out.index("torch 2.13.0+cpu")
    assert "cuda (fail): pip install 'torch==2.13.0+cu126' --index-url X" in out


def test_doctor_module_does_not_import_torch():
    code = "import sys, recforge.doctor; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# --- the real command on this machine ---------------------------------------------------------------


def _recforge() -> list[str]:
    script = Path(sys.executable).with_name("recforge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "recforge.cli"]


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    return subprocess.run([*_recforge(), "doctor", *args], capture_output=True, text=True, timeout=120, env=env)


def test_cli_cpu_is_healthy_here():
    proc = _doctor("--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert report["ok"] is True and report["device"] == "cpu"
    assert report["env"]["torch"] == str(torch.__version__)
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses["ddp smoke (gloo)"] == "ok" and statuses["amp smoke (bf16)"] == "ok"
    assert statuses["java"] in ("ok", "warn")  # Spark's Java is reported, never a failure
    assert set(report["checks"][0]) == {"name", "status", "detail", "fix"}


@pytest.mark.skipif(torch.version.cuda is not None, reason="names the CPU-only build; this torch is a CUDA build")
def test_cli_cuda_fails_here_and_names_the_cpu_build():
    proc = _doctor("--device", "cuda", "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    cuda = next(c for c in report["checks"] if c["name"] == "cuda")
    assert cuda["status"] == "fail" and f"torch {torch.__version__} is a CPU-only build" in cuda["detail"]
    assert f"'torch=={TORCH_BASE}+cu" in cuda["fix"]
    assert "--index-url https://download.pytorch.org/whl/cu" in cuda["fix"]
    assert f"error: not ready for cuda training: cuda: not available: torch {torch.__version__}" in proc.stderr
