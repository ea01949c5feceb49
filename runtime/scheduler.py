"""The dispatch loop: batcher -> (bounded number of in-flight groups) -> mode.execute."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import numpy as np

from runtime.batcher import Batcher, Query
from runtime.errors import ServiceUnavailable
from runtime.metrics import Metrics
from runtime.modes import Mode

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, mode: Mode, batcher: Batcher, max_inflight_groups: int,
                 metrics: Metrics, max_groups_per_call: int = 1,
                 on_dequeue: Callable[[], None] | None = None) -> None:
        self._on_dequeue = on_dequeue  # the queue has room again (admission control)
        self.max_groups_per_call = max_groups_per_call
        self.mode = mode
        self.batcher = batcher
        self.metrics = metrics
        self._slots = asyncio.Semaphore(max_inflight_groups)
        self._inflight: dict[asyncio.Task[None], list[Query]] = {}
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._dispatch_loop(), name="dispatch-loop")

    def submit(self, xs: np.ndarray) -> list[Query]:
        """Queue the queries xs [B, C, H, W]; raises ServiceUnavailable when the queue is full."""
        queries = self.batcher.submit(xs)
        self.metrics.set_pending(len(self.batcher))
        return queries

    async def _dispatch_loop(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                group = await self.batcher.next_group(self.max_groups_per_call)
            except BaseException:
                self._slots.release()
                raise
            self.metrics.set_pending(len(self.batcher))
            if self._on_dequeue is not None:
                self._on_dequeue()
            task = asyncio.create_task(self._run_group(group))
            self._inflight[task] = group
            task.add_done_callback(lambda t: self._inflight.pop(t, None))

    async def _run_group(self, group: list[Query]) -> None:
        now = self.batcher.now()
        for query in group:
            query.dispatched_s = now
        t0 = time.perf_counter()
        try:
            await self.mode.execute(group)
        except Exception as exc:  # noqa: BLE001 - a bug must not take the loop down
            logger.exception("group of %d queries failed in mode %s", len(group), self.mode.name)
            for query in group:
                if not query.future.done():
                    query.future.set_exception(exc)
        finally:
            self._slots.release()
        queue_s = sum(now - q.enqueued_s for q in group)
        self.metrics.group_executed(len(group), queue_s, time.perf_counter() - t0)

    async def stop(self, timeout_s: float) -> None:
        """Stop dispatching; give in-flight groups timeout_s, then fail whatever is left.

        The server calls this after its own drain (in-flight requests answered), so
        normally nothing is left here."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        error = ServiceUnavailable("server shut down before this query was answered")
        leftovers = self.batcher.drain()
        if self._inflight:
            _, still = await asyncio.wait(set(self._inflight), timeout=max(timeout_s, 0.001))
            for task in still:
                leftovers.extend(self._inflight.get(task, []))
                task.cancel()
        for query in leftovers:
            if not query.future.done():
                query.future.set_exception(error)
