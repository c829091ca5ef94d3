"""What both scenarios stand on: a generated world, trained bundles in a registry, a real server process.

The server runs as its own `recforge serve` process and the pipeline as `recforge pipeline run`,
exactly as an operator would start them; only the one-off model building (generate, prepare,
train, export, publish) runs in this process, through the same recforge.recipes functions the CLI verbs
call.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from recforge.runtime import die_with_parent, free_port
from recforge.scenarios.settings import SimulateConfig
from recforge.storage import write_text
from recforge.synthetic.world import World

Log = Callable[[str], None]


def recforge_command() -> list[str]:
    """The `recforge` executable of this interpreter (module form, so it works without an installed script)."""
    return [sys.executable, "-m", "recforge.cli"]


def fresh_workdir(cfg: SimulateConfig) -> Path:
    """The scenario's directory; refuses one an earlier run already filled (its registry would be reused)."""
    root = cfg.root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"workdir {root} is not empty (an earlier simulation?); pass workdir=<new dir> "
                              f"or remove it")
    root.mkdir(parents=True, exist_ok=True)
    return root


def generate_world(cfg: SimulateConfig, log: Log) -> World:
    from recforge.recipes.generate import generate

    train_cfg = cfg.train_config()
    summary = generate(train_cfg)
    log(f"world: {train_cfg.data.generate.users:,} users, {train_cfg.data.generate.items:,} items; offline log "
        f"{summary['rows']:,} events over {summary['days']} days, CTR {summary['ctr']:.3f}")
    return World.load(cfg.root / "raw" / "world")


def prepare(cfg: SimulateConfig, log: Log) -> None:
    from recforge.recipes.prepare import prepare_data

    info, result = prepare_data(cfg.train_config())
    log(f"prepared {result.rows_kept:,} rows into {info.path}")


def train_bundle(cfg: SimulateConfig, name: str, overrides: list[str], log: Log) -> Path:
    """Train on the prepared offline log with `overrides`, export the run as a bundle; returns its directory."""
    from recforge.recipes.export import export_run
    from recforge.recipes.train import train_model

    train_cfg = cfg.train_config([f"run_dir={cfg.root / 'runs' / name}", *overrides])
    started = time.perf_counter()
    result = train_model(train_cfg, log=lambda _: None)
    bundle = Path(export_run(result.run_dir, cfg.root / "bundles" / name))
    log(f"trained {name} ({train_cfg.model.name}{', ' + ' '.join(overrides) if overrides else ''}) "
        f"in {time.perf_counter() - started:.1f}s")
    return bundle


def publish(registry_root: Path, bundle: Path, model: str, alias: str | None, note: str) -> int:
    from recforge import registry

    version = registry.publish(registry_root, bundle, model, note)
    if alias:
        registry.promote(registry_root, model, version, alias=alias, reason=f"recforge simulate: {note}")
    return version


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    url: str
    token: str
    log_path: Path

    def tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def running_server(cfg: SimulateConfig, registry_root: Path, events_dir: Path, log: Log,
                   settings: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """`recforge serve` on a free 127.0.0.1 port with a fresh admin token; stopped (SIGTERM) on exit."""
    port = free_port()
    token = secrets.token_hex(16)
    # The simulated days are a replayed period, not the present: the server takes their event times as sent.
    merged = {"poll_interval_s": "0", "event_max_ahead_s": "inf", "event_max_age_s": "inf", **(settings or {}),
              **cfg.server}
    args = [*recforge_command(), "serve", "--registry", str(registry_root), "--host", "127.0.0.1", "--port",
            str(port), "--events-dir", str(events_dir), *[f"--set={k}={v}" for k, v in merged.items()]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECFORGE_SERVE_")}
    env.update({"RECFORGE_ADMIN_TOKEN": token, "RECFORGE_DEBUG": ""})
    # Experiments live in a file, so admin changes reach every worker when the server runs several.
    experiments = cfg.root / "experiments.yaml"
    if not experiments.exists():
        write_text(experiments, "experiments: []\n")
    args += ["--experiments", str(experiments)]
    log_path = cfg.root / "serve.log"
    with open(log_path, "ab") as handle:
        proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=die_with_parent)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", token, log_path)
    try:
        deadline = time.monotonic() + cfg.ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"recforge serve exited with {proc.returncode} before it was ready; "
                                   f"see {log_path}: {server.tail(3)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/readyz", timeout=2.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"recforge serve was not ready within {cfg.ready_timeout_s:.0f}s "
                                   f"(ready_timeout_s); see {log_path}")
            time.sleep(0.2)
        log(f"server ready at {server.url} (log: {log_path})")
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def pipeline_run(config: Path, overrides: list[str], cwd: Path, log: Log) -> dict[str, Any]:
    """One `recforge pipeline run --config ...`; returns its result JSON (the last stdout line)."""
    args = [*recforge_command(), "pipeline", "run", "--config", str(config), *overrides]
    env = {**os.environ, "RECFORGE_DEBUG": "", "COLUMNS": "120"}
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"recforge pipeline run {' '.join(overrides)} exited {proc.returncode}: {why}")
    return json.loads(lines[-1])


def offline_setup(cfg: SimulateConfig, log: Log, retrieval_note: str) -> tuple[Path, World, Path]:
    """What both scenarios start from: a fresh workdir, the world and its offline log prepared, and the
    two-tower retrieval model trained on it and published as production. Returns (root, world, registry)."""
    root = fresh_workdir(cfg)
    world = generate_world(cfg, log)
    prepare(cfg, log)
    registry = root / "registry"
    retrieval = train_bundle(cfg, "retrieval", cfg.retrieval_overrides, log)
    publish(registry, retrieval, "retrieval", "production", retrieval_note)
    return root, world, registry
