"""Fault injection for tests and benchmarks: a wrapper around any worker.

Configured once (`--fault-*` flags, runtime.config.FaultConfig) and applied where the
engine makes its workers; no serving mode and no pool code mentions a fault. The wrapper
decides each call's fault (runtime.worker.CallFault) and the worker acts it out where it
runs, so a Ray actor is delayed, failed or killed inside its own process. Faults:

- delay: a call's answer arrives `delay_ms` late with probability `delay_prob` (the worker
  itself is free again at once, as a slow network would make it look);
- straggler per group (the paper's setup): instead, exactly one uniformly random
  systematic worker of each coding group (runtime.worker.GroupTag) is delayed;
- fail: a call raises InjectedFailure with probability `fail_prob` (an erasure; the worker
  stays up);
- kill: worker `kill_worker` dies for good after `kill_after_calls` calls (once: its
  restarted incarnations are healthy; with `kill_repeat`, every incarnation), so the pool's
  supervisor has to restart it (a Ray actor's process exits, and Ray's restart brings it
  back);
- random kills: any call kills its worker with probability `kill_prob` (every
  incarnation), for soak tests.

To add a fault: a FaultConfig field and its `--fault-*` help (runtime/serve.py), its
decision in `FaultyWorker.run` below and its effect in runtime.worker.CallFault.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable

import numpy as np

from runtime.config import FaultConfig
from runtime.worker import CallFault, GroupTag, Worker, WorkerState

GROUPS_REMEMBERED = 4096  # straggler choices kept for groups whose calls are still arriving


class FaultPlan:
    """The seeded random choices shared by every faulty worker of one engine."""

    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._stragglers: collections.OrderedDict[int, int] = collections.OrderedDict()

    def delay_s(self, index: int, group: GroupTag | None) -> float:
        config = self.config
        if config.straggler_per_group:
            if config.delay_ms <= 0 or group is None or not group.systematic:
                return 0.0
            return config.delay_ms / 1000.0 if index == self._straggler(group) else 0.0
        if config.delay_prob > 0 and self._rng.random() < config.delay_prob:
            return config.delay_ms / 1000.0
        return 0.0

    def fails(self) -> bool:
        return self.config.fail_prob > 0 and self._rng.random() < self.config.fail_prob

    def kills(self) -> bool:
        return self.config.kill_prob > 0 and self._rng.random() < self.config.kill_prob

    def _straggler(self, group: GroupTag) -> int:
        chosen = self._stragglers.get(group.id)
        if chosen is None:
            chosen = group.systematic[self._rng.randrange(len(group.systematic))]
            self._stragglers[group.id] = chosen
            while len(self._stragglers) > GROUPS_REMEMBERED:
                self._stragglers.popitem(last=False)
        return chosen


class FaultyWorker:
    """A worker whose calls the plan delays, fails or (for the killed worker) stops."""

    def __init__(self, inner: Worker, plan: FaultPlan, kill_after_calls: int | None) -> None:
        self._inner = inner
        self._plan = plan
        self._kill_after_calls = kill_after_calls
        self._calls = 0

    @property
    def index(self) -> int:
        return self._inner.index

    @property
    def incarnation(self) -> int:
        return self._inner.incarnation

    @property
    def state(self) -> WorkerState:
        return self._inner.state

    @state.setter
    def state(self, value: WorkerState) -> None:
        self._inner.state = value

    def __repr__(self) -> str:
        return f"FaultyWorker({self._inner!r})"

    def busy_s(self) -> float:
        return self._inner.busy_s()

    async def lost(self) -> str:
        return await self._inner.lost()

    async def start(self) -> None:
        await self._inner.start()

    async def stop(self) -> None:
        await self._inner.stop()

    async def run(self, model: str, batch: np.ndarray, group: GroupTag | None = None,
                  fault: CallFault | None = None) -> np.ndarray:
        # decided here, when the call is made, so the draws follow submission order; acted
        # out by the worker itself (inside its process, for a Ray actor)
        die = None
        delay_s = self._plan.delay_s(self.index, group)
        fail = self._plan.fails()
        if self._kill_after_calls is not None and self.state is WorkerState.READY:
            self._calls += 1
            if self._calls > self._kill_after_calls:
                die = (f"worker {self.index} killed by fault injection after "
                       f"{self._kill_after_calls} calls")
        if die is None and self.state is WorkerState.READY and self._plan.kills():
            die = f"worker {self.index} killed at random by fault injection (--fault-kill-prob)"
        if die or delay_s or fail:
            fault = CallFault(delay_s, fail, die)
        return await self._inner.run(model, batch, group, fault)


def with_faults(make_worker: Callable[[int, int], Worker], config: FaultConfig
                ) -> Callable[[int, int], Worker]:
    """`make_worker(index, incarnation)` whose workers suffer `config`'s faults (the same
    factory when no fault is configured)."""
    if not config.active:
        return make_worker
    plan = FaultPlan(config)

    def make(index: int, incarnation: int) -> Worker:
        doomed = index == config.kill_worker and (incarnation == 0 or config.kill_repeat)
        kill = config.kill_after_calls if doomed else None
        return FaultyWorker(make_worker(index, incarnation), plan, kill)

    return make
