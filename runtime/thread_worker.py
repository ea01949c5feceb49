"""The in-process worker backend: each worker's models run on the engine's thread pool."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

import numpy as np

from runtime.compute_threads import ComputeThreads, Job, JobState
from runtime.context import EngineContext
from runtime.engines import ModelRunner, close_runners
from runtime.errors import WorkerDead, WorkerError
from runtime.worker import CallFault, GroupTag, WorkerState

logger = logging.getLogger(__name__)


class ThreadWorker:
    """One compute node: named models, one call at a time (like one device)."""

    def __init__(
        self,
        index: int,
        load: Callable[[], Mapping[str, ModelRunner]],
        warmup: Mapping[str, np.ndarray],
        threads: ComputeThreads,
        *,
        incarnation: int = 0,
    ) -> None:
        self.index = index
        self.incarnation = incarnation
        self.state = WorkerState.NEW
        self._load = load
        self._warmup = dict(warmup)
        self._threads = threads
        self._models: Mapping[str, ModelRunner] = {}
        self._lock = asyncio.Lock()  # one call at a time, as on a real device
        self._running: Job | None = None

    def __repr__(self) -> str:
        return f"ThreadWorker({self.index}, incarnation={self.incarnation}, {self.state.value})"

    async def start(self) -> None:
        if self.state is not WorkerState.NEW:
            raise RuntimeError(f"{self!r}: start() needs a new worker")
        self.state = WorkerState.STARTING
        loop = asyncio.get_running_loop()
        try:
            self._models = await loop.run_in_executor(self._threads, self._load)
            for name, batch in self._warmup.items():
                await loop.run_in_executor(self._threads, self._models[name].run, batch)
        except BaseException:
            self.state = WorkerState.DEAD
            raise
        self.state = WorkerState.READY

    async def run(self, model: str, batch: np.ndarray, group: GroupTag | None = None,
                  fault: CallFault | None = None) -> np.ndarray:
        if self.state is not WorkerState.READY:
            raise WorkerDead(f"worker {self.index} is {self.state.value}")
        if fault is not None and fault.die:
            self.state = WorkerState.DEAD
            raise WorkerDead(fault.die)
        runner = self._models.get(model)
        if runner is None:
            raise WorkerError(f"worker {self.index} has no model {model!r}; it has "
                              f"{sorted(self._models)}")
        result = await self._compute(runner, batch)
        if fault is not None:
            await fault.after_run(self.index)
        return result

    async def _compute(self, runner: ModelRunner, batch: np.ndarray) -> np.ndarray:
        """One call at a time. A call cancelled before its compute thread picks it up never
        runs; one cancelled while running keeps the worker busy until it ends (a thread
        cannot be stopped), so the next call never overlaps it."""
        await self._lock.acquire()
        if self.state is not WorkerState.READY:  # died while this call waited
            self._lock.release()
            raise WorkerDead(f"worker {self.index} is {self.state.value}")
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[np.ndarray] = loop.create_future()

        def settle(job: Job) -> None:  # on the loop: the worker is free, the call answered
            self._lock.release()
            if answer.done():  # the call was cancelled meanwhile
                return
            if job.state is JobState.CANCELLED:
                answer.cancel()
            elif job.error is not None:
                answer.set_exception(job.error)
            else:
                answer.set_result(job.value)

        def landed(job: Job) -> None:  # where the job ended: its compute thread, or here
            try:  # one hop back to the loop per call, the answer and the release together
                loop.call_soon_threadsafe(settle, job)
            except RuntimeError:  # the loop is closed (shutdown): nobody waits any more
                pass

        try:
            job = self._threads.post(lambda: runner.run(batch), landed)
        except BaseException:
            self._lock.release()
            raise
        # cancelling the call cancels a job not yet started (its compute thread never runs it)
        answer.add_done_callback(lambda a: job.cancel() if a.cancelled() else None)
        self._running = job
        return await answer

    async def lost(self) -> str:
        await asyncio.get_running_loop().create_future()  # a thread dies only in a call
        raise AssertionError("unreachable")

    def busy_s(self) -> float:
        job = self._running
        if job is None or not job.running():
            return 0.0
        return time.monotonic() - job.started_s

    async def stop(self) -> None:
        """Stopped at once; its models' buffers are freed on a compute thread once no call
        of this worker runs any more (a hung call keeps them until it ends)."""
        self.state = WorkerState.STOPPED
        models, self._models = list(self._models.values()), {}
        if not models:
            return
        running = self._running

        def free(_: object = None) -> None:
            try:
                self._threads.post(lambda: _close_logged(self.index, models), _ignore)
            except RuntimeError:  # the pool is shut down (server exit): the process frees them
                pass

        if running is not None and not running.done():
            running.add_done_callback(free)
        else:
            free()


def _ignore(_: Job) -> None:
    pass


def _close_logged(index: int, models: list[ModelRunner]) -> None:
    try:
        close_runners(models)
    except Exception:  # noqa: BLE001 - a leak to report, not a reason to fail a restart
        logger.exception("freeing worker %d's model buffers failed", index)


class ThreadBackend:
    """Workers as threads of this process, loading their models from the bundle."""

    def __init__(self, context: EngineContext, size: int,
                 worker_models: Callable[[int], list[str]]) -> None:
        self._context = context
        self._worker_models = worker_models

    def make_worker(self, index: int, incarnation: int) -> ThreadWorker:
        names = self._worker_models(index)
        models = self._context.models
        return ThreadWorker(index, lambda: models.worker_models(index, names),
                            models.warmup_inputs(names), self._context.threads,
                            incarnation=incarnation)

    async def close(self) -> None:
        """Nothing to release: the engine owns the compute threads."""
