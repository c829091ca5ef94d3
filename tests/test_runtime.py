"""Runtime helpers: environment drift, device choice, free ports, allocator tuning."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recforge.runtime import choose_device, environment_drift, free_port, tune_allocator


def test_environment_drift_flags_what_changes_results():
    here = {"torch": "2.13.0+cpu", "cuda": None}
    assert environment_drift({"torch": "2.13.1", "cuda": None}, here) == []
    drift = environment_drift({"torch": "2.11.0+cu126", "cuda": "12.6"}, here)
    assert any("torch 2.11.0+cu126" in d for d in drift) and any("CUDA build 12.6" in d for d in drift)


def test_auto_device_says_why():
    choice = choose_device("auto")
    if not torch.cuda.is_available():
        assert choice.device.type == "cpu" and "cpu" in choice.reason.lower()


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_allocator_tuning_reports_what_it_did(monkeypatch):
    import platform

    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    applied = tune_allocator()
    if platform.libc_ver()[0] == "glibc":
        assert applied["tuned"] is True and applied["mmap_max"] == 0
    else:
        assert applied["tuned"] is False and "nothing to tune" in applied["reason"]
    # Settings the user gave in the environment win and are left alone.
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    respected = tune_allocator()
    assert respected["tuned"] is False and "environment" in respected["reason"]


_PARENT = """
import subprocess, sys, time
from recforge.runtime import die_with_parent
child = subprocess.Popen(["sleep", "120"], preexec_fn=die_with_parent)
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for every purpose that matters here.
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\\nState:\\tZ" in status.read_text())


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux only")
def test_a_helper_server_dies_with_its_parent_even_on_sigkill():
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.kill()  # SIGKILL: no cleanup code of the parent runs
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its SIGKILLed parent"
    finally:
        parent.kill()
