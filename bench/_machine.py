"""The machine a benchmark ran on, printed with its numbers: figures are compared only within one CPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu() -> str:
    """CPU model, core count and the vector extensions that change the speed of fp32 / bf16 kernels."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.processor() or 'unknown CPU'} ({os.cpu_count()} cores)"
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} ({os.cpu_count()} cores; {' '.join(wanted) or 'no avx2'})"
