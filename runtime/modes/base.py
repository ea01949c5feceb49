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
Uncoded and replication send only the real queries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.batcher import Batch
from runtime.frontend import Frontend
from runtime.manifest import Manifest
from runtime.metrics import Metrics
from runtime.models import WORKER_F
from runtime.pool import WorkerPool

Call = tuple[int, str, np.ndarray]  # (worker, model, batch)


@dataclass(frozen=True)
class ModeOptions:
    encoders_on_workers: bool = False  # paper Remark 3: backup workers run their encoder
    systematic_grace_s: float = 0.0  # coded: wait this long for exact answers before decoding
    # coded: shape -> decoder (kernels.coding.OnlineDecoder's interface); None = on the host
    new_decoder: Callable[[tuple[int, ...]], Any] | None = None


def pad(xs: np.ndarray, k: int) -> np.ndarray:
    """[m, C, H, W] -> [ceil(m / k) * k, C, H, W], repeating the last query (the
    partial-group rule)."""
    total = -(-len(xs) // k) * k
    if len(xs) == total:
        return xs
    return np.concatenate([xs, np.repeat(xs[-1:], total - len(xs), axis=0)])


def as_groups(x: np.ndarray, k: int) -> np.ndarray:
    """The queries x [m, C, H, W] as coding groups [G, k, C, H, W] (query q is group q // k,
    slot q % k)."""
    xs = pad(x, k)  # [G*k, C, H, W]
    return xs.reshape(len(xs) // k, k, *xs.shape[1:])


def slot(groups: np.ndarray, i: int) -> np.ndarray:
    """Slot i of every group, contiguous for the engine: [G, C, H, W]."""
    return np.ascontiguousarray(groups[:, i])


class Arrivals:
    """The calls of one coding group, folded in as they land until they decode."""

    def __init__(self, tasks: dict[asyncio.Task[Any], int], metrics: Metrics) -> None:
        self.tasks = tasks  # task -> worker
        self.pending: set[asyncio.Task[Any]] = set(tasks)
        self.received: set[int] = set()
        self._metrics = metrics

    async def until(self, add: Callable[[int, Any], bool]) -> bool:
        """Wait until `add(worker, result)` (called once per successful result, in worker
        order among results that land together, so that a systematic result landing with a
        parity is used as is) returns True; False when every call ended first."""
        while self.pending:
            done, self.pending = await asyncio.wait(self.pending,
                                                    return_when=asyncio.FIRST_COMPLETED)
            decodable = False
            for task in sorted(done, key=self.tasks.__getitem__):
                if not task.cancelled() and task.exception() is None:
                    worker = self.tasks[task]
                    self.received.add(worker)
                    decodable = add(worker, task.result()) or decodable
            if decodable:
                return True
        return False

    def results(self) -> dict[int, Any]:
        """worker -> result, for every received result."""
        return {w: t.result() for t, w in self.tasks.items() if w in self.received}

    def finish(self, count_erasures: bool = True) -> None:
        """The group is answered: results still in flight are dropped (and counted when
        they land), and every launched worker whose result was not used is an erasure."""
        for task in self.pending:
            if task.done():
                continue
            worker = self.tasks[task]

            def late(t: asyncio.Task[Any], worker: int = worker) -> None:
                if not t.cancelled() and t.exception() is None:
                    self._metrics.late_dropped.labels(worker=str(worker)).inc()

            task.add_done_callback(late)
        if count_erasures:
            for worker in sorted(set(self.tasks.values()) - self.received):
                self._metrics.erasures.labels(worker=str(worker)).inc()


class Mode:
    """A serving scheme. Subclasses set `name`, the class methods and `execute`."""

    name = "base"

    def __init__(self, manifest: Manifest, pool: WorkerPool, frontend: Frontend,
                 metrics: Metrics, options: ModeOptions | None = None) -> None:
        self.manifest = manifest
        self.pool = pool
        self.frontend = frontend
        self.metrics = metrics
        self.options = options or ModeOptions()
        self.k = manifest.coding.k
        self.tasks = [h.task for h in manifest.heads]

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
            self.metrics.partial_groups.labels(**self.metrics.labels).inc()
            self.metrics.padded_queries.labels(**self.metrics.labels).inc(padded)

    def launch(self, calls: Sequence[Call], systematic: Sequence[int]) -> Arrivals:
        """Submit one coding group's calls; `systematic`: its exact-answer workers."""
        group = self.pool.new_group(systematic)
        tasks = {self.pool.submit(i, model, batch, group): i for i, model, batch in calls}
        return Arrivals(tasks, self.metrics)

    def answer(self, batch: Batch, logits: dict[str, np.ndarray], reconstructed: np.ndarray,
               unavailable: tuple[str, ...] = (), rows: np.ndarray | None = None) -> None:
        """Answer batch rows `rows` (None = all) once; reconstructed answers are counted."""
        count = batch.answer(logits, reconstructed, unavailable, rows)
        if count:
            self.metrics.reconstructed.labels(**self.metrics.labels).inc(count)
