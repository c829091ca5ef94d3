"""Runtime helpers: environment drift, device choice, free ports, allocator tuning."""

from __future__ import annotations

import socket

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
