"""What a server process does besides answering requests: load and follow the registry, follow the other
workers' events, and tell the other workers its state.

Alone, a server loads its models in the background from startup (/readyz says when it is done). One of
several workers loads them before it takes connections while another worker serves (`join_workers`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from recforge import registry
from recforge.serve.service import Service
from recforge.serve.workers import WorkerBoard

log = logging.getLogger("recforge.serve")

# How often a worker reads the events the other workers stored (exclude_seen and histories lag by at most this).
SEEN_SYNC_S = 0.2
# How often a replica on a shared state flushes its canary outcomes and reads the global decision: every
# replica stops routing to a breached canary within this long of the breach being claimed.
CANARY_SYNC_S = 0.5


class Lifecycle:
    def __init__(self, service: Service, board: WorkerBoard | None) -> None:
        self.service = service
        self.settings = service.settings
        self.board = board

    def announce(self, accepting: bool = True) -> None:
        """This worker's state, for the others' /readyz and start-up decisions (see serve/workers.py)."""
        if self.board is not None:
            snapshot = self.service.loader.snapshot
            try:
                self.board.publish(accepting, snapshot.versions() if snapshot is not None else None)
            except OSError as exc:  # the supervisor removes the directory as it stops
                log.warning("cannot publish this worker's state in %s: %s", self.board.root, exc)

    async def reload(self) -> bool:
        """Re-resolve the registry in a thread; whether the served versions changed."""
        changed = await asyncio.get_running_loop().run_in_executor(None, self.service.loader.reload)
        if changed:
            self.announce()
        return changed

    async def rollback(self, kind: str, alias: str, reason: str | None) -> bool:
        """An operator's rollback of an alias in the registry, then a reload; whether the versions changed."""
        name = self.service.loader.model_names[kind]
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: registry.rollback(self.settings.registry, name, alias=alias, reason=reason))
        return await self.reload()

    async def load_attempt(self) -> None:
        """One reload; a failure is kept in `loader.last_error` (and logged) for /readyz, and the caller retries."""
        loader = self.service.loader
        try:
            if self.settings.workers > 1 and loader.snapshot is not None:
                await asyncio.get_running_loop().run_in_executor(None, loader.follow_experiments_file)
            await self.reload()
            loader.last_error = None
        except Exception as exc:  # the registry may be mid-change or empty: report and retry
            loader.last_error = f"cannot load models: {str(exc).strip().splitlines()[0] if str(exc) else exc!r}"
            log.error("%s", loader.last_error)

    async def join_workers(self, board: WorkerBoard) -> None:
        """Runs in lifespan startup, so before uvicorn's server takes connections on the shared socket: while
        another worker serves, load the models first (a worker restarted next to serving ones would otherwise
        take its share of new connections at once and answer them 503 until loaded). With no other worker
        accepting (the server's first start, or all of them down) nobody would answer /healthz and /readyz
        meanwhile, so this one accepts at once and loads in the background, as a single server does."""
        loop, loader = asyncio.get_running_loop(), self.service.loader
        self.announce(accepting=False)
        while loader.snapshot is None:
            if not await loop.run_in_executor(None, board.others_accepting):
                log.info("no other worker takes connections: this one does now, its models load meanwhile")
                return
            await self.load_attempt()
            for _ in range(10):  # a failed load is retried every 2 s, as follow_registry does
                if loader.snapshot is not None or not await loop.run_in_executor(None, board.others_accepting):
                    break
                await asyncio.sleep(0.2)
        log.info("models loaded before taking connections: %s", loader.snapshot.versions())

    async def follow_registry(self) -> None:
        """Initial load, then re-resolve the aliases every poll interval (retrying until production loads)."""
        while True:
            await self.load_attempt()
            self.announce()  # also after changes made outside reload() (experiments, canary rollbacks)
            interval = self.settings.poll_interval_s or (2.0 if self.service.loader.snapshot is None else 0)
            if not interval:
                return
            await asyncio.sleep(interval)

    async def follow_events(self) -> None:
        """With several workers: read the events the other workers stored into this one's per-user memory."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SEEN_SYNC_S)
            try:
                await loop.run_in_executor(self.service.events_executor, self.service.online.sync)
            except Exception as exc:  # a busy or briefly unreadable store: the next round catches up
                log.warning("reading events stored by other workers failed: %s", exc)

    async def follow_canary(self) -> None:
        """On a shared state: global canary windows in, bans out; roll back the breaches this replica claimed."""
        loop, service = asyncio.get_running_loop(), self.service
        while True:
            await asyncio.sleep(CANARY_SYNC_S)
            try:
                claimed = await loop.run_in_executor(None, service.canary.sync)
            except Exception as exc:  # Redis briefly unreachable: the outcomes wait in the buffer for the next round
                log.warning("canary sync with the shared state failed: %s", exc)
                continue
            for kind, version, reason in claimed:
                service.spawn(loop.run_in_executor(None, service.rollback_canary, kind, version, reason))

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        import torch

        # One thread per model call; parallelism comes from the model thread pool and from batching.
        # (FAISS gets the same setting when a retrieval bundle loads: serve/inference.py.)
        torch.set_num_threads(1)
        if self.service.online.shared:
            self.service.spawn(self.follow_events())
        if self.service.canary.shared is not None:
            self.service.spawn(self.follow_canary())
        if self.board is not None:
            await self.join_workers(self.board)
            self.announce(accepting=True)
        self.service.spawn(self.follow_registry())
        try:
            yield
        finally:
            if self.board is not None:
                self.board.withdraw()
            self.service.close()
