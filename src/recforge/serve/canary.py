"""Canary health: error rate and p99 latency over a sliding time window, and the breach decision.

Kept free of HTTP and of the registry: the server feeds observations in and asks `breach()`; what
to do about a breach (roll the alias back, stop routing) is the caller's business.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class CanaryThresholds:
    window_s: float
    min_requests: int
    max_error_rate: float
    max_p99_ms: float


@dataclass(frozen=True)
class CanaryStats:
    requests: int
    errors: int
    error_rate: float
    p99_ms: float


class CanaryMonitor:
    """Observations of one canary version; thread-safe (model threads and the event loop both report)."""

    def __init__(self, thresholds: CanaryThresholds, clock: Callable[[], float] = time.monotonic) -> None:
        self.thresholds = thresholds
        self._clock = clock
        self._obs: deque[tuple[float, bool, float]] = deque()
        self._lock = threading.Lock()

    def observe(self, ok: bool, latency_s: float) -> None:
        now = self._clock()
        with self._lock:
            self._obs.append((now, ok, latency_s))
            self._trim(now)

    def _trim(self, now: float) -> None:
        horizon = now - self.thresholds.window_s
        while self._obs and self._obs[0][0] < horizon:
            self._obs.popleft()

    def stats(self) -> CanaryStats:
        with self._lock:
            self._trim(self._clock())
            obs = [(ok, latency) for _, ok, latency in self._obs]
        return window_stats(obs)

    def breach(self) -> str | None:
        """Why the canary must go (a sentence for the registry history), or None while it is healthy."""
        return breach_reason(self.stats(), self.thresholds)


def window_stats(observations: list[tuple[bool, float]]) -> CanaryStats:
    """Requests, errors and p99 latency of a window's (ok, latency_s) outcomes."""
    if not observations:
        return CanaryStats(0, 0, 0.0, 0.0)
    errors = sum(1 for ok, _ in observations if not ok)
    p99 = float(np.percentile(np.array([lat for _, lat in observations]), 99)) * 1000.0
    return CanaryStats(len(observations), errors, errors / len(observations), p99)


def breach_reason(s: CanaryStats, t: CanaryThresholds) -> str | None:
    """The breach decision on a window, one replica's or every replica's: a sentence, or None while healthy."""
    if s.requests < t.min_requests:
        return None
    if s.error_rate > t.max_error_rate:
        return (f"canary error rate {s.error_rate:.1%} ({s.errors}/{s.requests} requests in {t.window_s:g}s) "
                f"exceeds {t.max_error_rate:.1%}")
    if s.p99_ms > t.max_p99_ms:
        return (f"canary p99 latency {s.p99_ms:.1f} ms over {s.requests} requests in {t.window_s:g}s exceeds "
                f"{t.max_p99_ms:g} ms")
    return None


class SharedCanaryBoard(Protocol):
    """Canary windows kept for every replica (serve/redis_state.py): outcomes in, global decisions out."""

    def observe(self, kind: str, version: int, ok: bool, latency_s: float) -> None: ...

    def sync(self, thresholds: CanaryThresholds) -> tuple[dict[tuple[str, int], str], list[tuple[str, int, str]]]:
        """(every banned version with its reason, the breaches this replica claimed and must roll back)."""

    def stats(self, window_s: float) -> dict[str, Any]: ...


class CanaryGuard:
    """Every canary version's monitor, and the decision to take one out of rotation.

    A breached version is banned here at once (routing stops sending users to it before the registry
    has moved), and handed out for rollback exactly once however many requests see the breach.

    With a `shared` board (several replicas on one Redis) the windows are global: a request's outcome
    goes to the board, and the decision comes from `sync()`, which the server calls every
    CANARY_SYNC_S; every replica bans what the board says is banned, and only the replica that claimed
    a breach rolls it back.
    """

    def __init__(self, thresholds: CanaryThresholds, shared: SharedCanaryBoard | None = None) -> None:
        self.thresholds = thresholds
        self.shared = shared
        self._lock = threading.Lock()
        self._monitors: dict[tuple[str, int], CanaryMonitor] = {}
        self._banned: set[tuple[str, int]] = set()
        self._rolling_back: set[tuple[str, int]] = set()

    def is_banned(self, kind: str, version: int) -> bool:
        return (kind, version) in self._banned

    def observe(self, canaries: list[tuple[str, int]], ok: bool, latency_s: float) -> list[tuple[str, int, str]]:
        """Record one request served by these canary versions; returns the (kind, version, reason) breaches
        that need a rollback now (with a shared board: none here, they come from sync())."""
        if self.shared is not None:
            for kind, version in canaries:
                self.shared.observe(kind, version, ok, latency_s)
            return []
        breaches = []
        for kind, version in canaries:
            with self._lock:
                monitor = self._monitors.setdefault((kind, version), CanaryMonitor(self.thresholds))
            monitor.observe(ok, latency_s)
            reason = monitor.breach()
            if reason is None:
                continue
            with self._lock:
                if (kind, version) in self._rolling_back or (kind, version) in self._banned:
                    continue
                self._rolling_back.add((kind, version))
                self._banned.add((kind, version))
            breaches.append((kind, version, reason))
        return breaches

    def rolled_back(self, kind: str, version: int) -> None:
        """The rollback of a breached version has been tried; it stays banned in this process."""
        with self._lock:
            self._rolling_back.discard((kind, version))

    def sync(self) -> list[tuple[str, int, str]]:
        """With a shared board: adopt its bans, and return the breaches this replica claimed (to roll back)."""
        if self.shared is None:
            return []
        banned, claimed = self.shared.sync(self.thresholds)
        with self._lock:
            self._banned.update(banned)
            claimed = [c for c in claimed if (c[0], c[1]) not in self._rolling_back]
            self._rolling_back.update((kind, version) for kind, version, _ in claimed)
        return claimed

    def stats(self) -> dict[str, Any]:
        if self.shared is not None:
            return self.shared.stats(self.thresholds.window_s)
        with self._lock:
            monitors = dict(self._monitors)
        return {f"{k}:{v}": m.stats().__dict__ for (k, v), m in monitors.items()}
