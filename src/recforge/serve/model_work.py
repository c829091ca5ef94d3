"""Model work in the model threads: micro-batched recommendations and scoring, with the canary fallback.

Requests queued while a model call runs are merged into the next call (`MicroBatcher`), grouped by the
versions that serve them; a failing canary's requests are answered again by production, so a bad
canary costs latency, not errors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from recforge.serve.batching import MicroBatcher
from recforge.serve.inference import ModelError, Query, Ranked, RawId, recommend_batch, score_items
from recforge.serve.loading import Snapshot
from recforge.serve.routing import Route, production_route
from recforge.serve.telemetry import ServeMetrics

log = logging.getLogger("recforge.serve")


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
    # Served without the user's online state (the shared store could not be read).
    degraded: bool = False
    # The id the answer goes out with; its impressions name it, and the served features are logged under it.
    request_id: str = ""


class ModelWork:
    """The model threads and what runs in them."""

    def __init__(self, threads: int, max_batch: int, num_candidates: int, metrics: ServeMetrics) -> None:
        self.num_candidates = num_candidates
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="recforge-model")
        self.batcher: MicroBatcher[Job, Served] = MicroBatcher(self._run_batch, self.executor, threads, max_batch)

    def _run_batch(self, jobs: Sequence[Job]) -> list[Served | BaseException]:
        self.metrics.batch_size.observe(len(jobs))
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((id(job.snapshot), job.route.retrieval, job.route.ranker), []).append(i)
        out: list[Served | BaseException] = [ModelError("not computed")] * len(jobs)
        for members in groups.values():
            first = jobs[members[0]]
            try:
                results = self._recommend(first.snapshot, first.route, [jobs[i].query for i in members])
                for i, result in zip(members, results, strict=True):
                    out[i] = Served(result, jobs[i].route, False)
            except ModelError as exc:
                self.metrics.errors.labels("recommend", "+".join(sorted(first.route.canary)) or "production").inc()
                on_canary = any(jobs[i].route.canary for i in members)
                if on_canary:
                    log.warning("canary failed, answering from production: %s", exc)
                for i in members:
                    out[i] = self._from_production(jobs[i]) if on_canary else exc
        return out

    def _from_production(self, job: Job) -> Served | BaseException:
        """A failing canary's request answered by production (whose own failure is then the answer)."""
        fallback = production_route(job.snapshot, job.route)
        try:
            return Served(self._recommend(job.snapshot, fallback, [job.query])[0], fallback, True)
        except ModelError as again:
            return again

    def _recommend(self, snapshot: Snapshot, route: Route, queries: Sequence[Query]) -> list[Ranked]:
        retrieval = snapshot.model("retrieval", route.retrieval)
        ranker = snapshot.model("ranker", route.ranker)
        return recommend_batch(retrieval, ranker, snapshot.pairs[(route.retrieval, route.ranker)], queries,
                               self.num_candidates)

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
            fallback = production_route(snapshot, route)
            ids, scores, unknown = score_items(snapshot.model("ranker", fallback.ranker),
                                               snapshot.scoring[fallback.ranker], query, item_ids)
            return ids, scores, unknown, fallback, True

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
