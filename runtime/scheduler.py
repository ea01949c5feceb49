"""The dispatch loop: batcher -> (bounded number of in-flight dispatches) -> mode.execute.

The bound keeps the CPUs busy without oversubscribing them and lets batches grow under
load. A dispatch whose missing calls became stragglers (runtime.modes.base.StragglerWatch:
far later than the dispatch's first result) only waits, not using the CPUs: it gives its
slot to the next dispatch (`Batch.on_stall`), so one slow result never holds back the
queue behind it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import numpy as np

from runtime.batcher import Batch, Batcher, Block
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
        self.max_inflight_groups = max_inflight_groups
        self._slots = asyncio.Semaphore(max_inflight_groups)
        self._inflight: dict[asyncio.Task[None], Batch] = {}
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._dispatch_loop(), name="dispatch-loop")

    def queued(self) -> int:
        """Queries waiting for a dispatch."""
        return len(self.batcher)

    def submit(self, xs: np.ndarray) -> Block:
        """Queue the queries xs [B, C, H, W] as one block; raises ServiceUnavailable when the
        queue is full."""
        block = self.batcher.submit(xs)
        self.metrics.set_pending(len(self.batcher))
        return block

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

    async def _run_group(self, batch: Batch) -> None:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._slots.release()

        batch.on_stall = release  # a dispatch waiting only on stragglers frees its slot
        now = self.batcher.now()
        queue_s = 0.0
        for p in batch.pieces:
            if p.block.dispatched_s is None:
                p.block.dispatched_s = now
            queue_s += (now - p.block.enqueued_s) * (p.stop - p.start)
        t0 = time.perf_counter()
        try:
            await self.mode.execute(batch)
        except Exception as exc:  # noqa: BLE001 - a bug must not take the loop down
            logger.exception("dispatch of %d queries failed in mode %s", len(batch),
                             self.mode.name)
            batch.fail(exc)
        finally:
            release()
        self.metrics.group_executed(len(batch), queue_s, time.perf_counter() - t0)

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
                batch = self._inflight.get(task)
                if batch is not None:
                    leftovers.extend(batch.blocks)
                task.cancel()
        for block in leftovers:
            block.fail(error)
