"""Server parts without a server: canary breach rules, micro-batching, settings precedence, per-user memory."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from recforge.serve.batching import MicroBatcher
from recforge.serve.canary import CanaryMonitor, CanaryThresholds
from recforge.serve.inference import typed_id
from recforge.serve.settings import ServeSettings
from recforge.serve.user_state import MemoryUserState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _monitor(clock: Clock) -> CanaryMonitor:
    return CanaryMonitor(CanaryThresholds(window_s=60, min_requests=10, max_error_rate=0.2, max_p99_ms=100),
                         clock=clock)


def test_canary_needs_a_minimum_of_requests_then_breaches_on_error_rate() -> None:
    clock = Clock()
    monitor = _monitor(clock)
    for _ in range(9):
        monitor.observe(False, 0.001)
    assert monitor.breach() is None  # 9 < min_requests, however bad
    monitor.observe(True, 0.001)
    reason = monitor.breach()
    assert reason is not None and "error rate 90.0% (9/10" in reason


def test_canary_breaches_on_p99_latency_and_forgets_outside_the_window() -> None:
    clock = Clock()
    monitor = _monitor(clock)
    for i in range(20):
        monitor.observe(True, 0.5 if i == 0 else 0.01)
    assert "p99 latency" in (monitor.breach() or "")
    clock.now += 61
    assert monitor.stats().requests == 0 and monitor.breach() is None
    for _ in range(20):
        monitor.observe(True, 0.01)
    assert monitor.breach() is None and monitor.stats().p99_ms == pytest.approx(10.0)


def test_micro_batcher_merges_concurrent_requests_and_keeps_per_item_errors() -> None:
    calls: list[list[int]] = []
    gate = threading.Event()

    def double(batch):  # noqa: ANN001, ANN202
        calls.append(list(batch))
        gate.wait(5)
        return [ValueError(f"bad {x}") if x < 0 else 2 * x for x in batch]

    async def main() -> list[object]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(double, pool, max_inflight=1, max_batch=64)
            tasks = [asyncio.ensure_future(batcher.submit(x)) for x in [1, 2, 3, -4, 5]]
            await asyncio.sleep(0.05)
            gate.set()
            return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    assert results[:3] == [2, 4, 6] and results[4] == 10
    assert isinstance(results[3], ValueError) and "bad -4" in str(results[3])
    # The first request went alone (nothing was running); the other four queued behind it as ONE batch.
    assert calls == [[1], [2, 3, -4, 5]]


def test_micro_batcher_fails_the_whole_batch_when_the_call_raises() -> None:
    def broken(batch):  # noqa: ANN001, ANN202
        raise RuntimeError("model exploded")

    async def main() -> list[object]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(broken, pool, max_inflight=1, max_batch=8)
            return await asyncio.gather(*[batcher.submit(x) for x in range(3)], return_exceptions=True)

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(main()))


def test_settings_precedence_flags_over_environment_over_defaults() -> None:
    env = {"RECFORGE_SERVE_MAX_K": "50", "RECFORGE_SERVE_PORT": "9000", "RECFORGE_ADMIN_TOKEN": "t0ken"}
    settings = ServeSettings.load({"registry": "/r", "port": 9100, "host": None}, environ=env)
    assert settings.max_k == 50 and settings.port == 9100 and settings.host == "127.0.0.1"
    assert settings.admin_token == "t0ken" and "t0ken" not in repr(settings)


def test_settings_errors_name_the_setting() -> None:
    with pytest.raises(ValueError, match="RECFORGE_SERVE_MAX_KK"):
        ServeSettings.load({"registry": "/r"}, environ={"RECFORGE_SERVE_MAX_KK": "5"})
    with pytest.raises(ValueError, match="canary_share"):
        ServeSettings.load({"registry": "/r", "canary_share": "2"}, environ={})
    with pytest.raises(ValueError, match="registry"):
        ServeSettings.load({}, environ={})


def test_seen_items_are_bounded_per_user_and_in_users() -> None:
    seen = MemoryUserState(per_user=3, users=2)

    def get(user: int | str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return asyncio.run(seen.get(user))

    seen.add([("impression", 1, i) for i in range(5)] + [("click", 1, 9)])
    assert get(1) == (("3", "4", "9"), ("9",))
    assert get("1") == get(1)
    seen.add([("impression", 2, 1), ("impression", 3, 1)])
    assert get(1) == ((), ())  # least recently active user evicted
    assert get(3) == (("1",), ())


def test_typed_id_restores_json_ints_only_for_canonical_integers() -> None:
    assert typed_id("42") == 42 and typed_id("-7") == -7
    assert typed_id("007") == "007" and typed_id("4.0") == "4.0" and typed_id("u1") == "u1"
    assert typed_id(str(2**64)) == str(2**64)


def test_the_admin_token_comes_from_the_environment_or_a_file_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be given as a flag or --set"):
        ServeSettings.load({"registry": "/r", "admin_token": "s3cret"}, environ={})
    secret = tmp_path / "token"
    secret.write_text("  s3cret\n", encoding="utf-8")
    from_file = ServeSettings.load({"registry": "/r"}, environ={"RECFORGE_ADMIN_TOKEN_FILE": str(secret)})
    assert from_file.admin_token == "s3cret"
    assert ServeSettings.load({"registry": "/r"}, environ={"RECFORGE_ADMIN_TOKEN": "s3cret \n"}).admin_token == "s3cret"
    for blank in ("", "  \n"):
        with pytest.raises(ValueError, match="empty or blank"):
            ServeSettings.load({"registry": "/r"}, environ={"RECFORGE_ADMIN_TOKEN": blank})
    secret.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"the file {secret} is empty or blank"):
        ServeSettings.load({"registry": "/r"}, environ={"RECFORGE_ADMIN_TOKEN_FILE": str(secret)})
    with pytest.raises(ValueError, match="cannot read the admin token"):
        ServeSettings.load({"registry": "/r"}, environ={"RECFORGE_ADMIN_TOKEN_FILE": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="not both"):
        ServeSettings.load({"registry": "/r"}, environ={"RECFORGE_ADMIN_TOKEN": "a",
                                                         "RECFORGE_ADMIN_TOKEN_FILE": str(secret)})
    with pytest.raises(ValueError, match="empty or blank"):
        ServeSettings(registry="/r", admin_token=" \t")
    assert ServeSettings(registry="/r", admin_token="s3cret\n").admin_token == "s3cret"
