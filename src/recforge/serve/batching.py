"""Micro-batching: concurrent requests merged into one model call, without a fixed wait.

A request that finds a model thread free is dispatched at once (no added latency when traffic is
light). Requests that arrive while every thread is busy queue up, and the next free thread takes
the whole queue (up to `max_batch`) as one batch: under load, batches grow by themselves to what
arrived during one model call (~1-2 ms), which is where batching pays.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """Runs `fn(batch) -> results` (one result or exception per item, in order) on `executor`.

    Must be used from one event loop; `fn` runs in the executor's threads.
    """

    def __init__(self, fn: Callable[[Sequence[T]], Sequence[R | BaseException]], executor: Executor,
                 max_inflight: int, max_batch: int) -> None:
        self._fn = fn
        self._executor = executor
        self._max_inflight = max_inflight
        self._max_batch = max_batch
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._inflight = 0
        self.batches = 0
        self.items = 0

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, future))
        self._dispatch(loop)
        return await future

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._queue and self._inflight < self._max_inflight:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch:]
            batch = [(item, fut) for item, fut in batch if not fut.cancelled()]
            if not batch:
                continue
            self._inflight += 1
            self.batches += 1
            self.items += len(batch)
            task = loop.run_in_executor(self._executor, self._fn, [item for item, _ in batch])
            task.add_done_callback(lambda done, b=batch: self._finish(loop, b, done))

    def _finish(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[T, asyncio.Future[R]]],
                done: asyncio.Future[Sequence[R | BaseException]]) -> None:
        self._inflight -= 1
        exc = done.exception()
        results: Sequence[R | BaseException] = [exc] * len(batch) if exc is not None else done.result()
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        self._dispatch(loop)
