"""Which bundles are loaded: one immutable `Snapshot`, rebuilt beside the old one and swapped in.

A reload re-resolves the registry's aliases and the experiments' refs, loads (and warms) only the
versions that changed, and swaps the snapshot in with one reference assignment, so a request sees
either the old models or the new ones, never a mix, and nothing in flight fails. Versions that did
not change are carried over, and the old snapshot is released once the last request holding it ends.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from recforge import registry
from recforge.serve import ab
from recforge.serve.experiment_config import ExperimentsFile
from recforge.serve.inference import LoadedModel, encode_items, item_key_strings, load_model, warm_up
from recforge.serve.routing import KINDS
from recforge.serve.settings import ServeSettings
from recforge.serve.telemetry import ServeMetrics

log = logging.getLogger("recforge.serve")
Key = tuple[str, int]  # (kind, version)


class NotReady(RuntimeError):
    """No models are loaded yet (or none could be): the server cannot answer model requests."""


class ConfigRejected(ValueError):
    """An admin request that names something that does not exist (an unknown version or alias)."""


@dataclass(frozen=True)
class Snapshot:
    models: dict[Key, LoadedModel]
    production: dict[str, int]
    canary: dict[str, int | None]
    refs: dict[tuple[str, str], int]
    experiments: tuple[ab.Experiment, ...]
    # The retrieval catalog encoded for each (retrieval, ranker) pair, and each ranker's own catalog for /score.
    pairs: dict[tuple[int, int], torch.Tensor]
    scoring: dict[int, np.ndarray]

    def model(self, kind: str, version: int) -> LoadedModel:
        return self.models[(kind, version)]

    def versions(self) -> dict[str, dict[str, int | None]]:
        return {kind: {"production": self.production[kind], "canary": self.canary.get(kind)} for kind in KINDS}


class Loader:
    """Owns the snapshot and every registry read and alias move the server makes."""

    def __init__(self, settings: ServeSettings, metrics: ServeMetrics, banned: Callable[[str, int], bool]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.banned = banned
        self.model_names = {"retrieval": settings.retrieval_model, "ranker": settings.ranker_model}
        self.snapshot: Snapshot | None = None
        self.last_error: str | None = None
        self.experiments_file = ExperimentsFile(settings.experiments)
        self.experiments: tuple[ab.Experiment, ...] = self.experiments_file.initial()
        self._lock = threading.Lock()

    def ready(self) -> Snapshot:
        if self.snapshot is None:
            raise NotReady(self.last_error or "models are still loading")
        return self.snapshot

    def resolve(self, kind: str, ref: str | int) -> int:
        return int(registry.show(self.settings.registry, self.model_names[kind], ref)["number"])

    def reload(self, experiments: tuple[ab.Experiment, ...] | None = None) -> bool:
        """Re-resolve aliases (and experiment refs), load what changed, warm it, swap. Returns whether anything
        changed. Raises when production cannot be resolved or loaded; the current snapshot then stays."""
        with self._lock:
            try:
                changed = self._reload(experiments)
            except Exception:
                self.metrics.reloads.labels("failed").inc()
                raise
            self.metrics.reloads.labels("changed" if changed else "unchanged").inc()
            return changed

    def set_experiments(self, experiments: tuple[ab.Experiment, ...]) -> None:
        """Swap the running experiments (every ref must resolve); kept in the experiments file if there is one."""
        self.reload(experiments)
        self.experiments_file.write(experiments)

    def follow_experiments_file(self) -> bool:
        """Take up experiments another worker wrote to the shared experiments file (PUT /admin/experiments went
        to one worker); returns whether they changed. Runs on the registry poll when there are several workers."""
        experiments = self.experiments_file.changed()
        if experiments is None or experiments == self.experiments:
            return False
        self.reload(experiments)
        return True

    def withdraw_canary(self, kind: str, version: int, why: str) -> dict[str, Any] | None:
        """Move the registry's canary alias off `version`, recording why; None when it had moved already."""
        name = self.model_names[kind]
        if self.resolve(kind, "canary") != version:
            return None
        try:
            return registry.rollback(self.settings.registry, name, alias="canary", reason=why)
        except registry.RegistryError:
            # Only when the registry cannot withdraw the alias: point it at production, i.e. no canary.
            production = self.resolve(kind, self.settings.alias)
            return registry.promote(self.settings.registry, name, production, alias="canary", reason=why)

    def _reload(self, experiments: tuple[ab.Experiment, ...] | None) -> bool:
        experiments = self.experiments if experiments is None else experiments
        production = {kind: self.resolve(kind, self.settings.alias) for kind in KINDS}
        canary = {kind: self._canary(kind, production[kind]) for kind in KINDS}
        refs = self._resolve_refs(experiments, strict=experiments is not self.experiments)
        old = self.snapshot
        needed = {(kind, v) for kind, v in production.items()} | {(k, v) for k, v in canary.items() if v is not None}
        needed |= {(kind, v) for (kind, _), v in refs.items()}
        if (old is not None and set(old.models) == needed and old.production == production and old.canary == canary
                and old.refs == refs and old.experiments == experiments):
            return False
        models = {key: self._model(key, old) for key in sorted(needed)}
        pairs, scoring = _item_tables(models, old, models[("retrieval", production["retrieval"])])
        self.snapshot = Snapshot(models=models, production=production, canary=canary, refs=refs,
                                 experiments=experiments, pairs=pairs, scoring=scoring)
        self.experiments = experiments
        for kind in KINDS:
            self.metrics.model_version.labels(kind, self.model_names[kind], "production").set(production[kind])
            self.metrics.model_version.labels(kind, self.model_names[kind], "canary").set(canary[kind] or 0)
        log.info("serving %s", self.snapshot.versions())
        del old
        gc.collect()
        return True

    def _canary(self, kind: str, production: int) -> int | None:
        try:
            version: int | None = self.resolve(kind, "canary")
        except registry.RegistryError:
            return None
        return None if version == production or self.banned(kind, version) else version

    def _resolve_refs(self, experiments: Sequence[ab.Experiment], strict: bool) -> dict[tuple[str, str], int]:
        refs: dict[tuple[str, str], int] = {}
        for experiment in experiments:
            for variant in experiment.variants:
                for kind, ref in (("retrieval", variant.retrieval), ("ranker", variant.ranker)):
                    if ref is None or (kind, ref) in refs:
                        continue
                    try:
                        refs[(kind, ref)] = self.resolve(kind, ref)
                    except registry.RegistryError as exc:
                        if strict:
                            raise ConfigRejected(f"experiment {experiment.name!r} variant {variant.name!r}: "
                                                 f"{exc}") from exc
                        log.error("experiment %s variant %s: %s; its users get production", experiment.name,
                                  variant.name, exc)
        return refs

    def _model(self, key: Key, old: Snapshot | None) -> LoadedModel:
        """The loaded model of `key`: carried over from the old snapshot, or loaded now."""
        kind, version = key
        carried = old.models.get(key) if old is not None else None
        if carried is not None:
            return carried
        name = self.model_names[kind]
        model = load_model(self.settings.registry, name, version)
        for line in model.drift:
            log.warning("%s v%d was built in another environment: %s (results may differ)", name, version, line)
        if model.kind != kind:
            raise ValueError(f"{name} v{version} is a {model.kind} bundle, not a {kind}; check --{kind}-model")
        return model


def _item_tables(models: dict[Key, LoadedModel], old: Snapshot | None, production_retrieval: LoadedModel
                 ) -> tuple[dict[tuple[int, int], torch.Tensor], dict[int, np.ndarray]]:
    """Each (retrieval, ranker) pair's catalog in the ranker's encoding (warmed), and each ranker's catalog."""
    pairs: dict[tuple[int, int], torch.Tensor] = {}
    retrievals = [(v, m) for (kind, v), m in models.items() if kind == "retrieval"]
    rankers = [(v, m) for (kind, v), m in models.items() if kind == "ranker"]
    for rv, retrieval in retrievals:
        for kv, ranker in rankers:
            carried = old.pairs.get((rv, kv)) if old is not None else None
            if carried is not None and old is not None and old.models.get(("retrieval", rv)) is retrieval \
                    and old.models.get(("ranker", kv)) is ranker:
                pairs[(rv, kv)] = carried
                continue
            pairs[(rv, kv)] = torch.from_numpy(encode_items(ranker, item_key_strings(retrieval)[1:], retrieval))
            warm_up(retrieval, ranker, pairs[(rv, kv)])
    scoring = {kv: encode_items(ranker, item_key_strings(ranker), production_retrieval) for kv, ranker in rankers}
    return pairs, scoring
