"""What every serving mode shares: the group layout, answering, and the decodable-wait loop.

Every mode answers each row of its `Batch` exactly once, with arrays for all its rows at
a time (`Batch.answer`; answering a request that already gave up is a no-op). Worker calls
go through `WorkerPool.submit`; a call that raises is an erasure.

One call to `execute` carries G >= 1 coding groups (the batcher adds complete queued
groups under load); query q is slot q % k of group q // k, and worker i runs slot i of
all G groups as one [G, ...] batch.

Partial groups (fewer than k queries at the batcher's deadline): coded, ParM and
ApproxIFER pad the group to k with repeats of its last query, so every worker and the
encoders see in-distribution inputs (zeros would be far from the training data for the
learned encoders); padded slots' answers are never computed by the heads or returned.
Uncoded and replication send only the real queries. In a dispatch of one partial group the
padded slots and the last real one are *twins* (`padding_twins`): they compute the same
thing, so the first of their results is all of theirs, the others run as replicas of that
query only while nobody has answered it, and the group answers once its real slots are in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Iterable, KeysView, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.batcher import Batch
from runtime.deadlines import DecodeWait
from runtime.decoders import Decoders
from runtime.frontend import Frontend
from runtime.manifest import Manifest
from runtime.metrics import Metrics
from runtime.models import WORKER_F
from runtime.pool import WorkerPool
from runtime.shadow import ShadowMonitor
from runtime.worker import GroupTag

Call = tuple[int, str, np.ndarray]  # (worker, model, batch)


@dataclass(frozen=True)
class ModeOptions:
    encoders_on_workers: bool = False  # paper Remark 3: backup workers run their encoder
    systematic_grace_s: float = 0.0  # coded: wait this long for exact answers before decoding
    # coded: instead, wait for a missing systematic result as long as it has been paying
    decode_wait: DecodeWait | None = None
    # a call still missing `straggler_scale` times later than its dispatch's first result
    # (and at least straggler_min_s after the launch) is a straggler; None = never (the
    # server's --straggler-scale 0), 0.0 = as soon as the first result is in (tests)
    straggler_scale: float | None = None
    straggler_min_s: float = 0.002
    # calls the workers can run at once when they share compute threads (the thread
    # backend: its pool's threads); None = each worker computes on its own (Ray actors)
    compute_slots: int | None = None
    redispatch: bool = False  # coded: re-send a straggling group's missing systematic slots
    redispatch_copies: int = 1  # ... each to this many workers that answered (first one counts)
    # a group's calls still running this long after it is answered are cancelled (their
    # worker skips them if not yet started); None = never, they run and are dropped
    cancel_late_after_s: float | None = None
    # coded: where groups are decoded (runtime/decoders.py); None = on the host
    decoders: Decoders | None = None
    # coded, parm: rebuilds known answers off the request path (runtime/shadow.py); None = off
    shadow: ShadowMonitor | None = None


def pad(xs: np.ndarray, k: int) -> np.ndarray:
    """[m, C, H, W] -> [ceil(m / k) * k, C, H, W], repeating the last query (the
    partial-group rule)."""
    total = -(-len(xs) // k) * k
    if len(xs) == total:
        return xs
    return np.concatenate([xs, np.repeat(xs[-1:], total - len(xs), axis=0)])


def padding_twins(m: int, k: int) -> range:
    """The slots of a dispatch of m queries that hold the same query because of padding:
    the last real slot and the padding that repeats it, when the dispatch is one partial
    group (m < k); none otherwise (with several groups only the last one is padded, and a
    worker's result covers its slot of every group)."""
    return range(m - 1, k) if 0 < m < k else range(0)


def as_groups(x: np.ndarray, k: int) -> np.ndarray:
    """The queries x [m, C, H, W] as coding groups [G, k, C, H, W] (query q is group q // k,
    slot q % k)."""
    xs = pad(x, k)  # [G*k, C, H, W]
    return xs.reshape(len(xs) // k, k, *xs.shape[1:])


def slot(groups: np.ndarray, i: int) -> np.ndarray:
    """Slot i of every group, contiguous for the engine: [G, C, H, W]."""
    return np.ascontiguousarray(groups[:, i])


class StragglerWatch:
    """One dispatch's clock. A call still missing `scale` times later than the dispatch's
    first result (and at least `min_s` after the launch) is a straggler: late for its own
    reasons, not because the CPUs are busy, which makes every result of the dispatch late
    alike. When the dispatch's calls need `waves` > 1 rounds of the shared compute threads
    (5 calls on 2 threads: 3), its last call is due `waves - 1` first-result times after
    the first even when nothing straggles, so the bound is (scale + waves - 1) first-result
    times: without that, healthy calls still queued for a thread were called stragglers
    (on 2 cores, batch-1 load and no faults: 130-230 slots re-sent in 8 s, about 700
    dispatches). Relative to the dispatch on purpose: a fixed or learned absolute deadline calls
    every call late under overload, and acting on that (re-sending work, letting more
    dispatches run) would feed the overload.

    `stalled()` (once per dispatch) tells the scheduler the dispatch only waits on
    stragglers, so its in-flight slot can go to the next dispatch.

    Times are `time.perf_counter()`, not the loop clock: uvloop's clock counts whole
    milliseconds, and a first result read as 1 or 2 ms (true 1.1) moved the deadline, four
    first-result times on 2 threads, by 4 ms."""

    def __init__(self, scale: float | None, min_s: float, on_stall: Callable[[], None] | None,
                 metrics: Metrics, waves: int = 1) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.launched_s = time.perf_counter()
        self.scale, self.min_s = scale, min_s
        self.waves = waves
        self.first_s: float | None = None  # the dispatch's first result, since the launch
        self.expired: asyncio.Future[None] = loop.create_future()  # set at the deadline
        self._on_stall = on_stall
        self._metrics = metrics
        self.fired = False

    def landed(self) -> None:
        if self.first_s is None:
            self.first_s = time.perf_counter() - self.launched_s
            deadline = self.deadline_s()
            if deadline is not None:  # wakes every Arrivals of the dispatch that still waits
                self._loop.call_later(deadline - time.perf_counter(), self._expire)

    def _expire(self) -> None:
        if not self.expired.done():
            self.expired.set_result(None)

    def rearm(self) -> asyncio.Future[None]:
        """A further straggler deadline, as far from now as the first was from the launch
        (after a re-dispatch: the re-sent calls may straggle too)."""
        deadline = self.deadline_s()
        assert deadline is not None  # rearmed only after the first deadline passed
        self.expired = self._loop.create_future()
        self._loop.call_later(deadline - self.launched_s, self._expire)
        return self.expired

    def deadline_s(self) -> float | None:
        """When the calls still missing become stragglers (perf_counter); None: not yet known
        (no result yet) or never (no scale)."""
        if self.scale is None or self.first_s is None:
            return None
        return self.launched_s + max((self.scale + self.waves - 1) * self.first_s, self.min_s)

    def stalled(self) -> None:
        if not self.fired:
            self.fired = True
            self._metrics.stalled_dispatches.inc()
            if self._on_stall is not None:
                self._on_stall()


class Arrivals:
    """The calls of one coding group, folded in as they land until they decode.

    Calls are known by their *slot*: the worker they were launched on, or, for a call
    re-dispatched to another worker (`add`), the slot it stands in for; the first result
    of a slot counts. `twins`: slots that compute the same thing (`padding_twins`); the
    first result of any of them is the result of each. Every landing is told to the
    dispatch's `watch`."""

    def __init__(self, tasks: dict[asyncio.Task[Any], int], metrics: Metrics,
                 watch: StragglerWatch | None = None, cancel_late_after_s: float | None = None,
                 group: GroupTag | None = None, twins: Collection[int] = ()) -> None:
        self._loop = asyncio.get_running_loop()
        self.group = group  # the pool's tag of these calls
        self._now = self._loop.time
        self.cancel_late_after_s = cancel_late_after_s
        self.tasks = dict(tasks)  # task -> slot
        self.pending: set[asyncio.Task[Any]] = set(tasks)
        self.filled: set[int] = set()  # received slots whose result is a twin's
        self.twins = frozenset(twins) if len(twins) > 1 else frozenset()
        self._results: dict[int, Any] = {}  # slot -> its first result
        self._metrics = metrics
        self.watch = watch

    def add(self, task: asyncio.Task[Any], slot: int) -> None:
        """A further call for `slot` (a re-dispatch to another worker)."""
        self.tasks[task] = slot
        self.pending.add(task)

    @property
    def received(self) -> KeysView[int]:
        """The slots with a result."""
        return self._results.keys()

    def missing(self, slots: Iterable[int]) -> list[int]:
        """Those of `slots` without a result, twins once (their first slot): one result
        of a twin is all of theirs."""
        out = [s for s in slots if s not in self.received]
        first_twin = min(self.twins, default=None)
        return [s for s in out if s not in self.twins or s == first_twin]

    def _landed(self, task: asyncio.Task[Any]) -> list[int]:
        """The slots whose first successful result `task` is (its twins' too): none when
        it failed or they had one (both a re-dispatch and the original landed)."""
        if task.cancelled() or task.exception() is not None:
            return []
        slot = self.tasks[task]
        if slot in self.received:
            return []
        slots = sorted(self.twins) if slot in self.twins else [slot]  # twins land together
        result = task.result()
        for s in slots:
            self._results[s] = result
        self.filled.update(s for s in slots if s != slot)
        if self.watch is not None:
            self.watch.landed()
        return slots

    async def until(self, add: Callable[[int, Any], bool],
                    on_straggler: Callable[[int], bool] | None = None,
                    rounds: int = 1) -> bool:
        """Wait until `add(slot, result)` (called once per slot's first result, in slot
        order among results that land together, so that a systematic result landing with a
        parity is used as is) returns True; False when every call ended first. When the
        watch's straggler deadline passes first, the dispatch is `stalled()` and
        `on_straggler(round)` runs (it may `add` calls); while it returns True (it re-sent
        something), up to `rounds` times, a further deadline follows."""
        expired = None if self.watch is None else self.watch.expired
        round_ = 0
        while self.pending:
            waiting: set[asyncio.Future[Any]] = set(self.pending)
            if expired is not None:
                waiting.add(expired)
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if expired is not None and expired in done:  # the rest are stragglers now
                assert self.watch is not None
                done.discard(expired)
                expired = None
                self.watch.stalled()
                if on_straggler is not None and on_straggler(round_):
                    round_ += 1
                    if round_ < rounds:
                        expired = self.watch.rearm()
            self.pending -= done
            decodable = False
            for task in sorted(done, key=self.tasks.__getitem__):
                for s in self._landed(task):
                    decodable = add(s, self._results[s]) or decodable
            if decodable:
                return True
        return False

    async def wait_for(self, slots: set[int], deadline_s: float) -> set[int]:
        """Wait until the loop clock reaches `deadline_s` for the results of `slots` (or
        until none can come); returns the slots that landed."""
        arrived: set[int] = set()
        while (remaining := deadline_s - self._now()) > 0:
            waiting = {t for t in self.pending if self.tasks[t] in slots - self.received}
            if not waiting:
                break
            done, _ = await asyncio.wait(waiting, timeout=remaining,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                break
            self.pending -= done
            arrived.update(s for t in done for s in self._landed(t))
        return arrived

    def results(self) -> dict[int, Any]:
        """slot -> result, for every received slot (its first successful result)."""
        return dict(self._results)

    def finish(self, count_erasures: bool = True, keep: Collection[int] | None = None) -> None:
        """The group is answered: results still in flight are dropped (and counted when
        they land) or cancelled (and counted), and every launched slot whose result was not
        used is an erasure. With `cancel_late_after_s` set, the late calls of the slots in
        `keep` (None: every slot) are cancelled that long after the answer, because
        something still reads their results (the decode wait learns from how late the
        missing systematic results come; the shadow monitor checks a parity); every other
        late call, and that of a slot with a result (a twin's, or another copy's of a
        re-sent slot), is cancelled at once, so that a call still queued for a compute
        thread is never run: a parity nobody needed costs only the CPU that was free when
        it ran."""
        late = [task for task in self.pending if not task.done()]
        metrics = self._metrics
        for task in late:
            def count(t: asyncio.Task[Any], slot: int = self.tasks[task]) -> None:
                if t.cancelled():
                    metrics.call_cancelled(slot)
                elif t.exception() is None:
                    metrics.late_result_dropped(slot)

            task.add_done_callback(count)
        if late and self.cancel_late_after_s is not None:
            received = self.received
            read = [t for t in late if self.tasks[t] not in received
                    and (keep is None or self.tasks[t] in keep)]
            if len(read) < len(late):
                _cancel([t for t in late if t not in read])
            if read:
                self._loop.call_later(self.cancel_late_after_s, _cancel, read)
        if count_erasures:
            for slot in sorted(set(self.tasks.values()) - self.received):
                self._metrics.erasure(slot)


def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()  # a no-op for a task that has ended meanwhile


class Mode:
    """A serving scheme. Subclasses set `name`, the class methods and `execute`."""

    name = "base"
    shadows = False  # whether it rebuilds known answers for the shadow monitor

    def __init__(self, manifest: Manifest, pool: WorkerPool, frontend: Frontend,
                 metrics: Metrics, options: ModeOptions | None = None) -> None:
        self.manifest = manifest
        self.pool = pool
        self.frontend = frontend
        self.metrics = metrics
        self.options = options or ModeOptions()
        self.k = manifest.coding.k
        self.tasks = [h.task for h in manifest.heads]
        self._head_ends = np.cumsum([len(h.classes) for h in manifest.heads])[:-1]

    def split_heads(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        """A WORKER_F_HEADS result [..., sum(classes)] -> task -> [..., classes] (views)."""
        return dict(zip(self.tasks, np.split(logits, self._head_ends, axis=-1), strict=True))

    # What the engine needs to know before the pool exists -----------------------------------
    @classmethod
    def pool_size(cls, manifest: Manifest) -> int:
        raise NotImplementedError

    @classmethod
    def worker_models(cls, manifest: Manifest, index: int, encoders_on_workers: bool) -> list[str]:
        return [WORKER_F]

    @classmethod
    def frontend_encoders(cls, manifest: Manifest, encoders_on_workers: bool) -> bool:
        return False

    @classmethod
    def can_answer(cls, manifest: Manifest, up: set[int]) -> bool:
        """Whether a coding group can be answered with only the workers `up` (readiness)."""
        raise NotImplementedError

    @property
    def group_size(self) -> int:
        return self.k

    async def execute(self, batch: Batch) -> None:
        """Answer 1..max_groups_per_call*k queries: groups of k, the last possibly partial."""
        raise NotImplementedError

    # Shared helpers -------------------------------------------------------------------------
    def count_partial(self, m: int) -> None:
        padded = -m % self.k
        if padded:
            self.metrics.partial_group(padded)

    def watch(self, batch: Batch, calls: int) -> StragglerWatch:
        """The straggler clock of one dispatch of `calls` worker calls."""
        options = self.options
        slots = options.compute_slots
        waves = 1 if slots is None else -(-calls // slots)
        return StragglerWatch(options.straggler_scale, options.straggler_min_s, batch.on_stall,
                              self.metrics, waves)

    def launch(self, calls: Sequence[Call], systematic: Sequence[int], batch: Batch,
               later: int = 0, twins: Collection[int] = ()) -> Arrivals:
        """Submit one coding group's calls; `systematic`: its exact-answer workers; `later`:
        how many more calls join it once ready (the coded parities, once encoded);
        `twins`: slots computing the same thing (`padding_twins`)."""
        group = self.pool.new_group(systematic)
        tasks = {self.pool.submit(i, model, x, group): i for i, model, x in calls}
        watch = self.watch(batch, len(calls) + later)
        return Arrivals(tasks, self.metrics, watch, self.options.cancel_late_after_s,
                        group, twins)

    def shadow_parity(self, arrivals: Arrivals, first_parity: int,
                      submit: Callable[[int, Any], None]) -> None:
        """Hand a parity result of this group to `submit(worker, result)`: one that has
        landed (chosen at random, so every parity row is checked), or else the first of
        those still in flight once it lands (the answer has left either way; a parity
        that never comes shadows nothing)."""
        shadow = self.options.shadow
        assert shadow is not None  # called only with a monitor
        landed = {w: r for w, r in arrivals.results().items() if w >= first_parity}
        for task in arrivals.pending:  # done during the answer's classify: landed too
            worker = arrivals.tasks[task]
            if (worker >= first_parity and task.done() and not task.cancelled()
                    and task.exception() is None):
                landed.setdefault(worker, task.result())
        if landed:
            worker = sorted(landed)[shadow.pick(len(landed))]
            submit(worker, landed[worker])
            return
        for task in arrivals.pending:
            worker = arrivals.tasks[task]
            if worker >= first_parity and not task.done():
                def later(t: asyncio.Task[Any], worker: int = worker) -> None:
                    if not t.cancelled() and t.exception() is None:
                        submit(worker, t.result())

                task.add_done_callback(later)
                return

    def answer(self, batch: Batch, logits: dict[str, np.ndarray], reconstructed: np.ndarray,
               unavailable: tuple[str, ...] = (), rows: np.ndarray | None = None) -> None:
        """Answer batch rows `rows` (None = all) once; reconstructed answers are counted."""
        count = batch.answer(logits, reconstructed, unavailable, rows)
        if count:
            self.metrics.answers_reconstructed(count)
