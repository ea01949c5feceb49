"""Forms coding groups of up to k queries from a bounded queue of requests.

A request's queries are queued as ONE `Block` and answered as one: the hot path does
per-request and per-dispatch work, never per-query Python work (no future, object or
dict per query).

Rule: a dispatch goes out as soon as k live queries are queued, or when the OLDEST queued
query has waited `max_queue_delay_s`, whichever comes first. A dispatch made at the
deadline with m < k queries is a *partial group*; the modes pad it (see runtime.modes:
repeats of the last query, padded answers dropped). Under load one dispatch also takes
every further complete group already queued (up to `max_groups_per_call`), and each
worker runs its slot of all of them as one batch. A dispatch may end inside a block: the
rest of that block stays first in the queue (it is the oldest) and goes out next.
Blocks whose request already gave up (timed out, client gone) are skipped, never computed;
`on_cancelled(rows)` hears how many queued rows each skip dropped (the metric
coded_cancelled_queries).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from runtime.errors import ServiceUnavailable


@dataclass(frozen=True)
class Answers:
    """A request's answers, one row per query."""

    logits: dict[str, np.ndarray]  # task -> [b, num_classes] float32 (NaN rows: unavailable)
    reconstructed: np.ndarray  # [b] bool: decoded from coded results, not its own worker's
    unavailable_heads: tuple[str, ...] = ()  # ParM: only the primary head is decoded


@dataclass(eq=False)
class Block:
    """One request's queries x [b, C, H, W]; `future` gets its Answers when every row is in
    (or the first error)."""

    x: np.ndarray
    future: asyncio.Future[Answers]
    enqueued_s: float  # event-loop clock
    dispatched_s: float | None = None  # when its first rows went out
    taken: int = 0  # rows handed to dispatches so far
    _logits: dict[str, np.ndarray] = field(default_factory=dict)
    _reconstructed: np.ndarray | None = None
    _unavailable: set[str] = field(default_factory=set)
    _filled: int = 0

    def __len__(self) -> int:
        return len(self.x)

    @property
    def remaining(self) -> int:
        return len(self.x) - self.taken

    def fill(self, rows: slice | np.ndarray, logits: dict[str, np.ndarray],
             reconstructed: np.ndarray, unavailable: tuple[str, ...]) -> int:
        """Answer `rows` of this block (each row exactly once, across dispatches); returns
        how many reconstructed answers this delivered (0 once the request gave up)."""
        if self.future.done():
            return 0
        b = len(self.x)
        if self._reconstructed is None and len(reconstructed) == b:  # every row at once (rows
            # are sorted, each once): the dispatch's own arrays are the answer, no copy
            self.future.set_result(Answers(dict(logits), reconstructed, tuple(sorted(unavailable))))
            return int(np.count_nonzero(reconstructed))
        if self._reconstructed is None:
            self._logits = {t: np.empty((b, v.shape[1]), np.float32) for t, v in logits.items()}
            self._reconstructed = np.zeros(b, np.bool_)
        for task, values in logits.items():
            self._logits[task][rows] = values
        self._reconstructed[rows] = reconstructed
        self._unavailable.update(unavailable)
        self._filled += len(reconstructed)
        if self._filled >= b:
            self.future.set_result(Answers(self._logits, self._reconstructed,
                                           tuple(sorted(self._unavailable))))
        return int(np.count_nonzero(reconstructed))

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of a block, at rows [at, at + stop - start) of a dispatch."""

    block: Block
    start: int
    stop: int
    at: int


class Batch:
    """One dispatch: the queries x [m, C, H, W] of one or more blocks' rows, in queue order.

    Modes answer rows by their index in the batch (`answer`), all at once or a subset at
    a time (uncoded answers each worker's rows when they land)."""

    def __init__(self, pieces: list[Piece]) -> None:
        self.pieces = pieces
        # the scheduler's: called once when the batch only waits on stragglers
        self.on_stall: Callable[[], None] | None = None
        xs = [p.block.x[p.start:p.stop] for p in pieces]
        self.x = xs[0] if len(xs) == 1 else np.concatenate(xs)  # [m, C, H, W]

    def __len__(self) -> int:
        return len(self.x)

    @property
    def blocks(self) -> Iterator[Block]:
        return (p.block for p in self.pieces)

    def answer(self, logits: dict[str, np.ndarray], reconstructed: np.ndarray,
               unavailable: tuple[str, ...] = (), rows: np.ndarray | None = None) -> int:
        """logits task -> [r, classes] and reconstructed [r] for batch rows `rows` (sorted
        indices; None = every row, r = m); returns the reconstructed answers delivered."""
        delivered = 0
        for p in self.pieces:
            if rows is None:
                sel: slice | np.ndarray = slice(p.at, p.at + p.stop - p.start)
                target: slice | np.ndarray = slice(p.start, p.stop)
            else:
                lo, hi = np.searchsorted(rows, [p.at, p.at + p.stop - p.start])
                if lo == hi:
                    continue
                sel = slice(int(lo), int(hi))
                target = rows[lo:hi] - p.at + p.start
            delivered += p.block.fill(target, {t: v[sel] for t, v in logits.items()},
                                      reconstructed[sel], unavailable)
        return delivered

    def fail(self, error: BaseException, rows: np.ndarray | None = None) -> None:
        """Fail the requests owning `rows` (None = every row) with `error`."""
        for p in self.pieces:
            if rows is not None and not np.any((rows >= p.at) & (rows < p.at + p.stop - p.start)):
                continue
            p.block.fail(error)


class Batcher:
    def __init__(
        self,
        group_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        clock: Callable[[], float] | None = None,
        on_cancelled: Callable[[int], None] | None = None,
    ) -> None:
        self.group_size = group_size
        self.on_cancelled = on_cancelled  # rows of a given-up block dropped before dispatch
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._clock = clock
        self._queue: collections.deque[Block] = collections.deque()
        self._queued = 0  # rows not yet dispatched, of every queued block (live or not)
        self._arrived = asyncio.Event()

    def now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    def __len__(self) -> int:
        """Queued queries (O(1); counts blocks that gave up until they are skipped)."""
        return self._queued

    def submit(self, xs: np.ndarray) -> Block:
        """Queue the queries xs [B, C, H, W] as one block; all-or-nothing so a request is
        never split between "queued" and "rejected". Raises ServiceUnavailable when full."""
        if self._queued + len(xs) > self.max_queue_size:
            self._purge_dead()  # O(queue), only when it looks full: given-up blocks hold room
        if self._queued + len(xs) > self.max_queue_size:
            raise ServiceUnavailable(
                f"server overloaded: {self._queued} queries queued, limit "
                f"{self.max_queue_size}; retry after the Retry-After delay")
        block = Block(x=xs, future=asyncio.get_running_loop().create_future(),
                      enqueued_s=self.now())
        self._queue.append(block)
        self._queued += len(xs)
        self._arrived.set()
        return block

    def drain(self) -> list[Block]:
        """Remove and return every queued block (shutdown)."""
        blocks = list(self._queue)
        self._queue.clear()
        self._queued = 0
        for block in blocks:
            if block.future.done():
                self._cancelled(block)
        return blocks

    def _cancelled(self, block: Block) -> None:
        """A block whose request gave up leaves the queue: its rows are never computed."""
        if block.remaining and self.on_cancelled is not None:
            self.on_cancelled(block.remaining)

    def _drop_head(self) -> None:
        block = self._queue.popleft()
        self._queued -= block.remaining
        self._cancelled(block)

    def _purge_dead(self) -> None:
        """Drop every queued block whose request gave up, wherever it is in the queue."""
        live: collections.deque[Block] = collections.deque()
        for block in self._queue:
            if block.future.done():
                self._queued -= block.remaining
                self._cancelled(block)
            else:
                live.append(block)
        self._queue = live

    def _drop_dead(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._drop_head()

    def live_count(self, at_most: int | None = None) -> int:
        """Queued queries whose request still waits for them (scans blocks, stopping once
        `at_most` are counted)."""
        live = 0
        for block in self._queue:
            if not block.future.done():
                live += block.remaining
                if at_most is not None and live >= at_most:
                    break
        return live

    async def next_group(self, max_groups: int = 1) -> Batch:
        """Wait for the next dispatch under the rule above: one group of 1..k live queries,
        plus as many further COMPLETE groups as are already queued (up to max_groups in all),
        so that under load one worker call carries several groups ([G, C, H, W] batches)."""
        k = self.group_size
        while True:
            self._drop_dead()
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            live = self.live_count(at_most=max_groups * k)
            if live < k:
                remaining = self._queue[0].enqueued_s + self.max_queue_delay_s - self.now()
                if remaining > 0:
                    self._arrived.clear()
                    try:
                        async with asyncio.timeout(remaining):  # no task, unlike wait_for
                            await self._arrived.wait()
                    except TimeoutError:
                        pass
                    continue
            take = min(live, max(1, min(max_groups, live // k)) * k)
            pieces = self._take(take)
            if pieces:
                return Batch(pieces)

    def _take(self, take: int) -> list[Piece]:
        pieces: list[Piece] = []
        at = 0
        while self._queue and at < take:
            block = self._queue[0]
            if block.future.done():
                self._drop_head()
                continue
            rows = min(block.remaining, take - at)
            pieces.append(Piece(block, block.taken, block.taken + rows, at))
            block.taken += rows
            self._queued -= rows
            at += rows
            if block.remaining == 0:
                self._queue.popleft()
        return pieces
