"""Settings for several server processes: cores shared out among workers, and a poll the workers follow."""

from __future__ import annotations

import os

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
