"""Admission control: which requests may read their body and queue their queries.

A request is admitted from its headers alone. Each admitted request that has not queued yet
holds room for as many queries as recent requests carried (a running mean, at least one),
so `queued + reserved` stays within the queue limit and a flood costs its headers, not a
read, a parse and then a refusal. When the queue is full, a
request waits in a bounded FIFO waiting room (its body unread, left in the kernel's socket
buffer) for up to `wait_s`; it is refused with 503 + Retry-After only when the room is full
or the wait runs out. Under closed-loop overload this keeps the workers busy with admitted
work instead of spending the CPU on a storm of refusals and immediate retries.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

from runtime.errors import ServiceUnavailable
from runtime.metrics import Metrics


class Admission:
    """One admitted request; it holds a place in the queue until its queries are queued."""

    def __init__(self, control: AdmissionControl, reserved: int) -> None:
        self.control = control
        self.reserved = reserved  # queries' room held for it
        self.released = False

    def release(self, queries: int | None = None) -> None:
        """Its `queries` are queued (None: it gave up): the queue itself now counts them."""
        if not self.released:
            self.released = True
            self.control._release(self.reserved, queries)


class AdmissionControl:
    def __init__(self, queued: Callable[[], int], max_queue_size: int, *, wait_s: float,
                 live: Callable[[], int] | None = None,
                 max_waiting: int, metrics: Metrics) -> None:
        self._queued = queued  # queries in the batcher's queue now (O(1))
        # ... of which their requests still wait for (O(queue)): asked only when the queue
        # looks full, so abandoned queries never hold room and the common path stays cheap
        self._live = live or queued
        self.max_queue_size = max_queue_size
        self.wait_s = wait_s
        self.max_waiting = max_waiting
        self._metrics = metrics
        self._admitting = 0  # admitted requests whose queries are not queued yet
        self._reserved = 0  # the room they hold, in queries
        self._mean_queries = 1.0  # queries per request, running mean
        self._waiters: collections.deque[asyncio.Future[int]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _room(self) -> int:
        room = self.max_queue_size - self._queued() - self._reserved
        if room >= self._reservation():
            return room
        return self.max_queue_size - self._live() - self._reserved

    def _reservation(self) -> int:
        return max(1, min(self.max_queue_size, round(self._mean_queries)))

    def _reserve(self) -> int:
        size = self._reservation()
        self._admitting += 1
        self._reserved += size
        return size

    def _release(self, reserved: int, queries: int | None) -> None:
        self._admitting -= 1
        self._reserved -= reserved
        if queries is not None:
            self._mean_queries += (queries - self._mean_queries) / 16
        self.room_changed()

    async def admit(self) -> Admission:
        """An admission now, after a wait in the room, or ServiceUnavailable."""
        if self._room() >= self._reservation() and not self._waiters:  # first come, first served
            return Admission(self, self._reserve())
        if len(self._waiters) >= self.max_waiting or self.wait_s <= 0:
            self._refuse("the waiting room is full" if self.wait_s > 0 else "no waiting")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.wait_s)
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():  # woken just as the wait ran out
                return Admission(self, waiter.result())
            waiter.cancel()
            self._refuse(f"no room within {self.wait_s * 1000:.0f} ms (--admission-wait-ms)")
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # woken, then cancelled before it could use its reserved room: it goes back
                self._release(waiter.result(), None)
            waiter.cancel()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        return Admission(self, waiter.result())

    def close(self, error: BaseException) -> None:
        """Refuse every waiter with `error` (the server is draining); newcomers are refused
        before they get here."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def room_changed(self) -> None:
        """Hand freed room to waiters in arrival order (each reserves a request's room)."""
        while self._waiters and self._room() >= self._reservation():
            waiter = self._waiters.popleft()
            if waiter.done():  # gave up already
                continue
            waiter.set_result(self._reserve())

    def _refuse(self, why: str) -> None:
        self._metrics.request_rejected()
        raise ServiceUnavailable(
            f"server overloaded: {self._queued()} queries queued, {self._admitting} requests "
            f"being read, {len(self._waiters)} waiting; limit {self.max_queue_size} queries "
            f"(--max-queue-size); {why}. Retry after the Retry-After delay")
