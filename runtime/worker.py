"""The worker interface: what a serving mode and the pool may assume of one compute node.

A worker owns the models one node runs and has an explicit lifecycle (Polygraphy's
runners): `start()` (load + warm up) -> `run(model, batch)` ... -> `stop()`. `run` is
the ONE primitive: an async call that returns an array or raises `WorkerError`, so a
worker can be a thread in this process (runtime/thread_worker.py) or an actor of a
distributed engine (a Ray actor call is awaitable too) without touching anything above.

To add a worker backend: write one module with a class implementing `WorkerBackend`
and register its import path in `BACKENDS` below.
"""

from __future__ import annotations

import asyncio
import enum
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from runtime.errors import InjectedFailure

if TYPE_CHECKING:
    from runtime.context import EngineContext


class WorkerState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    DEAD = "dead"
    STOPPED = "stopped"


@dataclass(frozen=True, eq=False)
class GroupTag:
    """Which coding group a call belongs to. `systematic`: the workers whose results are
    answers by themselves (not parities) in this group. Workers may ignore it; test
    machinery (runtime/faults.py) uses it to delay one systematic worker per group."""

    id: int
    systematic: tuple[int, ...]


CANCEL_POLL_S = 0.005  # how often a blocking fault delay looks whether its call was cancelled


@dataclass(frozen=True)
class CallFault:
    """What fault injection (runtime/faults.py) does to one call, decided by the engine and
    acted out where the worker runs (inside a Ray actor for the ray backend): `die` (a
    reason) -> the worker dies instead of running the call (a process-backed worker ends
    its process); else the model runs, then the answer is held `delay_s` (the worker itself
    is free again at once, as a slow link would make it look) and, with `fail`, replaced by
    an InjectedFailure."""

    delay_s: float = 0.0
    fail: bool = False
    die: str | None = None

    async def after_run(self, index: int) -> None:
        """The delay and the failure, once the call has run."""
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self._fail(index)

    def after_run_blocking(self, index: int, cancelled: Callable[[], bool]) -> None:
        """The same in a worker thread: the delay ends early once `cancelled()` says so."""
        end = time.monotonic() + self.delay_s
        while (left := end - time.monotonic()) > 0 and not cancelled():
            time.sleep(min(left, CANCEL_POLL_S))
        self._fail(index)

    def _fail(self, index: int) -> None:
        if self.fail:
            raise InjectedFailure(f"worker {index}: injected failure (--fault-fail-prob)")


class Worker(Protocol):
    index: int
    incarnation: int  # 0 at start, +1 per restart
    state: WorkerState

    async def start(self) -> None: ...

    async def run(self, model: str, batch: np.ndarray, group: GroupTag | None = None,
                  fault: CallFault | None = None) -> np.ndarray:
        """Run `model` on `batch`; raise a runtime.errors.WorkerError subclass when the
        worker cannot. Cancelling the awaiting task cancels the call: a worker that has not
        started it never runs it."""
        ...

    async def lost(self) -> str:
        """Return (the reason) once the worker is found dead outside any call of the pool's
        (a Ray actor's process or node ended); never returns for a worker that can only die
        in a call. The pool awaits it for each worker it starts, cancelling it at stop."""
        ...

    def busy_s(self) -> float:
        """How long the call it is running has run (0 when idle or unknown), so that the
        pool can replace a worker hung in a call that was cancelled."""
        ...

    async def stop(self) -> None: ...


class WorkerBackend(Protocol):
    """Makes the workers of one engine (and their restarts)."""

    def make_worker(self, index: int, incarnation: int) -> Worker: ...

    async def close(self) -> None: ...


# name -> "module:Class", built as Class(context, size, worker_models) for workers 0..size-1,
# where worker_models(i) names the models worker i runs (the serving mode decides);
# imported only when chosen, so a backend's heavy dependencies stay optional.
BACKENDS: dict[str, str] = {
    "thread": "runtime.thread_worker:ThreadBackend",
    "ray": "runtime.ray_worker:RayBackend",
}


def make_backend(name: str, context: EngineContext, size: int,
                 worker_models: Callable[[int], list[str]]) -> WorkerBackend:
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(context, size, worker_models)
