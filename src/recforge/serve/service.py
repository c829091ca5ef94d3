"""The serving state behind the HTTP routes: loaded versions, routing, canary watch, per-user memory.

Everything a request reads is one immutable `Snapshot`; a reload builds (and warms) the next one
beside it and swaps it in with one reference assignment, so a request sees either the old models
or the new ones, never a mix, and nothing in flight fails. Versions that did not change are carried
over, not reloaded, and the old snapshot is released once the last request holding it finishes.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from recforge import registry
from recforge.serve import ab
from recforge.serve.batching import MicroBatcher
from recforge.serve.canary import CanaryMonitor, CanaryThresholds
from recforge.serve.events import EventStore, EventStoreFull, StoredEvent
from recforge.serve.metrics import ServeMetrics
from recforge.serve.models import (
    LoadedModel,
    ModelError,
    Query,
    Ranked,
    RawId,
    encode_items,
    item_key_strings,
    load_model,
    recommend_batch,
    score_items,
    warm_up,
)
from recforge.serve.settings import ServeSettings
from recforge.storage import write_text

log = logging.getLogger("recforge.serve")
KINDS = ("retrieval", "ranker")


class NotReady(RuntimeError):
    """No models are loaded yet (or none could be): the server cannot answer model requests."""


class ConfigRejected(ValueError):
    """An admin request that names something that does not exist (an unknown version or alias)."""


@dataclass(frozen=True)
class Route:
    """Which versions serve one user, and why (experiment assignments, canary)."""

    retrieval: int
    ranker: int
    assignments: dict[str, str]
    canary: frozenset[str]

    @property
    def model_version(self) -> str:
        return f"retrieval:{self.retrieval},ranker:{self.ranker}"

    @property
    def variant(self) -> str:
        """A low-cardinality label for metrics."""
        parts = [f"{e}:{v}" for e, v in sorted(self.assignments.items())]
        if self.canary:
            parts.append("canary")
        return ",".join(parts) or "default"


@dataclass(frozen=True)
class Snapshot:
    models: dict[tuple[str, int], LoadedModel]
    production: dict[str, int]
    canary: dict[str, int | None]
    refs: dict[tuple[str, str], int]
    experiments: tuple[ab.Experiment, ...]
    pairs: dict[tuple[int, int], torch.Tensor]
    scoring: dict[int, np.ndarray]

    def model(self, kind: str, version: int) -> LoadedModel:
        return self.models[(kind, version)]

    def versions(self) -> dict[str, dict[str, int | None]]:
        return {kind: {"production": self.production[kind], "canary": self.canary.get(kind)} for kind in KINDS}


@dataclass(frozen=True)
class Job:
    query: Query
    route: Route
    snapshot: Snapshot


@dataclass(frozen=True)
class Served:
    result: Ranked
    route: Route
    canary_failed: bool


def experiments_from(obj: Any) -> tuple[ab.Experiment, ...]:
    """Experiments from the file/body shape {"experiments": [{name, salt, variants: [...]}, ...]}."""
    from recforge.serve.schemas import ExperimentsBody

    body = ExperimentsBody.model_validate(obj)
    experiments = tuple(ab.Experiment(e.name, e.salt, tuple(ab.Variant(v.name, v.weight, v.ranker, v.retrieval)
                                                             for v in e.variants)) for e in body.experiments)
    names = [e.name for e in experiments]
    if len(set(names)) != len(names):
        raise ValueError(f"experiment names must be unique, got {names}")
    return experiments


def experiments_to(experiments: Sequence[ab.Experiment]) -> dict[str, Any]:
    return {"experiments": [{"name": e.name, "salt": e.salt, "variants": [
        {"name": v.name, "weight": v.weight, "ranker": v.ranker, "retrieval": v.retrieval} for v in e.variants]}
        for e in experiments]}


def load_experiments_file(path: Path) -> tuple[ab.Experiment, ...]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {"experiments": []}
        return experiments_from(data)
    except (OSError, yaml.YAMLError, ValueError) as exc:
        raise ValueError(f"experiments file {path}: {str(exc).strip().splitlines()[0]}") from exc


class SeenItems:
    """Bounded per-user memory of items from accepted events: what to exclude, and the click history."""

    def __init__(self, per_user: int, users: int) -> None:
        self.per_user = per_user
        self.users = users
        self._data: OrderedDict[str, tuple[deque[str], deque[str]]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, events: Sequence[tuple[str, RawId, RawId]]) -> None:
        if not self.per_user or not self.users:
            return
        with self._lock:
            for type_, user, item in events:
                key = str(user)
                entry = self._data.get(key)
                if entry is None:
                    entry = self._data[key] = (deque(maxlen=self.per_user), deque(maxlen=self.per_user))
                else:
                    self._data.move_to_end(key)
                entry[0].append(str(item))
                if type_ == "click":
                    entry[1].append(str(item))
            while len(self._data) > self.users:
                self._data.popitem(last=False)

    def get(self, user: RawId) -> tuple[tuple[str, ...], tuple[str, ...]]:
        with self._lock:
            entry = self._data.get(str(user))
            return (tuple(entry[0]), tuple(entry[1])) if entry else ((), ())


class Service:
    """Owns the loaded models and everything stateful; the routes call its methods."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.metrics = ServeMetrics()
        self.snapshot: Snapshot | None = None
        self.last_error: str | None = None
        self._experiments_mtime = _mtime(settings.experiments)
        self.experiments: tuple[ab.Experiment, ...] = (
            load_experiments_file(settings.experiments) if settings.experiments else ())
        self.executor = ThreadPoolExecutor(settings.model_threads, thread_name_prefix="recforge-model")
        self.events_executor = ThreadPoolExecutor(1, thread_name_prefix="recforge-events")
        self.batcher: MicroBatcher[Job, Served] = MicroBatcher(self._run_batch, self.executor,
                                                               settings.model_threads, settings.max_batch)
        self.events = EventStore(settings.events_dir)
        # Why the last batch could not be stored (disk full), until a write succeeds again: /readyz fails meanwhile.
        self.events_error: str | None = None
        # Where this process has read the shared events store up to: with several workers, each learns of the
        # events the others stored by reading on from here (sync_seen).
        self._events_cursor = self.events.last_id()
        self.events_total = self._events_cursor
        self.seen = SeenItems(settings.seen_per_user, settings.seen_users)
        self.seen.add(self.events.recent(min(1_000_000, settings.seen_per_user * settings.seen_users),
                                         self._events_cursor))
        self._reload_lock = threading.Lock()
        self._canary_lock = threading.Lock()
        self._monitors: dict[tuple[str, int], CanaryMonitor] = {}
        self._banned: set[tuple[str, int]] = set()
        self._rolling_back: set[tuple[str, int]] = set()
        self.thresholds = CanaryThresholds(settings.canary_window_s, settings.canary_min_requests,
                                           settings.canary_max_error_rate, settings.canary_max_p99_ms)

    def model_name(self, kind: str) -> str:
        return self.settings.retrieval_model if kind == "retrieval" else self.settings.ranker_model

    # ---- loading -------------------------------------------------------------------------------------
    def _resolve(self, kind: str, ref: str | int) -> int:
        return int(registry.show(self.settings.registry, self.model_name(kind), ref)["number"])

    def _resolve_refs(self, experiments: Sequence[ab.Experiment], strict: bool) -> dict[tuple[str, str], int]:
        refs: dict[tuple[str, str], int] = {}
        for experiment in experiments:
            for variant in experiment.variants:
                for kind, ref in (("retrieval", variant.retrieval), ("ranker", variant.ranker)):
                    if ref is None or (kind, ref) in refs:
                        continue
                    try:
                        refs[(kind, ref)] = self._resolve(kind, ref)
                    except registry.RegistryError as exc:
                        if strict:
                            raise ConfigRejected(f"experiment {experiment.name!r} variant {variant.name!r}: "
                                                 f"{exc}") from exc
                        log.error("experiment %s variant %s: %s; its users get production", experiment.name,
                                  variant.name, exc)
        return refs

    def reload(self, experiments: tuple[ab.Experiment, ...] | None = None) -> bool:
        """Re-resolve aliases (and experiment refs), load what changed, warm it, swap. Returns whether anything
        changed. Raises when production cannot be resolved or loaded; the current snapshot then stays."""
        with self._reload_lock:
            try:
                changed = self._reload(experiments)
            except Exception:
                self.metrics.reloads.labels("failed").inc()
                raise
            self.metrics.reloads.labels("changed" if changed else "unchanged").inc()
            return changed

    def _reload(self, experiments: tuple[ab.Experiment, ...] | None) -> bool:
        experiments = self.experiments if experiments is None else experiments
        strict = experiments is not self.experiments
        production = {kind: self._resolve(kind, self.settings.alias) for kind in KINDS}
        canary: dict[str, int | None] = {}
        for kind in KINDS:
            try:
                version: int | None = self._resolve(kind, "canary")
            except registry.RegistryError:
                version = None
            if version == production[kind] or (kind, version) in self._banned:
                version = None
            canary[kind] = version
        refs = self._resolve_refs(experiments, strict)
        old = self.snapshot
        needed = {(kind, v) for kind, v in production.items()} | {(k, v) for k, v in canary.items() if v is not None}
        needed |= {(kind, v) for (kind, _), v in refs.items()}
        if (old is not None and set(old.models) == needed and old.production == production and old.canary == canary
                and old.refs == refs and old.experiments == experiments):
            return False
        models: dict[tuple[str, int], LoadedModel] = {}
        for kind, version in sorted(needed):
            reuse = old.models.get((kind, version)) if old is not None else None
            if reuse is None:
                reuse = load_model(self.settings.registry, self.model_name(kind), version)
                for line in reuse.drift:
                    log.warning("%s v%d was built in another environment: %s (results may differ)",
                                self.model_name(kind), version, line)
                if reuse.kind != kind:
                    raise ValueError(f"{self.model_name(kind)} v{version} is a {reuse.kind} bundle, not a {kind}; "
                                     f"check --{kind}-model")
            models[(kind, version)] = reuse
        prod_retrieval = models[("retrieval", production["retrieval"])]
        pairs: dict[tuple[int, int], torch.Tensor] = {}
        scoring: dict[int, np.ndarray] = {}
        for (kind_r, rv), retrieval in models.items():
            if kind_r != "retrieval":
                continue
            for (kind_k, kv), ranker in models.items():
                if kind_k != "ranker":
                    continue
                carried = old.pairs.get((rv, kv)) if old is not None else None
                if carried is not None and old is not None and old.models.get(("retrieval", rv)) is retrieval \
                        and old.models.get(("ranker", kv)) is ranker:
                    pairs[(rv, kv)] = carried
                    continue
                pairs[(rv, kv)] = torch.from_numpy(encode_items(ranker, item_key_strings(retrieval)[1:], retrieval))
                warm_up(retrieval, ranker, pairs[(rv, kv)])
        for (kind, kv), ranker in models.items():
            if kind == "ranker":
                scoring[kv] = encode_items(ranker, item_key_strings(ranker), prod_retrieval)
        self.snapshot = Snapshot(models=models, production=production, canary=canary, refs=refs,
                                 experiments=experiments, pairs=pairs, scoring=scoring)
        self.experiments = experiments
        for kind in KINDS:
            self.metrics.model_version.labels(kind, self.model_name(kind), "production").set(production[kind])
            self.metrics.model_version.labels(kind, self.model_name(kind), "canary").set(canary[kind] or 0)
        log.info("serving %s", self.snapshot.versions())
        del old
        gc.collect()
        return True

    def set_experiments(self, experiments: tuple[ab.Experiment, ...]) -> None:
        """Swap the running experiments (every ref must resolve); kept in the experiments file if there is one."""
        self.reload(experiments)
        if self.settings.experiments is not None:
            write_text(self.settings.experiments, yaml.safe_dump(experiments_to(experiments), sort_keys=False))
            self._experiments_mtime = _mtime(self.settings.experiments)

    def follow_experiments_file(self) -> bool:
        """Take up experiments another worker wrote to the shared experiments file (PUT /admin/experiments went
        to one worker); returns whether they changed. Runs on the registry poll when there are several workers."""
        path = self.settings.experiments
        mtime = _mtime(path)
        if path is None or mtime is None or mtime == self._experiments_mtime:
            return False
        experiments = load_experiments_file(path)
        self._experiments_mtime = mtime
        if experiments == self.experiments:
            return False
        self.reload(experiments)
        return True

    def ready(self) -> Snapshot:
        if self.snapshot is None:
            raise NotReady(self.last_error or "models are still loading")
        return self.snapshot

    # ---- routing -------------------------------------------------------------------------------------
    def route(self, snapshot: Snapshot, user_id: RawId) -> Route:
        """Versions for this user: production, or the canary for a hashed share of users, or an experiment's
        variant (a variant that names a model overrides the canary for that model)."""
        versions = dict(snapshot.production)
        on_canary = set()
        for kind in KINDS:
            version = snapshot.canary.get(kind)
            if version is not None and (kind, version) not in self._banned and ab.in_canary(
                    user_id, self.model_name(kind), self.settings.canary_share):
                versions[kind] = version
                on_canary.add(kind)
        assignments = {}
        for experiment in snapshot.experiments:
            variant = ab.assign(user_id, experiment)
            assignments[experiment.name] = variant.name
            for kind, ref in (("retrieval", variant.retrieval), ("ranker", variant.ranker)):
                if ref is not None and (kind, ref) in snapshot.refs:
                    versions[kind] = snapshot.refs[(kind, ref)]
                    on_canary.discard(kind)
        return Route(versions["retrieval"], versions["ranker"], assignments, frozenset(on_canary))

    def production_route(self, snapshot: Snapshot, route: Route) -> Route:
        return Route(snapshot.production["retrieval"], snapshot.production["ranker"], route.assignments, frozenset())

    # ---- model work (runs in the model threads) -----------------------------------------------------
    def _run_batch(self, jobs: Sequence[Job]) -> list[Served | BaseException]:
        self.metrics.batch_size.observe(len(jobs))
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((id(job.snapshot), job.route.retrieval, job.route.ranker), []).append(i)
        out: list[Served | BaseException] = [ModelError("not computed")] * len(jobs)
        for members in groups.values():
            first = jobs[members[0]]
            snapshot, route = first.snapshot, first.route
            queries = [jobs[i].query for i in members]
            try:
                results = self._recommend(snapshot, route, queries)
                for i, result in zip(members, results, strict=True):
                    out[i] = Served(result, jobs[i].route, False)
            except ModelError as exc:
                self.metrics.errors.labels("recommend", "+".join(sorted(route.canary)) or "production").inc()
                if not any(jobs[i].route.canary for i in members):
                    for i in members:
                        out[i] = exc
                    continue
                log.warning("canary failed, answering from production: %s", exc)
                for i in members:
                    fallback = self.production_route(snapshot, jobs[i].route)
                    try:
                        out[i] = Served(self._recommend(snapshot, fallback, [jobs[i].query])[0], fallback, True)
                    except ModelError as again:
                        out[i] = again
        return out

    def _recommend(self, snapshot: Snapshot, route: Route, queries: Sequence[Query]) -> list[Ranked]:
        retrieval = snapshot.model("retrieval", route.retrieval)
        ranker = snapshot.model("ranker", route.ranker)
        return recommend_batch(retrieval, ranker, snapshot.pairs[(route.retrieval, route.ranker)], queries,
                               self.settings.num_candidates)

    def score(self, snapshot: Snapshot, route: Route, query: Query, item_ids: Sequence[RawId]
              ) -> tuple[list[RawId], list[float], list[RawId], Route, bool]:
        """Runs in a model thread; a failing canary ranker falls back to production like recommend does."""
        try:
            ids, scores, unknown = score_items(snapshot.model("ranker", route.ranker), snapshot.scoring[route.ranker],
                                               query, item_ids)
            return ids, scores, unknown, route, False
        except ModelError as exc:
            self.metrics.errors.labels("score", "ranker" if "ranker" in route.canary else "production").inc()
            if "ranker" not in route.canary:
                raise
            log.warning("canary failed, answering from production: %s", exc)
            fallback = self.production_route(snapshot, route)
            ids, scores, unknown = score_items(snapshot.model("ranker", fallback.ranker),
                                               snapshot.scoring[fallback.ranker], query, item_ids)
            return ids, scores, unknown, fallback, True

    # ---- canary --------------------------------------------------------------------------------------
    def observe_canary(self, route: Route, ok: bool, latency_s: float) -> list[tuple[str, int, str]]:
        """Record one canary request; returns the (kind, version, reason) breaches that need a rollback now."""
        breaches = []
        for kind in route.canary:
            version = route.retrieval if kind == "retrieval" else route.ranker
            with self._canary_lock:
                monitor = self._monitors.setdefault((kind, version), CanaryMonitor(self.thresholds))
            monitor.observe(ok, latency_s)
            reason = monitor.breach()
            if reason is not None:
                with self._canary_lock:
                    if (kind, version) in self._rolling_back or (kind, version) in self._banned:
                        continue
                    self._rolling_back.add((kind, version))
                    self._banned.add((kind, version))  # stop routing to it at once, before the registry moves
                breaches.append((kind, version, reason))
        return breaches

    def rollback_canary(self, kind: str, version: int, reason: str) -> dict[str, Any] | None:
        """Move the registry's canary alias off `version` (recording why), then reload. Runs in a thread."""
        name = self.model_name(kind)
        why = f"automatic canary rollback of {name} v{version}: {reason}"
        record = None
        try:
            current = self._resolve(kind, "canary")
            if current == version:
                try:
                    record = registry.rollback(self.settings.registry, name, alias="canary", reason=why)
                except registry.RegistryError:
                    # Only when the registry cannot withdraw the alias: point it at production, i.e. no canary.
                    production = self._resolve(kind, self.settings.alias)
                    record = registry.promote(self.settings.registry, name, production, alias="canary", reason=why)
            self.metrics.canary_rollbacks.labels(kind).inc()
            log.error("%s", why)
        except (registry.RegistryError, OSError) as exc:
            log.error("canary rollback of %s v%d failed in the registry (%s); it stays out of rotation here",
                      name, version, exc)
        finally:
            with self._canary_lock:
                self._rolling_back.discard((kind, version))
        try:
            self.reload()
        except Exception as exc:  # the breach is handled; a failed reload is reported by its own metric
            log.error("reload after canary rollback failed: %s", exc)
        return record

    def canary_stats(self) -> dict[str, Any]:
        with self._canary_lock:
            monitors = dict(self._monitors)
        return {f"{k}:{v}": m.stats().__dict__ for (k, v), m in monitors.items()}

    # ---- events --------------------------------------------------------------------------------------
    def item_features(self, snapshot: Snapshot, item_ids: Sequence[RawId]) -> list[dict[str, Any]]:
        """Item-side raw features from the production retrieval catalog, as stored with each impression."""
        model = snapshot.model("retrieval", snapshot.production["retrieval"])
        rows = np.asarray(model.item_vocab.lookup([str(i) for i in item_ids]), dtype=np.int64)
        values = model.feature_values(rows)
        out: list[dict[str, Any]] = []
        for j, row in enumerate(rows):
            out.append({} if row == 0 else {name: _plain(col[j]) for name, col in values.items()})
        return out

    def store_events(self, events: Sequence[StoredEvent], seen: Sequence[tuple[str, RawId, RawId]]) -> int:
        """Runs in the events thread: durable first, then remembered for exclude_seen. Returns the number of
        events stored (by every worker)."""
        try:
            self.events.append(events)
        except EventStoreFull as exc:
            self.events_error = str(exc)
            self.metrics.event_write_failures.inc()
            log.error("events not stored (answered 503): %s", exc)
            raise
        self.events_error = None
        if self.settings.workers > 1:
            self.sync_seen()  # reads this batch back in order with whatever the other workers stored meanwhile
        else:
            self.events_total += len(events)
            self._events_cursor = self.events_total
            self.seen.add(seen)
        for type_ in ("impression", "click"):
            count = sum(1 for event in events if event.type == type_)
            if count:
                self.metrics.events.labels(type_).inc(count)
        return self.events_total

    def events_unwritable(self) -> str | None:
        """Runs in the events thread: why events cannot be stored now, or None. After a failed write it tries a
        real write each time it is asked, so readiness recovers by itself once space is freed."""
        if self.events_error is not None:
            try:
                self.events.probe()
            except EventStoreFull as exc:
                self.events_error = str(exc)
            else:
                log.info("the event store takes writes again")
                self.events_error = None
        return self.events_error

    def sync_seen(self) -> None:
        """Runs in the events thread: remember the events stored since the last call by any worker (all of them
        write the same store), so exclude_seen and histories hold whichever worker took the events."""
        rows, self._events_cursor = self.events.since(self._events_cursor)
        self.seen.add(rows)
        self.events_total = max(self.events_total, self._events_cursor)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.events_executor.shutdown(wait=True)
        self.events.close()


def _mtime(path: Path | None) -> int | None:
    try:
        return None if path is None else path.stat().st_mtime_ns
    except OSError:
        return None


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value

