"""ComputeThreads: the engine's compute threads, as an Executor and through `post`; held jobs
(threading events) decide every order, no timing thresholds."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import CancelledError

import pytest

from runtime.compute_threads import ComputeThreads, Job, JobState

SAFETY_S = 5.0  # bounds a wait that an event ends at once; never reached unless a test fails


class Gate:
    """A job body that blocks its thread until the test opens the gate."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.open = threading.Event()

    def __call__(self) -> str:
        self.started.set()
        assert self.open.wait(SAFETY_S)
        return "opened"


def _ended(jobs: list[Job]) -> tuple[threading.Event, Callable[[Job], None]]:
    ended = threading.Event()

    def on_done(job: Job) -> None:
        jobs.append(job)
        ended.set()

    return ended, on_done


def test_submit_is_an_executor_future_with_results_and_errors() -> None:
    threads = ComputeThreads(2)
    try:
        assert threads.submit(lambda a, b=0: a + b, 2, b=3).result(SAFETY_S) == 5
        with pytest.raises(ZeroDivisionError):
            threads.submit(lambda: 1 / 0).result(SAFETY_S)
        assert list(threads.map(lambda x: x * x, range(4))) == [0, 1, 4, 9]
    finally:
        threads.shutdown()


def test_a_posted_job_reports_its_value_or_error_once_it_ran() -> None:
    threads = ComputeThreads(1)
    try:
        jobs: list[Job] = []
        ended, on_done = _ended(jobs)
        threads.post(lambda: 42, on_done)
        assert ended.wait(SAFETY_S)
        assert jobs[0].state is JobState.DONE and jobs[0].value == 42 and jobs[0].error is None
        ended.clear()
        threads.post(lambda: [][1], on_done)
        assert ended.wait(SAFETY_S)
        assert isinstance(jobs[1].error, IndexError)
    finally:
        threads.shutdown()


def test_a_job_cancelled_while_queued_never_runs_and_a_running_one_goes_on() -> None:
    threads = ComputeThreads(1)
    gate = Gate()
    try:
        jobs: list[Job] = []
        _, on_done = _ended(jobs)
        running = threads.post(gate, on_done)
        assert gate.started.wait(SAFETY_S)
        ran: list[int] = []
        queued = threads.post(lambda: ran.append(1), on_done)
        assert queued.cancel() is True
        assert jobs == [queued] and queued.state is JobState.CANCELLED  # reported here, at once
        assert running.running() and running.cancel() is False
        later: list[Job] = []
        running.add_done_callback(later.append)
        gate.open.set()
        threads.shutdown(wait=True)
        assert ran == [] and running.value == "opened" and later == [running]
        after: list[Job] = []
        running.add_done_callback(after.append)  # already ended: called at once
        assert after == [running]
    finally:
        gate.open.set()
        threads.shutdown()


def test_shutdown_cancels_queued_work_and_refuses_new_work() -> None:
    threads = ComputeThreads(1)
    gate = Gate()
    try:
        first = threads.submit(gate)
        assert gate.started.wait(SAFETY_S)
        queued_future = threads.submit(lambda: "never")
        queued_job = threads.post(lambda: "never", lambda job: None)
        threads.shutdown(wait=False, cancel_futures=True)
        assert queued_job.state is JobState.CANCELLED
        with pytest.raises(CancelledError):
            queued_future.result(SAFETY_S)
        with pytest.raises(RuntimeError, match="after shutdown"):
            threads.post(lambda: None, lambda job: None)
        with pytest.raises(RuntimeError, match="after shutdown"):
            threads.submit(lambda: None)
        gate.open.set()
        assert first.result(SAFETY_S) == "opened"  # the running job ends normally
        threads.shutdown(wait=True)
        assert not any(t.is_alive() for t in threads._threads)
    finally:
        gate.open.set()
        threads.shutdown()


def test_a_future_cancelled_by_its_waiter_before_it_starts_never_runs() -> None:
    threads = ComputeThreads(1)
    gate = Gate()
    try:
        threads.submit(gate)
        assert gate.started.wait(SAFETY_S)
        ran: list[int] = []
        waiting = threads.submit(lambda: ran.append(1))
        assert waiting.cancel() is True
        gate.open.set()
        assert threads.submit(lambda: "after").result(SAFETY_S) == "after"
        assert ran == []
    finally:
        gate.open.set()
        threads.shutdown()


def test_at_least_one_thread() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        ComputeThreads(0)
