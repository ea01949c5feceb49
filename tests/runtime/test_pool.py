"""WorkerPool (deadlines, erasures, supervisor restarts) with fake workers, and the fault
injector (FaultPlan, FaultyWorker, with_faults) around them: no models, no server, no
timing thresholds (a deadline only ever expires on a call that is never answered)."""

from __future__ import annotations

import asyncio
import logging
import types
from dataclasses import dataclass

import numpy as np
import pytest
from runtime_harness import metric_sample, settle, until

import runtime.pool as pool_module
import runtime.worker as worker_module
from runtime.config import FaultConfig
from runtime.errors import ConfigError, InjectedFailure, WorkerDead, WorkerError, WorkerOverdue
from runtime.faults import FaultPlan, FaultyWorker, with_faults
from runtime.metrics import Metrics
from runtime.pool import RESTART_ATTEMPTS, WorkerPool
from runtime.worker import CallFault, GroupTag, WorkerState

SAFETY_S = 5.0  # bounds a wait that an event ends at once; never reached unless a test fails
X = np.ones((1, 1, 4, 4), np.float32)


@dataclass
class Call:
    model: str
    batch: np.ndarray
    group: GroupTag | None
    future: asyncio.Future[np.ndarray]


class FakeWorker:
    """The Worker protocol; `run` waits for the test to end the call (`calls[i].future`),
    or answers at once with batch + index when the factory says `immediate`."""

    def __init__(self, index: int, incarnation: int, immediate: bool) -> None:
        self.index = index
        self.incarnation = incarnation
        self.state = WorkerState.NEW
        self.immediate = immediate
        self.calls: list[Call] = []
        self.start_gate: asyncio.Future[None] | None = None
        self.start_error: BaseException | None = None
        self.busy = 0.0  # what busy_s() says
        self.lost_reason: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def start(self) -> None:
        self.state = WorkerState.STARTING
        if self.start_gate is not None:
            await self.start_gate
        if self.start_error is not None:
            self.state = WorkerState.DEAD
            raise self.start_error
        self.state = WorkerState.READY

    async def run(self, model: str, batch: np.ndarray, group: GroupTag | None = None,
                  fault: CallFault | None = None) -> np.ndarray:
        if self.state is not WorkerState.READY:
            raise WorkerDead(f"worker {self.index} is {self.state.value}")
        if fault is not None and fault.die:  # as every worker acts a fault out
            self.state = WorkerState.DEAD
            raise WorkerDead(fault.die)
        future = asyncio.get_running_loop().create_future()
        self.calls.append(Call(model, batch, group, future))
        if self.immediate:
            result = batch + self.index
        else:
            result = await future
        if fault is not None:
            await fault.after_run(self.index)
        return result

    def busy_s(self) -> float:
        return self.busy

    async def lost(self) -> str:
        return await self.lost_reason  # the test sets its result to kill the worker

    async def stop(self) -> None:
        self.state = WorkerState.STOPPED


class Factory:
    """make_worker(index, incarnation) -> FakeWorker, remembering every worker it made."""

    def __init__(self, immediate: bool = False) -> None:
        self.immediate = immediate
        self.made: dict[tuple[int, int], FakeWorker] = {}
        self.start_errors: dict[tuple[int, int], BaseException] = {}
        self.start_gates: dict[tuple[int, int], asyncio.Future[None]] = {}

    def __call__(self, index: int, incarnation: int) -> FakeWorker:
        worker = FakeWorker(index, incarnation, self.immediate)
        worker.start_error = self.start_errors.get((index, incarnation))
        worker.start_gate = self.start_gates.get((index, incarnation))
        self.made[index, incarnation] = worker
        return worker

    def gate(self, index: int, incarnation: int) -> asyncio.Future[None]:
        """Hold worker (index, incarnation)'s start until the test releases it."""
        gate = asyncio.get_running_loop().create_future()
        self.start_gates[index, incarnation] = gate
        return gate


async def _pool(size: int = 3, deadline_s: float = 60.0, factory: Factory | None = None
                ) -> tuple[WorkerPool, Factory, Metrics]:
    factory = factory or Factory()
    metrics = Metrics("tiny")
    pool = WorkerPool(size, factory, deadline_s=deadline_s, metrics=metrics)
    await pool.start()
    return pool, factory, metrics


def _count(metrics: Metrics, name: str, **labels: str) -> float:
    return metric_sample(metrics, name, **labels)


async def _restarted(pool: WorkerPool, factory: Factory, index: int, incarnation: int) -> None:
    await until(lambda: (index, incarnation) in factory.made and pool.ready,
                f"worker {index} restarted as incarnation {incarnation}")


# -- the pool ------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_start_warms_every_worker_and_submit_returns_its_result() -> None:
    pool, factory, metrics = await _pool()
    assert pool.ready and pool.states() == ["ready"] * 3
    assert sorted(factory.made) == [(0, 0), (1, 0), (2, 0)]
    assert all(_count(metrics, "coded_worker_ready", worker=str(i)) == 1 for i in range(3))
    first, second = pool.new_group([0, 1]), pool.new_group(range(2))
    assert second.id == first.id + 1 and second.systematic == (0, 1)
    task = pool.submit(1, "f", X, first)
    await settle()
    (call,) = factory.made[1, 0].calls
    assert call.model == "f" and call.batch is X and call.group is first
    result = np.full((1, 4), 7.0, np.float32)
    call.future.set_result(result)
    assert await task is result
    assert _count(metrics, "coded_worker_failures_total") == 0
    await pool.stop()


@pytest.mark.asyncio
async def test_a_submitted_call_reaches_its_worker_on_the_next_loop_turn() -> None:
    # what runs on the loop right after a submit (the coded encoders, inline) must not
    # delay the call: the worker is entered in the pool's own task, not one more task later
    pool, factory, _ = await _pool()
    task = pool.submit(0, "f", X)
    await asyncio.sleep(0)  # one loop turn: the submitted task's first step
    assert len(factory.made[0, 0].calls) == 1
    factory.made[0, 0].calls[0].future.set_result(X)
    await task
    await pool.stop()


@pytest.mark.asyncio
async def test_deadline_expiry_is_overdue_and_restarts_the_worker() -> None:
    pool, factory, metrics = await _pool(deadline_s=0.01)
    task = pool.submit(0, "f", X)  # worker 0 never answers this call
    with pytest.raises(WorkerOverdue, match="worker 0 missed its 10 ms deadline"):
        await asyncio.wait_for(task, SAFETY_S)
    (call,) = factory.made[0, 0].calls
    assert call.future.cancelled()  # the overdue call itself was abandoned
    await _restarted(pool, factory, 0, 1)
    assert factory.made[0, 0].state is WorkerState.STOPPED  # the old one was stopped
    assert _count(metrics, "coded_worker_failures_total", worker="0", reason="overdue") == 1
    assert _count(metrics, "coded_worker_restarts_total", worker="0", reason="overdue") == 1
    assert _count(metrics, "coded_worker_ready", worker="0") == 1
    factory.made[0, 1].immediate = True  # the fresh incarnation takes the next call
    np.testing.assert_array_equal(await pool.submit(0, "f", X), X)
    assert len(factory.made[0, 1].calls) == 1
    await pool.stop()


@pytest.mark.asyncio
async def test_a_worker_hung_past_its_deadline_is_replaced_at_its_next_call() -> None:
    # its calls were cancelled (answered without it), so no deadline of theirs expired
    pool, factory, metrics = await _pool(deadline_s=60.0)
    factory.made[1, 0].busy = 60.5  # one call has been running for longer than the deadline
    factory.made[0, 0].busy = 59.5  # busy, but within it
    calls = [pool.submit(0, "f", X), pool.submit(1, "f", X)]
    await _restarted(pool, factory, 1, 1)
    with pytest.raises(WorkerDead):  # the call found its worker being replaced: an erasure
        await calls[1]
    assert _count(metrics, "coded_worker_restarts_total", worker="1", reason="overdue") == 1
    assert (0, 1) not in factory.made and len(factory.made[0, 0].calls) == 1
    calls[0].cancel()
    await pool.stop()


@pytest.mark.asyncio
async def test_a_worker_lost_outside_any_call_is_restarted() -> None:
    pool, factory, metrics = await _pool()
    factory.made[2, 0].lost_reason.set_result("its node went away")
    await _restarted(pool, factory, 2, 1)
    assert _count(metrics, "coded_worker_failures_total", worker="2", reason="lost") == 1
    assert _count(metrics, "coded_worker_restarts_total", worker="2", reason="dead") == 1
    factory.made[2, 1].lost_reason.set_result("again")  # the fresh one is watched too
    await _restarted(pool, factory, 2, 2)
    assert _count(metrics, "coded_worker_failures_total", worker="2", reason="lost") == 2
    await pool.stop()


@pytest.mark.asyncio
async def test_a_dead_worker_is_restarted_with_the_next_incarnation() -> None:
    pool, factory, metrics = await _pool()
    gate = factory.gate(2, 1)  # hold the replacement's start to look at the pool meanwhile
    task = pool.submit(2, "f", X)
    await settle()
    factory.made[2, 0].calls[0].future.set_exception(WorkerDead("gone"))
    with pytest.raises(WorkerDead, match="gone"):
        await task
    await until(lambda: (2, 1) in factory.made, "the replacement is being started")
    assert not pool.ready
    assert _count(metrics, "coded_worker_ready", worker="2") == 0
    assert _count(metrics, "coded_worker_restarts_total") == 0  # not yet
    gate.set_result(None)
    await _restarted(pool, factory, 2, 1)
    assert factory.made[2, 1].incarnation == 1
    assert _count(metrics, "coded_worker_restarts_total", worker="2", reason="dead") == 1
    assert _count(metrics, "coded_worker_failures_total", worker="2", reason="dead") == 1
    assert _count(metrics, "coded_worker_ready", worker="2") == 1
    await pool.stop()


@pytest.mark.asyncio
async def test_an_engine_crash_is_a_worker_error_and_restarts() -> None:
    pool, factory, metrics = await _pool()
    task = pool.submit(1, "f", X)
    await settle()
    crash = RuntimeError("CUDA error: an illegal memory access")
    factory.made[1, 0].calls[0].future.set_exception(crash)
    with pytest.raises(WorkerError, match="worker 1 failed: RuntimeError: CUDA error") as err:
        await task
    assert type(err.value) is WorkerError and err.value.__cause__ is crash
    await _restarted(pool, factory, 1, 1)
    assert _count(metrics, "coded_worker_restarts_total", worker="1", reason="error") == 1
    await pool.stop()


@pytest.mark.asyncio
async def test_an_injected_failure_is_an_erasure_without_a_restart() -> None:
    pool, factory, metrics = await _pool()
    task = pool.submit(0, "f", X)
    await settle()
    factory.made[0, 0].calls[0].future.set_exception(InjectedFailure("injected"))
    with pytest.raises(InjectedFailure):
        await task
    await settle()
    assert sorted(factory.made) == [(0, 0), (1, 0), (2, 0)]  # nobody was replaced
    assert pool.ready and factory.made[0, 0].state is WorkerState.READY
    assert _count(metrics, "coded_worker_failures_total", worker="0", reason="injected") == 1
    assert _count(metrics, "coded_worker_restarts_total") == 0
    await pool.stop()


@pytest.mark.asyncio
async def test_an_older_incarnations_failure_is_ignored() -> None:
    pool, factory, metrics = await _pool()
    first, second = pool.submit(0, "f", X), pool.submit(0, "f", X)
    await settle()
    old_calls = factory.made[0, 0].calls
    old_calls[0].future.set_exception(WorkerDead("died"))
    with pytest.raises(WorkerDead):
        await first
    await _restarted(pool, factory, 0, 1)
    old_calls[1].future.set_exception(WorkerDead("died"))  # the old incarnation's last call
    with pytest.raises(WorkerDead):
        await second
    await settle()
    assert (0, 2) not in factory.made and pool.ready  # incarnation 1 is left alone
    assert factory.made[0, 1].state is WorkerState.READY
    assert _count(metrics, "coded_worker_failures_total", worker="0") == 2  # both erasures
    assert _count(metrics, "coded_worker_restarts_total", worker="0") == 1
    await pool.stop()


@pytest.mark.asyncio
async def test_failures_during_a_restart_do_not_start_another() -> None:
    pool, factory, metrics = await _pool()
    gate = factory.gate(0, 1)
    calls = [pool.submit(0, "f", X) for _ in range(3)]
    await settle()
    for call in factory.made[0, 0].calls:
        call.future.set_exception(WorkerDead("died"))
    for task in calls:
        with pytest.raises(WorkerDead):
            await task
    gate.set_result(None)
    await _restarted(pool, factory, 0, 1)
    await settle()
    assert (0, 2) not in factory.made
    assert _count(metrics, "coded_worker_restarts_total", worker="0") == 1
    await pool.stop()


@pytest.mark.asyncio
async def test_failed_restarts_are_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "RESTART_BACKOFF_S", 0.0)
    factory = Factory()
    factory.start_errors[0, 1] = RuntimeError("device busy")
    pool, factory, metrics = await _pool(factory=factory)
    task = pool.submit(0, "f", X)
    await settle()
    factory.made[0, 0].calls[0].future.set_exception(WorkerDead("died"))
    with pytest.raises(WorkerDead):
        await task
    await _restarted(pool, factory, 0, 2)  # attempt 1 failed to start, attempt 2 is serving
    assert _count(metrics, "coded_worker_restarts_total", worker="0", reason="dead") == 1
    await pool.stop()


@pytest.mark.asyncio
async def test_a_worker_that_never_restarts_stays_down(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(pool_module, "RESTART_BACKOFF_S", 0.0)
    factory = Factory()
    for attempt in range(1, RESTART_ATTEMPTS + 1):
        factory.start_errors[1, attempt] = RuntimeError("device lost")
    pool, factory, metrics = await _pool(factory=factory)
    task = pool.submit(1, "f", X)
    await settle()
    with caplog.at_level(logging.ERROR, logger="runtime.pool"):
        factory.made[1, 0].calls[0].future.set_exception(WorkerDead("died"))
        with pytest.raises(WorkerDead):
            await task
        await until(lambda: "stays down" in caplog.text, "the supervisor gave up")
    assert sorted(i for w, i in factory.made if w == 1) == list(range(RESTART_ATTEMPTS + 1))
    assert not pool.ready
    assert _count(metrics, "coded_worker_ready", worker="1") == 0
    assert _count(metrics, "coded_worker_restarts_total") == 0
    await pool.stop()


@pytest.mark.asyncio
async def test_stop_cancels_inflight_calls_and_restarts() -> None:
    pool, factory, metrics = await _pool()
    gate = factory.gate(2, 1)
    calls = [pool.submit(0, "f", X), pool.submit(1, "f", X)]
    dying = pool.submit(2, "f", X)
    await settle()
    factory.made[2, 0].calls[0].future.set_exception(WorkerDead("died"))
    with pytest.raises(WorkerDead):
        await dying
    await until(lambda: (2, 1) in factory.made, "a restart is under way")
    await asyncio.wait_for(pool.stop(), SAFETY_S)
    assert all(task.cancelled() for task in calls)
    assert factory.made[0, 0].calls[0].future.cancelled()
    assert gate.cancelled()  # the restart was cancelled too
    assert all(factory.made[i, 0].state is WorkerState.STOPPED for i in range(3))
    assert _count(metrics, "coded_worker_failures_total") == 1  # cancelled calls are no erasures
    assert _count(metrics, "coded_worker_restarts_total") == 0


# -- fault injection -----------------------------------------------------------------------------
def _stragglers(plan: FaultPlan, tags: list[GroupTag], n: int) -> list[int]:
    """The worker the plan delays in each group (checking that there is exactly one)."""
    chosen = []
    for tag in tags:
        delays = [plan.delay_s(worker, tag) for worker in range(n)]
        late = [w for w, d in enumerate(delays) if d]
        assert len(late) == 1 and delays[late[0]] == plan.config.delay_ms / 1000.0, (tag, delays)
        assert late[0] in tag.systematic, (tag, delays)  # never a parity
        # the same group asked again, in another order: the same straggler
        assert [plan.delay_s(w, tag) for w in reversed(range(n))] == delays[::-1]
        chosen.append(late[0])
    return chosen


def test_straggler_per_group_delays_exactly_one_systematic_worker() -> None:
    config = FaultConfig(straggler_per_group=True, delay_ms=250.0, seed=5)
    tags = [GroupTag(i, (0, 1, 2)) for i in range(300)]  # n = 5: workers 3, 4 are parities
    chosen = _stragglers(FaultPlan(config), tags, n=5)
    assert set(chosen) == {0, 1, 2}  # uniform over the systematic workers
    assert _stragglers(FaultPlan(config), tags, n=5) == chosen  # seeded
    other_seed = FaultConfig(straggler_per_group=True, delay_ms=250.0, seed=6)
    assert _stragglers(FaultPlan(other_seed), tags, n=5) != chosen
    # uncoded tags name only the workers in use
    assert _stragglers(FaultPlan(config), [GroupTag(0, (1,))], n=3) == [1]


def test_straggler_per_group_delays_nothing_without_a_group() -> None:
    plan = FaultPlan(FaultConfig(straggler_per_group=True, delay_ms=250.0, seed=0))
    assert [plan.delay_s(w, None) for w in range(3)] == [0.0] * 3
    assert [plan.delay_s(w, GroupTag(0, ())) for w in range(3)] == [0.0] * 3
    no_delay = FaultPlan(FaultConfig(straggler_per_group=True, delay_ms=0.0, seed=0))
    assert [no_delay.delay_s(w, GroupTag(0, (0, 1))) for w in range(3)] == [0.0] * 3


def test_delay_prob_delays_that_share_of_calls() -> None:
    always = FaultPlan(FaultConfig(delay_ms=40.0, delay_prob=1.0))
    assert {always.delay_s(w, None) for w in range(5)} == {0.04}
    plan = FaultPlan(FaultConfig(delay_ms=40.0, delay_prob=0.25, seed=1))
    delayed = sum(plan.delay_s(0, GroupTag(i, (0,))) > 0 for i in range(2000))
    assert 400 <= delayed <= 600  # seeded: a fixed draw near 500


def test_with_faults_returns_the_same_factory_when_no_fault_is_active() -> None:
    factory = Factory()
    for inactive in (FaultConfig(), FaultConfig(delay_ms=100.0), FaultConfig(delay_prob=0.5),
                     FaultConfig(seed=3)):
        assert with_faults(factory, inactive) is factory, inactive
    assert with_faults(factory, FaultConfig(fail_prob=0.1)) is not factory


@pytest.mark.asyncio
async def test_kill_after_n_calls_only_for_incarnation_zero() -> None:
    factory = Factory(immediate=True)
    make = with_faults(factory, FaultConfig(kill_worker=1, kill_after_calls=2))
    doomed = make(1, 0)
    assert isinstance(doomed, FaultyWorker) and doomed.index == 1 and doomed.incarnation == 0
    await doomed.start()
    for _ in range(2):
        np.testing.assert_array_equal(await doomed.run("f", X), X + 1)
    with pytest.raises(WorkerDead, match="killed by fault injection after 2 calls"):
        await doomed.run("f", X)
    assert doomed.state is WorkerState.DEAD and factory.made[1, 0].state is WorkerState.DEAD
    assert len(factory.made[1, 0].calls) == 2  # the fatal call never reached the worker
    for index, incarnation in ((1, 1), (0, 0), (2, 0)):  # its restart and the others: healthy
        worker = make(index, incarnation)
        await worker.start()
        for _ in range(5):
            await worker.run("f", X)
        assert worker.state is WorkerState.READY


@pytest.mark.asyncio
async def test_kill_repeat_kills_every_incarnation_after_n_calls() -> None:
    factory = Factory(immediate=True)
    make = with_faults(factory, FaultConfig(kill_worker=0, kill_after_calls=3, kill_repeat=True))
    for incarnation in range(3):
        worker = make(0, incarnation)
        await worker.start()
        for _ in range(3):
            await worker.run("f", X)
        with pytest.raises(WorkerDead, match="after 3 calls"):
            await worker.run("f", X)
    healthy = make(1, 0)
    await healthy.start()
    for _ in range(10):
        await healthy.run("f", X)


def test_kill_repeat_needs_a_worker_to_kill() -> None:
    with pytest.raises(ConfigError, match="--fault-kill-repeat needs --fault-kill-worker"):
        FaultConfig(kill_repeat=True)


@pytest.mark.asyncio
async def test_fail_prob_one_raises_after_running_the_call() -> None:
    factory = Factory(immediate=True)
    worker = with_faults(factory, FaultConfig(fail_prob=1.0, seed=0))(0, 0)
    await worker.start()
    for calls in (1, 2):
        with pytest.raises(InjectedFailure, match="worker 0: injected failure"):
            await worker.run("f", X)
        assert len(factory.made[0, 0].calls) == calls  # the call did run
    assert worker.state is WorkerState.READY  # an erasure, not a death


@pytest.mark.asyncio
async def test_a_stragglers_answer_is_delayed_after_its_work(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    factory = Factory(immediate=True)
    slept: list[tuple[float, int]] = []  # (delay, calls the worker had finished by then)
    real_sleep = asyncio.sleep

    async def sleep(delay_s: float) -> None:
        slept.append((delay_s, sum(len(w.calls) for w in factory.made.values())))
        await real_sleep(0)

    monkeypatch.setattr(worker_module, "asyncio", types.SimpleNamespace(sleep=sleep))
    config = FaultConfig(straggler_per_group=True, delay_ms=300.0, seed=2)
    make = with_faults(factory, config)
    workers = [make(i, 0) for i in range(3)]
    for worker in workers:
        await worker.start()
    tag = GroupTag(7, (0, 1))
    results = [await w.run("f", X, tag) for w in workers]
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, X + i)  # the answer itself is untouched
    straggler = _stragglers(FaultPlan(config), [tag], n=3)[0]  # the same seeded choice
    assert slept == [(0.3, straggler + 1)]  # one delay, after the straggler's own call ran


@pytest.mark.asyncio
async def test_the_pool_restarts_a_killed_worker_healthy() -> None:
    factory = Factory(immediate=True)
    make = with_faults(factory, FaultConfig(kill_worker=0, kill_after_calls=1))
    metrics = Metrics("tiny")
    pool = WorkerPool(2, make, deadline_s=60.0, metrics=metrics)
    await pool.start()
    await pool.submit(0, "f", X)
    with pytest.raises(WorkerDead, match="killed by fault injection"):
        await pool.submit(0, "f", X)
    await until(lambda: (0, 1) in factory.made and pool.ready, "worker 0 restarted")
    for _ in range(5):
        np.testing.assert_array_equal(await pool.submit(0, "f", X), X)
    assert len(factory.made[0, 1].calls) == 5
    assert _count(metrics, "coded_worker_restarts_total", worker="0", reason="dead") == 1
    await pool.stop()
