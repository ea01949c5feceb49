"""ThreadWorker: one call at a time, cancellation, busy time and faults acted out in-process,
with a runner the test holds (threading events: no timing thresholds)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from runtime_harness import until

from runtime.compute_threads import ComputeThreads
from runtime.errors import InjectedFailure, WorkerDead
from runtime.thread_worker import ThreadWorker
from runtime.worker import CallFault, WorkerState

SAFETY_S = 5.0  # bounds a wait that an event ends at once; never reached unless a test fails
X = np.ones((1, 2), np.float32)


class HeldRunner:
    """run(x) blocks its thread until the test releases it; records every call it ran."""

    def __init__(self) -> None:
        self.ran: list[float] = []
        self.started = threading.Semaphore(0)
        self.release = threading.Event()

    def run(self, x: np.ndarray) -> np.ndarray:
        self.started.release()
        assert self.release.wait(SAFETY_S)
        self.ran.append(float(x[0, 0]))
        return x * 2


async def _worker(runner: HeldRunner, threads: int = 2) -> tuple[ThreadWorker, ComputeThreads]:
    executor = ComputeThreads(threads)
    worker = ThreadWorker(0, lambda: {"f": runner}, {}, executor)
    await worker.start()
    return worker, executor


async def _started(runner: HeldRunner) -> None:
    assert await asyncio.to_thread(runner.started.acquire, timeout=SAFETY_S)


@pytest.mark.asyncio
async def test_a_call_cancelled_before_it_runs_is_never_run() -> None:
    runner = HeldRunner()
    worker, executor = await _worker(runner)
    first = asyncio.create_task(worker.run("f", X * 1))
    await _started(runner)
    queued = asyncio.create_task(worker.run("f", X * 3))  # waits: one call at a time
    await asyncio.sleep(0)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    runner.release.set()
    np.testing.assert_array_equal(await first, X * 2)
    np.testing.assert_array_equal(await worker.run("f", X * 5), X * 10)
    assert runner.ran == [1.0, 5.0]  # the cancelled call never ran
    executor.shutdown()


@pytest.mark.asyncio
async def test_a_call_cancelled_while_running_keeps_the_worker_busy_until_it_ends() -> None:
    runner = HeldRunner()
    worker, executor = await _worker(runner)
    assert worker.busy_s() == 0.0
    running = asyncio.create_task(worker.run("f", X * 1))
    await _started(runner)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert worker.busy_s() > 0.0  # its thread still runs it
    after = asyncio.create_task(worker.run("f", X * 7))
    await asyncio.sleep(0.01)
    assert runner.started.acquire(blocking=False) is False  # it never overlapped the first
    runner.release.set()
    np.testing.assert_array_equal(await asyncio.wait_for(after, SAFETY_S), X * 14)
    assert runner.ran == [1.0, 7.0]
    await until(lambda: worker.busy_s() == 0.0, "idle again")
    executor.shutdown()


@pytest.mark.asyncio
async def test_a_call_comes_back_to_the_loop_in_one_hop() -> None:
    """Each hop from a compute thread wakes the event loop (~0.1 ms of its CPU on a busy VM):
    the answer and the worker's release travel together. A failing call too."""
    runner = HeldRunner()
    runner.release.set()
    worker, executor = await _worker(runner)
    loop = asyncio.get_running_loop()
    hops: list[object] = []
    send = loop.call_soon_threadsafe

    def counted(callback, *args, **kwargs):  # type: ignore[no-untyped-def]
        hops.append(callback)
        return send(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
    try:
        np.testing.assert_array_equal(await worker.run("f", X * 2), X * 4)
        assert len(hops) == 1
        runner.run = lambda x: (_ for _ in ()).throw(ValueError("engine crash"))  # type: ignore[method-assign]
        with pytest.raises(ValueError, match="engine crash"):
            await worker.run("f", X)
        assert len(hops) == 2
        runner.run = lambda x: x  # type: ignore[method-assign]
        np.testing.assert_array_equal(await worker.run("f", X * 3), X * 3)  # the lock was freed
        assert len(hops) == 3
    finally:
        del loop.call_soon_threadsafe
        executor.shutdown()


@pytest.mark.asyncio
async def test_faults_are_acted_out_by_the_worker() -> None:
    runner = HeldRunner()
    runner.release.set()
    worker, executor = await _worker(runner)
    with pytest.raises(InjectedFailure, match="worker 0: injected failure"):
        await worker.run("f", X, fault=CallFault(fail=True))
    assert runner.ran == [1.0] and worker.state is WorkerState.READY  # it ran: an erasure
    with pytest.raises(WorkerDead, match="doomed"):
        await worker.run("f", X, fault=CallFault(die="doomed"))
    assert worker.state is WorkerState.DEAD and runner.ran == [1.0]  # died instead of running
    executor.shutdown()


class ClosingRunner(HeldRunner):
    """A HeldRunner holding buffers outside Python's heap (like TensorRTRunner): close()."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = threading.Event()
        self.closed_while_running = False
        self.running = False

    def run(self, x: np.ndarray) -> np.ndarray:
        self.running = True
        try:
            return super().run(x)
        finally:
            self.running = False

    def close(self) -> None:
        self.closed_while_running = self.running
        self.closed.set()


@pytest.mark.asyncio
async def test_a_stopped_worker_frees_its_models_buffers() -> None:
    runner = ClosingRunner()
    runner.release.set()
    worker, executor = await _worker(runner)
    await worker.run("f", X)
    await worker.stop()
    assert await asyncio.to_thread(runner.closed.wait, SAFETY_S)
    assert not runner.closed_while_running
    executor.shutdown()


@pytest.mark.asyncio
async def test_a_worker_stopped_mid_call_frees_its_buffers_only_after_the_call() -> None:
    runner = ClosingRunner()
    worker, executor = await _worker(runner)
    call = asyncio.create_task(worker.run("f", X))
    await _started(runner)
    await worker.stop()  # e.g. a hung worker replaced by the pool
    await asyncio.sleep(0)
    assert not runner.closed.is_set()  # its call still reads the buffers
    runner.release.set()
    np.testing.assert_array_equal(await call, X * 2)
    assert await asyncio.to_thread(runner.closed.wait, SAFETY_S)
    assert not runner.closed_while_running
    executor.shutdown()
