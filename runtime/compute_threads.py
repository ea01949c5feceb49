"""The engine's compute threads: a few threads taking jobs from one FIFO queue.

It is a `concurrent.futures.Executor` (`submit` returns a Future: run_in_executor, loading
and warming models, freeing buffers), plus `post` for the hot path, every worker call:
a `Job` without a Future's Condition, the executor's thread-count check or a second
done-callback hop. On the 2-core VM of bench/results/serving, `ThreadPoolExecutor.submit`
+ `asyncio.wrap_future` cost the event loop ~90 us of CPU per call (five per coded
dispatch) against ~55 us for a bare queue and one `call_soon_threadsafe`.
"""

from __future__ import annotations

import enum
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


class Job:
    """One function queued for a compute thread; `on_done(job)` runs once it ended: on the
    compute thread after it ran, or on the cancelling thread when cancelled before it
    started (then the function never runs)."""

    __slots__ = ("_fn", "_callbacks", "_lock", "state", "started_s", "value", "error")

    def __init__(self, fn: Callable[[], Any], on_done: Callable[[Job], None],
                 lock: threading.Lock) -> None:
        self._fn = fn
        self._callbacks = [on_done]
        self._lock = lock  # the pool's: guards every job's state and callbacks
        self.state = JobState.QUEUED
        self.started_s = 0.0  # time.monotonic() when a compute thread took it
        self.value: Any = None
        self.error: BaseException | None = None

    def running(self) -> bool:
        return self.state is JobState.RUNNING

    def done(self) -> bool:
        return self.state in (JobState.DONE, JobState.CANCELLED)

    def cancel(self) -> bool:
        """Cancel a job not yet started (True); a running or finished one goes on (False)."""
        with self._lock:
            if self.state is not JobState.QUEUED:
                return False
            self.state = JobState.CANCELLED
        self._finish()
        return True

    def add_done_callback(self, fn: Callable[[Job], None]) -> None:
        """`fn(job)` once the job has ended (at once, here, if it has)."""
        with self._lock:
            if not self.done():
                self._callbacks.append(fn)
                return
        fn(self)

    def __call__(self) -> None:  # on a compute thread
        with self._lock:
            if self.state is not JobState.QUEUED:  # cancelled while queued
                return
            # before the state: a RUNNING job's started_s is always its own (busy_s)
            self.started_s = time.monotonic()
            self.state = JobState.RUNNING
        try:
            self.value = self._fn()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the job
            self.error = exc
        with self._lock:
            self.state = JobState.DONE
        self._finish()

    def _finish(self) -> None:
        with self._lock:
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)


class ComputeThreads(Executor):
    def __init__(self, threads: int, name: str = "compute") -> None:
        if threads < 1:
            raise ValueError(f"compute threads must be >= 1, got {threads}")
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [threading.Thread(target=self._serve, name=f"{name}_{i}")
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()
        # Stop the threads before the interpreter joins non-daemon threads at exit (an engine
        # that was never stopped); concurrent.futures' own executors register the same way.
        threading._register_atexit(self._at_exit)  # type: ignore[attr-defined]

    def _serve(self) -> None:
        while (job := self._queue.get()) is not None:
            job()

    def post(self, fn: Callable[[], Any], on_done: Callable[[Job], None]) -> Job:
        """Queue `fn`; see Job for when `on_done(job)` runs."""
        job = Job(fn, on_done, self._lock)
        with self._lock:  # never queued behind shutdown's stop signals
            if self._closed:
                raise RuntimeError("cannot post a job after shutdown")
            self._queue.put(job)
        return job

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():  # not cancelled by its waiter
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - the Future carries it
                    future.set_exception(exc)
                else:
                    future.set_result(result)

        self.post(run, lambda job: future.cancel() if job.state is JobState.CANCELLED
                  else None)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new jobs; with `cancel_futures` the queued ones never run; each thread ends
        after the job it runs (joined when `wait`)."""
        with self._lock:
            if self._closed:
                already = True
            else:
                already, self._closed = False, True
        if not already:
            if cancel_futures:
                while True:
                    try:
                        job = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if job is not None:
                        job.cancel()
            for _ in self._threads:
                self._queue.put(None)
        if wait:
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join()

    def _at_exit(self) -> None:
        self.shutdown(wait=True, cancel_futures=True)
