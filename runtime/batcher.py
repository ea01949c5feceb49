"""Forms coding groups of up to k queries from a bounded queue.

Rule: a group is dispatched as soon as k live queries are queued, or when the OLDEST
queued query has waited `max_queue_delay_s`, whichever comes first. A group dispatched at
the deadline with m < k queries is a *partial group*; the scheduler pads it (see
runtime.modes: repeats of the last query, padded answers dropped). Under load, one
dispatch also takes every further complete group already queued (up to
`max_groups_per_call`), and each worker runs its slot of all of them as one batch.
Queries whose request already gave up (timed out, client gone) are skipped, never computed.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from runtime.errors import ServiceUnavailable


@dataclass(frozen=True)
class QueryAnswer:
    """What the scheduler hands back for one query."""

    logits: dict[str, np.ndarray]  # task -> [num_classes] float32 (NaN when unavailable)
    reconstructed: bool  # decoded from coded results instead of its own worker's result
    unavailable_heads: tuple[str, ...] = ()  # ParM: only the primary head is decoded


@dataclass(eq=False)
class Query:
    x: np.ndarray  # [C, H, W] float32, normalised
    future: asyncio.Future[QueryAnswer]
    enqueued_s: float  # event-loop clock
    dispatched_s: float | None = field(default=None)


class Batcher:
    def __init__(
        self,
        group_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.group_size = group_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._clock = clock
        self._queue: collections.deque[Query] = collections.deque()
        self._arrived = asyncio.Event()

    def now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, xs: np.ndarray) -> list[Query]:
        """Queue each query of xs [B, C, H, W]; all-or-nothing so a request is never split
        between "queued" and "rejected". Raises ServiceUnavailable when the queue is full."""
        if len(self._queue) + len(xs) > self.max_queue_size:
            raise ServiceUnavailable(
                f"server overloaded: {len(self._queue)} queries queued, limit "
                f"{self.max_queue_size}; retry after the Retry-After delay")
        loop = asyncio.get_running_loop()
        now = self.now()
        queries = [Query(x=x, future=loop.create_future(), enqueued_s=now) for x in xs]
        self._queue.extend(queries)
        self._arrived.set()
        return queries

    def drain(self) -> list[Query]:
        """Remove and return every queued query (shutdown)."""
        queries = list(self._queue)
        self._queue.clear()
        return queries

    def _drop_dead(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    def live_count(self) -> int:
        """Queued queries whose request still waits for them."""
        return self._live_count()

    def _live_count(self) -> int:
        return sum(1 for q in self._queue if not q.future.done())

    async def next_group(self, max_groups: int = 1) -> list[Query]:
        """Wait for the next dispatch under the rule above: one group of 1..k live queries,
        plus as many further COMPLETE groups as are already queued (up to max_groups in all),
        so that under load one worker call carries several groups ([G, C, H, W] batches)."""
        while True:
            self._drop_dead()
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            deadline = self._queue[0].enqueued_s + self.max_queue_delay_s
            live = self._live_count()
            if live < self.group_size:
                remaining = deadline - self.now()
                if remaining > 0:
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                    except TimeoutError:
                        pass
                    continue
            groups = max(1, min(max_groups, live // self.group_size))
            take = min(live, groups * self.group_size)
            batch: list[Query] = []
            while self._queue and len(batch) < take:
                query = self._queue.popleft()
                if not query.future.done():
                    batch.append(query)
            if batch:
                return batch
