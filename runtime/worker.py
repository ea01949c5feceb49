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

import enum
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

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


class Worker(Protocol):
    index: int
    incarnation: int  # 0 at start, +1 per restart
    state: WorkerState

    async def start(self) -> None: ...

    async def run(self, model: str, batch: np.ndarray, group: GroupTag | None = None
                  ) -> np.ndarray:
        """Run `model` on `batch`; raise a runtime.errors.WorkerError subclass when the
        worker cannot."""
        ...

    async def stop(self) -> None: ...


class WorkerBackend(Protocol):
    """Makes the workers of one engine (and their restarts)."""

    def make_worker(self, index: int, incarnation: int) -> Worker: ...

    async def close(self) -> None: ...


# name -> "module:Class", built as Class(context, worker_models) where worker_models(i)
# names the models worker i runs (the serving mode decides); imported only when chosen,
# so a backend's heavy dependencies stay optional.
BACKENDS: dict[str, str] = {
    "thread": "runtime.thread_worker:ThreadBackend",
}


def make_backend(name: str, context: EngineContext,
                 worker_models: Callable[[int], list[str]]) -> WorkerBackend:
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(context, worker_models)
