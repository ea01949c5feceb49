"""Workers and their supervisor.

A `Worker` owns the models one compute node runs and has an explicit lifecycle:
`start()` (load + warm up) -> `run(model, batch)` ... -> `stop()`. `run` is the ONE
primitive the scheduler uses, an async call that returns an array or raises through its
future, so a later change can put a worker behind an actor of a distributed engine (a Ray
actor's `.remote()` returns exactly such a future) without touching the scheduler.

`WorkerPool` adds what a cluster manager would: per-call deadlines, fault injection
(tests and benchmarks only), erasure accounting and a supervisor that restarts workers
that die or go overdue.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Callable, Mapping
from concurrent.futures import Executor

import numpy as np

from runtime.config import FaultConfig
from runtime.engines import ModelRunner
from runtime.errors import InjectedFailure, WorkerDead, WorkerError, WorkerOverdue
from runtime.metrics import Metrics

logger = logging.getLogger(__name__)

RESTART_ATTEMPTS = 5
RESTART_BACKOFF_S = 0.2


class WorkerState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    DEAD = "dead"
    STOPPED = "stopped"


class Worker:
    """One compute node: named models, run one call at a time (like one device)."""

    def __init__(
        self,
        index: int,
        load: Callable[[], Mapping[str, ModelRunner]],
        warmup: Mapping[str, np.ndarray],
        executor: Executor,
        *,
        incarnation: int = 0,
        kill_after_calls: int | None = None,
    ) -> None:
        self.index = index
        self.incarnation = incarnation
        self.state = WorkerState.NEW
        self.calls = 0
        self._load = load
        self._warmup = dict(warmup)
        self._executor = executor
        self._kill_after_calls = kill_after_calls
        self._models: Mapping[str, ModelRunner] = {}
        self._lock = asyncio.Lock()  # one call at a time, as on a real device

    def __repr__(self) -> str:
        return f"Worker({self.index}, incarnation={self.incarnation}, {self.state.value})"

    async def start(self) -> None:
        if self.state is not WorkerState.NEW:
            raise RuntimeError(f"{self!r}: start() needs a new worker")
        self.state = WorkerState.STARTING
        loop = asyncio.get_running_loop()
        try:
            self._models = await loop.run_in_executor(self._executor, self._load)
            for name, batch in self._warmup.items():
                await loop.run_in_executor(self._executor, self._models[name].run, batch)
        except BaseException:
            self.state = WorkerState.DEAD
            raise
        self.state = WorkerState.READY

    async def run(self, model: str, batch: np.ndarray) -> np.ndarray:
        """Run `model` on `batch`; raises WorkerError subclasses when the worker cannot."""
        if self.state is not WorkerState.READY:
            raise WorkerDead(f"worker {self.index} is {self.state.value}")
        runner = self._models.get(model)
        if runner is None:
            raise WorkerError(f"worker {self.index} has no model {model!r}; it has "
                              f"{sorted(self._models)}")
        async with self._lock:
            if self.state is not WorkerState.READY:  # died while this call waited
                raise WorkerDead(f"worker {self.index} is {self.state.value}")
            self.calls += 1
            if self._kill_after_calls is not None and self.calls > self._kill_after_calls:
                self.state = WorkerState.DEAD
                raise WorkerDead(f"worker {self.index} killed by fault injection after "
                                 f"{self._kill_after_calls} calls")
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, runner.run, batch)

    async def stop(self) -> None:
        self.state = WorkerState.STOPPED
        self._models = {}


class WorkerPool:
    """n workers behind `call(index, model, batch)`, with deadlines, faults and restarts."""

    def __init__(
        self,
        size: int,
        make_worker: Callable[[int, int, int | None], Worker],
        *,
        deadline_s: float,
        faults: FaultConfig,
        metrics: Metrics,
    ) -> None:
        self.size = size
        self._make_worker = make_worker  # (index, incarnation, kill_after_calls) -> Worker
        self._deadline_s = deadline_s
        self._faults = faults
        self._metrics = metrics
        self._rng = random.Random(faults.seed)
        self._workers: list[Worker] = []
        self._restarts: dict[int, asyncio.Task[None]] = {}
        self._calls: set[asyncio.Task[np.ndarray]] = set()  # in flight, incl. late ones
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        kill = self._faults.kill_worker
        if kill is not None and not 0 <= kill < self.size:
            logger.warning("--fault-kill-worker %d is outside 0..%d; nothing will be killed",
                           kill, self.size - 1)
        self._workers = [
            self._make_worker(i, 0, self._faults.kill_after_calls if i == kill else None)
            for i in range(self.size)
        ]
        await asyncio.gather(*(w.start() for w in self._workers))
        for w in self._workers:
            self._metrics.worker_ready.labels(worker=str(w.index)).set(1)

    @property
    def ready(self) -> bool:
        return bool(self._workers) and all(w.state is WorkerState.READY for w in self._workers)

    def states(self) -> list[str]:
        return [w.state.value for w in self._workers]

    async def stop(self) -> None:
        self._closing = True
        pending = [*self._restarts.values(), *self._calls]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(*(w.stop() for w in self._workers))

    # -- fault plan --------------------------------------------------------------------------
    def plan_stragglers(self, k: int) -> int | None:
        """The worker delayed in this coding group under --fault-straggler-per-group."""
        if self._faults.straggler_per_group and self._faults.delay_ms > 0:
            return self._rng.randrange(k)
        return None

    def _delay_s(self, index: int, straggler: int | None) -> float:
        faults = self._faults
        if faults.straggler_per_group:
            return faults.delay_ms / 1000.0 if index == straggler else 0.0
        if faults.delay_prob > 0 and self._rng.random() < faults.delay_prob:
            return faults.delay_ms / 1000.0
        return 0.0

    # -- the call ----------------------------------------------------------------------------
    def submit(self, index: int, model: str, batch: np.ndarray, *, straggler: int | None = None
               ) -> asyncio.Task[np.ndarray]:
        """`call` as a task the pool tracks, so shutdown can cancel late calls cleanly."""
        task = asyncio.create_task(self.call(index, model, batch, straggler=straggler))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        return task

    async def call(
        self, index: int, model: str, batch: np.ndarray, *, straggler: int | None = None
    ) -> np.ndarray:
        """Worker `index` runs `model`; any failure raises WorkerError (= an erasure)."""
        worker = self._workers[index]
        delay_s = self._delay_s(index, straggler)
        fail = self._faults.fail_prob > 0 and self._rng.random() < self._faults.fail_prob

        async def attempt() -> np.ndarray:
            result = await worker.run(model, batch)
            if delay_s:  # a straggler's answer arrives late; the worker itself is free again
                await asyncio.sleep(delay_s)
            if fail:
                raise InjectedFailure(f"worker {index}: injected failure (--fault-fail-prob)")
            return result

        try:
            return await asyncio.wait_for(attempt(), self._deadline_s)
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
    def _supervise(self, worker: Worker, error: WorkerError) -> None:
        index = worker.index
        if self._closing or index in self._restarts or self._workers[index] is not worker:
            return  # already being replaced, or this was an older incarnation
        logger.warning("worker %d (incarnation %d) failed: %s; restarting it",
                       index, worker.incarnation, error)
        worker.state = WorkerState.DEAD
        self._metrics.worker_ready.labels(worker=str(index)).set(0)
        self._restarts[index] = asyncio.create_task(self._restart(worker, error.reason),
                                                    name=f"restart-worker-{index}")

    async def _restart(self, old: Worker, reason: str) -> None:
        index = old.index
        try:
            await old.stop()
            for attempt in range(1, RESTART_ATTEMPTS + 1):
                fresh = self._make_worker(index, old.incarnation + attempt, None)
                try:
                    await fresh.start()
                except Exception:  # noqa: BLE001 - logged, then retried with backoff
                    logger.exception("restart of worker %d failed (attempt %d/%d)",
                                     index, attempt, RESTART_ATTEMPTS)
                    await asyncio.sleep(RESTART_BACKOFF_S * attempt)
                    continue
                self._workers[index] = fresh
                self._metrics.worker_restarts.labels(worker=str(index), reason=reason).inc()
                self._metrics.worker_ready.labels(worker=str(index)).set(1)
                logger.info("worker %d restarted (incarnation %d)", index, fresh.incarnation)
                return
            logger.error("worker %d stays down after %d restart attempts", index, RESTART_ATTEMPTS)
        finally:
            self._restarts.pop(index, None)
