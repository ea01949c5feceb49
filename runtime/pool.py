"""`WorkerPool`: n workers behind one call, `submit(index, model, batch, group)` -> a task.

It adds what a cluster manager would: a per-call deadline, erasure accounting (every
failure is a `WorkerError`, which the modes treat as an erasure) and a supervisor that
replaces workers that die, go overdue or crash. It knows nothing of how a worker runs
(runtime.worker) or of fault injection (runtime.faults wraps the workers it is given).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence

import numpy as np

from runtime.errors import InjectedFailure, WorkerDead, WorkerError, WorkerOverdue
from runtime.metrics import Metrics
from runtime.worker import GroupTag, Worker, WorkerState

logger = logging.getLogger(__name__)

RESTART_ATTEMPTS = 5
RESTART_BACKOFF_S = 0.2


class WorkerPool:
    def __init__(self, size: int, make_worker: Callable[[int, int], Worker], *,
                 deadline_s: float, metrics: Metrics) -> None:
        self.size = size
        self._make_worker = make_worker  # (index, incarnation) -> Worker
        self._deadline_s = deadline_s
        self._metrics = metrics
        self._workers: list[Worker] = []
        self._restarts: dict[int, asyncio.Task[None]] = {}
        self._watches: dict[int, asyncio.Task[None]] = {}  # worker.lost(), per index
        self._calls: set[asyncio.Task[np.ndarray]] = set()  # in flight, incl. late ones
        self._group_ids = itertools.count()
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._workers = [self._make_worker(i, 0) for i in range(self.size)]
        await asyncio.gather(*(w.start() for w in self._workers))
        for w in self._workers:
            self._metrics.worker_ready.labels(worker=str(w.index)).set(1)
            self._watch(w)
        self._changed()

    @property
    def ready(self) -> bool:
        return bool(self._workers) and all(w.state is WorkerState.READY for w in self._workers)

    def states(self) -> list[str]:
        return [w.state.value for w in self._workers]

    def up(self) -> set[int]:
        """The workers that can take a call now."""
        return {w.index for w in self._workers if w.state is WorkerState.READY}

    def _changed(self) -> None:
        self._metrics.workers_down.set(self.size - len(self.up()))

    async def stop(self) -> None:
        self._closing = True
        pending = [*self._restarts.values(), *self._watches.values(), *self._calls]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(*(w.stop() for w in self._workers))

    # -- the call ----------------------------------------------------------------------------
    def new_group(self, systematic: Sequence[int]) -> GroupTag:
        """A tag for the calls of one coding group; `systematic`: its exact-answer workers."""
        return GroupTag(next(self._group_ids), tuple(systematic))

    def submit(self, index: int, model: str, batch: np.ndarray, group: GroupTag | None = None
               ) -> asyncio.Task[np.ndarray]:
        """`call` as a task the pool tracks, so shutdown can cancel late calls cleanly."""
        task = asyncio.create_task(self.call(index, model, batch, group))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        return task

    async def call(self, index: int, model: str, batch: np.ndarray,
                   group: GroupTag | None = None) -> np.ndarray:
        """Worker `index` runs `model`; any failure raises WorkerError (= an erasure)."""
        worker = self._workers[index]
        # A call is cancelled once its group is answered without it, long before its
        # deadline; a worker hung in one (whose later calls are all cancelled too) is caught
        # here instead.
        if worker.state is WorkerState.READY and (busy_s := worker.busy_s()) > self._deadline_s:
            self._supervise(worker, WorkerOverdue(
                f"worker {index} has been running one call for {busy_s * 1000:.0f} ms, past "
                f"its {self._deadline_s * 1000:.0f} ms deadline"))
        try:
            # in this task, not a new one (wait_for's): the call reaches its worker (a thread
            # worker's executor) on this loop turn, before a dispatch's encoders run inline
            async with asyncio.timeout(self._deadline_s):
                return await worker.run(model, batch, group)
        except TimeoutError:
            error: WorkerError = WorkerOverdue(
                f"worker {index} missed its {self._deadline_s * 1000:.0f} ms deadline")
        except WorkerError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - an engine crash is an erasure too
            error = WorkerError(f"worker {index} failed: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
        self._metrics.worker_failures.labels(worker=str(index), reason=error.reason).inc()
        # A failed call is an erasure; a dead, overdue or crashed worker is also replaced.
        if not isinstance(error, InjectedFailure):
            self._supervise(worker, error)
        raise error

    # -- supervisor --------------------------------------------------------------------------
    def _watch(self, worker: Worker) -> None:
        """Restart `worker` when it is found dead outside any call (worker.lost())."""
        async def watch() -> None:
            try:
                reason = await worker.lost()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a broken watch means a broken worker
                reason = f"worker {worker.index}'s watch failed: {type(exc).__name__}: {exc}"
            if not self._closing and self._workers[worker.index] is worker:
                self._metrics.worker_failures.labels(worker=str(worker.index), reason="lost").inc()
            self._supervise(worker, WorkerDead(reason))

        self._watches[worker.index] = asyncio.create_task(watch(),
                                                          name=f"watch-worker-{worker.index}")

    def _supervise(self, worker: Worker, error: WorkerError) -> None:
        index = worker.index
        if self._closing or index in self._restarts or self._workers[index] is not worker:
            return  # already being replaced, or this was an older incarnation
        logger.warning("worker %d (incarnation %d) failed: %s; restarting it",
                       index, worker.incarnation, error)
        watch = self._watches.pop(index, None)
        if watch is not None and watch is not asyncio.current_task():
            watch.cancel()
        worker.state = WorkerState.DEAD
        self._metrics.worker_ready.labels(worker=str(index)).set(0)
        self._changed()
        self._restarts[index] = asyncio.create_task(self._restart(worker, error.reason),
                                                    name=f"restart-worker-{index}")

    async def _restart(self, old: Worker, reason: str) -> None:
        index = old.index
        try:
            await old.stop()
            for attempt in range(1, RESTART_ATTEMPTS + 1):
                fresh = self._make_worker(index, old.incarnation + attempt)
                try:
                    await fresh.start()
                except asyncio.CancelledError:  # the pool is stopping
                    await fresh.stop()
                    raise
                except Exception:  # noqa: BLE001 - logged, then retried with backoff
                    logger.exception("restart of worker %d failed (attempt %d/%d)",
                                     index, attempt, RESTART_ATTEMPTS)
                    try:
                        await fresh.stop()  # whatever it got as far as starting
                    except Exception:  # noqa: BLE001 - the next attempt makes a new one
                        logger.exception("stopping the failed start of worker %d", index)
                    await asyncio.sleep(RESTART_BACKOFF_S * attempt)
                    continue
                self._workers[index] = fresh
                self._watch(fresh)
                self._metrics.worker_restarts.labels(worker=str(index), reason=reason).inc()
                self._metrics.worker_ready.labels(worker=str(index)).set(1)
                self._changed()
                logger.info("worker %d restarted (incarnation %d)", index, fresh.incarnation)
                return
            logger.error("worker %d stays down after %d restart attempts", index, RESTART_ATTEMPTS)
        finally:
            self._restarts.pop(index, None)
