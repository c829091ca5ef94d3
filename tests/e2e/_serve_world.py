"""A tiny trained world in a local registry, and the real `recforge serve` process, for the serve tests.

The world is built once per test session (the first caller builds it under the session's base temp
directory, later callers reuse it) through the real CLI: generate -> prepare -> train dnn and
two_tower -> export -> publish -> promote production.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx
import pytest
import torch
from _cli import _recforge, run

from recforge.runtime import die_with_parent, free_port

WORLD = ["data.generate.users=800", "data.generate.items=300", "data.generate.events=12000",
         "data.generate.days=6", "train.epochs=1", "train.batch_size=512", "train.progress=false"]
TOKEN = "test-admin-token"


@dataclass(frozen=True)
class World:
    root: Path
    bundles: Path  # dnn/, tt/, failing/
    known_users: list[int]  # users both models know
    items: list[int]  # raw item ids of the catalog

    def registry_copy(self, dest: Path) -> Path:
        shutil.copytree(self.root / "registry", dest)
        return dest


class _Failing(torch.nn.Module):
    """The real ranker, except that it raises for every known user: a model broken on real traffic that still
    passes export parity and warm-up (both use unknown-user rows)."""

    def __init__(self, inner: torch.jit.ScriptModule, user_col: int) -> None:
        super().__init__()
        self.inner = inner
        self.user_col = user_col

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor,
                history_values: Optional[torch.Tensor] = None,  # noqa: UP045 - TorchScript needs Optional
                history_offsets: Optional[torch.Tensor] = None) -> torch.Tensor:  # noqa: UP045
        if bool((categorical[:, self.user_col] > 0).any()):
            raise RuntimeError("injected inference failure")
        return self.inner(categorical, numeric, history_values, history_offsets)


def _failing_bundle(dnn: Path, out: Path) -> Path:
    from recforge.bundle import write_bundle

    features = json.loads((dnn / "features.json").read_text())
    model = _Failing(torch.jit.load(str(dnn / "model.pt")), features["roles"].index("user"))
    parity = (torch.zeros(2, len(features["categorical"]), dtype=torch.long), torch.zeros(2, len(features["numeric"])),
              None, None)
    return write_bundle(model, out, model_name="dnn", features=features, vocab_dir=dnn / "vocab",
                        config=json.loads((dnn / "config.json").read_text()), metrics={}, data_fingerprint={},
                        parity_inputs=parity)


def _build(root: Path) -> None:
    # Data and training run in-process (the CLI's own tests cover those commands); the bundles are made by
    # the real `recforge export`, as an operator would.
    from recforge import config
    from recforge import registry as reg
    from recforge.recipes.generate import generate
    from recforge.recipes.prepare import prepare_data
    from recforge.recipes.train import train_model

    work = root / "work"
    work.mkdir(parents=True)
    common = [f"workdir={work}", *WORLD]
    generate(config.load(None, common))
    prepare_data(config.load(None, common))
    train_model(config.load(None, [*common, f"run_dir={work / 'dnn'}"]), log=lambda _: None)
    train_model(config.load(None, [*common, "model.name=two_tower", f"run_dir={work / 'tt'}"]),
                     log=lambda _: None)
    bundles = root / "bundles"
    for name in ("dnn", "tt"):
        run("export", "--run", str(work / name), "--out", str(bundles / name), cwd=work)
    _failing_bundle(bundles / "dnn", bundles / "failing")
    for model, bundle in (("retrieval", "tt"), ("ranker", "dnn")):
        version = reg.publish(root / "registry", bundles / bundle, model)
        reg.promote(root / "registry", model, version, reason="first")
    users = [json.loads((bundles / b / "vocab" / "user_id.json").read_text())["keys"] for b in ("dnn", "tt")]
    known = sorted(set(users[0]) & set(users[1]), key=int)
    items = json.loads((bundles / "tt" / "vocab" / "item_id.json").read_text())["keys"]
    (root / "world.json").write_text(json.dumps({"known_users": [int(u) for u in known],
                                                 "items": [int(i) for i in items]}))


def serve_world(factory: pytest.TempPathFactory) -> World:
    """The session's world, built by whoever asks first (a file lock makes concurrent askers wait)."""
    root = factory.getbasetemp() / "serve-world"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(str(root) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "world.json").is_file():
            shutil.rmtree(root, ignore_errors=True)
            _build(root)
    meta = json.loads((root / "world.json").read_text())
    return World(root, root / "bundles", meta["known_users"], meta["items"])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    args: list[str]
    env: dict[str, str]

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, timeout=30.0, headers=headers)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_server(registry: Path, events_dir: Path, log: Path, *extra: str, token: str | None = TOKEN,
                 env: dict[str, str] | None = None, ready_timeout: float = 60.0) -> Server:
    """`recforge serve` on a free 127.0.0.1 port; returns once /readyz says the models are loaded."""
    port = free_port()
    args = ["serve", "--registry", str(registry), "--port", str(port), "--events-dir", str(events_dir), *extra]
    full_env = {**os.environ, "RECFORGE_DEBUG": "", **(env or {})}
    full_env.pop("RECFORGE_ADMIN_TOKEN", None)
    if token:
        full_env["RECFORGE_ADMIN_TOKEN"] = token
    handle = open(log, "ab")  # noqa: SIM115 - the child writes to it for its whole life
    proc = subprocess.Popen([*_recforge(), *args], stdout=handle, stderr=subprocess.STDOUT, env=full_env,
                            preexec_fn=die_with_parent)
    handle.close()
    server = Server(proc, f"http://127.0.0.1:{port}", log, args, full_env)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"recforge serve exited {proc.returncode}:\n{server.output()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/readyz", timeout=2.0).status_code == 200:
                return server
        time.sleep(0.1)
    server.stop()
    raise AssertionError(f"recforge serve was not ready in {ready_timeout}s:\n{server.output()}")


@contextlib.contextmanager
def serving(*args: object, **kwargs: object) -> Iterator[Server]:
    server = start_server(*args, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()
