"""A real Redis for tests: `redis-server` on 127.0.0.1 with a random port, the append-only file fsynced on
every write (the no-loss setting docs/online-state.md asks for), killed with the test process."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from recforge.runtime import die_with_parent, free_port


class RedisServer:
    def __init__(self, base: Path, password: str | None = None) -> None:
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.log = base / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, decode_responses=True)

    def start(self, timeout: float = 20.0) -> None:
        """Start (or, after kill(), restart on the same port and data: the append-only file is replayed)."""
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is missing: `make test` installs it (tools/ensure_redis.sh)")
        args = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.base), "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no", "--protected-mode", "yes"]
        if self.password:
            args += ["--requirepass", self.password]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.base,
                                         start_new_session=True, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if self.client().ping():
                    return
            except redis.BusyLoadingError:
                pass
            except redis.ConnectionError:
                pass
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"redis-server did not answer in {timeout:.0f}s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    stop = kill
