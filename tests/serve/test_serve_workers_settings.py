"""Settings for several server processes: cores shared out among workers, and a poll the workers follow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recforge.serve.settings import ServeSettings


def test_model_threads_share_the_cores_among_workers_unless_set() -> None:
    cores = os.cpu_count() or 1
    assert ServeSettings.load({"registry": "r"}, environ={}).model_threads == min(2, cores)
    assert ServeSettings.load({"registry": "r", "workers": 2}, environ={}).model_threads == min(2, max(1, cores // 2))
    assert ServeSettings.load({"registry": "r", "workers": 64}, environ={}).model_threads == 1
    explicit = ServeSettings.load({"registry": "r", "model_threads": 3}, environ={"RECFORGE_SERVE_WORKERS": "4"})
    assert (explicit.workers, explicit.model_threads) == (4, 3)


def test_workers_need_a_registry_poll_to_follow_each_other() -> None:
    with pytest.raises(ValueError, match="poll_interval_s: .*must be > 0 with workers=2"):
        ServeSettings.load({"registry": "r", "workers": 2, "poll_interval_s": 0}, environ={})
    assert ServeSettings.load({"registry": "r", "workers": 1, "poll_interval_s": 0}, environ={}).workers == 1


def test_worker_processes_rebuild_the_same_settings_from_json() -> None:
    settings = ServeSettings.load({"registry": "r", "workers": 2, "max_k": 50}, environ={"RECFORGE_ADMIN_TOKEN": "t"})
    assert ServeSettings.model_validate_json(settings.model_dump_json()) == settings


def test_the_supervisor_waits_worker_healthcheck_timeout_s_and_gets_a_state_dir(monkeypatch: pytest.MonkeyPatch,
                                                                                  tmp_path: Path) -> None:
    """uvicorn's default (5 s) killed workers that were still loading their models on a busy machine."""
    import uvicorn.supervisors
    from uvicorn.supervisors import multiprocess

    from recforge.serve import app
    from recforge.serve.workers import STATE_DIR_ENV, WorkerProcess

    seen: dict[str, object] = {}

    class Supervisor:
        def __init__(self, config: object, sockets: list[object]) -> None:
            seen["timeout"] = config.timeout_worker_healthcheck  # type: ignore[attr-defined]

        def run(self) -> None:
            seen["state_dir"] = Path(os.environ[STATE_DIR_ENV])
            seen["is_dir"] = seen["state_dir"].is_dir()  # type: ignore[union-attr]

    monkeypatch.setattr(uvicorn.supervisors, "Multiprocess", Supervisor)
    monkeypatch.setattr(multiprocess, "Process", multiprocess.Process)  # restored after the test
    for name in (STATE_DIR_ENV, app.WORKER_SETTINGS_ENV):
        monkeypatch.delenv(name, raising=False)
    settings = ServeSettings.load({"registry": str(tmp_path), "workers": 2, "port": 0},
                                  environ={"RECFORGE_SERVE_WORKER_HEALTHCHECK_TIMEOUT_S": "90"})
    app._run_workers(settings)
    assert seen["timeout"] == 90 and seen["is_dir"] and not seen["state_dir"].exists()  # type: ignore[union-attr]
    assert multiprocess.Process is WorkerProcess
    assert ServeSettings.load({"registry": "r"}, environ={}).worker_healthcheck_timeout_s == 60
